"""Corpus: packing with BOS, local files with held-out splits, bad sources, Brown detokenising, the real offline build."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fcsae import corpus, corpus_sources
from fcsae.errors import FcsaeInputError
from fcsae.lm import make_tiny_tokenizer
from tests._data_utils import tiny_texts, write_text_file


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_pack_rows_start_with_bos_and_keep_every_token(tok):
    texts = tiny_texts(20)
    rows = corpus.pack(texts, tok, context_len=16)
    assert rows.dtype == torch.long and rows.shape[1] == 16 and rows.shape[0] > 10
    assert (rows[:, 0] == tok.bos_token_id).all()
    # The row bodies, concatenated, are the EOS-separated token stream (last partial row dropped).
    stream = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    body = rows[:, 1:].reshape(-1).tolist()
    assert body == stream[:len(body)]
    assert len(stream) - len(body) < 15


def test_pack_max_rows_and_lazy_input(tok):
    consumed = []

    def gen():
        for t in tiny_texts(500):
            consumed.append(t)
            yield t

    rows = corpus.pack(gen(), tok, context_len=8, max_rows=5, chunk=4)
    assert rows.shape == (5, 8)
    assert len(consumed) < 500
    assert torch.equal(rows, corpus.pack(tiny_texts(500), tok, context_len=8)[:5])


def test_pack_uses_eos_when_tokenizer_has_no_bos(tok):
    import copy

    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    assert corpus.bos_choice(no_bos) == corpus.BosChoice(tok.eos_token_id, "eos")
    rows = corpus.pack(tiny_texts(5), no_bos, context_len=8)
    assert (rows[:, 0] == tok.eos_token_id).all()


def test_pack_rejects_short_context(tok):
    with pytest.raises(FcsaeInputError, match="context_len"):
        corpus.pack(["a b"], tok, context_len=1)


def test_local_text_file_paragraphs_and_disjoint_splits(tmp_path):
    texts = tiny_texts(300)
    path = write_text_file(tmp_path / "c.txt", texts)
    train, test = corpus.load_texts(str(path), "train"), corpus.load_texts(str(path), "test")
    assert sorted(train + test) == sorted(texts)  # paragraphs, each once
    assert not set(train) & set(test)
    assert 0 < len(test) < 30
    assert test == [t for t in texts if corpus.is_test(t)]


def test_local_parquet_and_jsonl(tmp_path):
    texts = tiny_texts(50)
    pq.write_table(pa.table({"id": list(range(50)), "body": texts}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name in ("c.parquet", "c.jsonl"):
        got = corpus.load_texts(str(tmp_path / name), "train") + corpus.load_texts(str(tmp_path / name), "test")
        assert sorted(got) == sorted(texts)


def test_fingerprint_follows_file_content(tmp_path):
    a = write_text_file(tmp_path / "a.txt", tiny_texts(5))
    fp1 = corpus.fingerprint(str(a))
    assert fp1 == corpus.fingerprint(str(a))
    write_text_file(a, tiny_texts(5, seed=1))
    assert corpus.fingerprint(str(a)) != fp1


@pytest.mark.parametrize("source", ["/no/such/file.txt", "./missing.parquet"])
def test_unreadable_path_is_input_error(source):
    with pytest.raises(FcsaeInputError, match="corpus"):
        corpus.load_texts(source)
    with pytest.raises(FcsaeInputError, match="corpus"):
        corpus.fingerprint(source)


def test_corrupt_parquet_and_bad_split(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(FcsaeInputError, match="bad.parquet"):
        corpus.load_texts(str(bad))
    with pytest.raises(FcsaeInputError, match="split"):
        corpus.load_texts(str(bad), "validation")


def test_brown_detokenizer_fixes_quotes_and_punctuation():
    toks = "``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd (/( 1/2/cd )/) ;/. ok/uh ./.".split()
    assert corpus_sources.detokenize_brown(toks) == '"Only a handful", the jury said (1/2); ok.'


def test_read_brown_paragraphs(tmp_path):
    (tmp_path / "ca01").write_text("\n\n\tThe/at cat/nn sat/vbd ./.\nIt/pps slept/vbd ./.\n\n\n\tDogs/nns bark/vb !/.\n")
    (tmp_path / "README").write_text("not a corpus file")
    docs = list(corpus_sources.read_brown(tmp_path))
    assert docs == [corpus_sources.Doc("brown", "brown/ca01", ["The cat sat. It slept.", "Dogs bark!"])]


def test_dedup_drops_repeated_paragraphs():
    docs = [corpus_sources.Doc("a", "a/1", ["Hello  world.", "Unique one."]),
            corpus_sources.Doc("b", "b/1", ["hello world.", "Another."]),
            corpus_sources.Doc("b", "b/2", ["HELLO WORLD."])]
    out, dropped = corpus._dedup(docs)
    assert dropped == 2
    assert [d.doc_id for d in out] == ["a/1", "b/1"]
    assert out[1].paragraphs == ["Another."]


@pytest.mark.slow
def test_prepare_offline_corpus_for_real(home):
    root = corpus.prepare_offline_corpus()
    manifest = corpus.offline_manifest()
    names = {s["name"]: s for s in manifest["sources"]}
    assert {"sotu", "moby-dick", "brown"} <= set(names)
    assert names["sotu"]["documents"] > 200 and names["brown"]["documents"] == 500
    assert names["moby-dick"]["words"] > 150_000
    total = manifest["words"]["train"] + manifest["words"]["test"]
    assert total > 2_500_000
    assert 0.005 < manifest["words"]["test"] / total < 0.05
    table = pq.read_table(root / "offline.parquet")
    ids = table["doc_id"].to_pylist()
    assert len(ids) == len(set(ids))
    splits = table["split"].to_pylist()
    assert all((s == "test") == corpus.is_test(i) for i, s in zip(ids, splits))
    test = corpus.load_texts("offline", "test")
    assert len(test) == splits.count("test") and all(len(t) > 100 for t in test)
    # A second call is a cache hit with the same fingerprint.
    fp = manifest["fingerprint"]
    assert corpus.prepare_offline_corpus() == root and corpus.fingerprint("offline") == fp
