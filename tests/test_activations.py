"""Activation cache: BOS dropping, keys, cache hits, resume, shuffling, normalisation, corruption, bad input."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from fcsae import activations, corpus
from fcsae.activations import ActivationCache, harvest
from fcsae.cli import main
from fcsae.config import HarvestConfig, LMConfig
from fcsae.errors import FcsaeInputError
from fcsae.lm import make_tiny_model, resid_at, save_model
from tests._data_utils import tiny_texts, write_text_file


@pytest.fixture(scope="module")
def lm():
    return make_tiny_model("gpt_neox", d_model=32, n_layers=2)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def text_file(tmp_path):
    return write_text_file(tmp_path / "tiny.txt", tiny_texts(80))


def make_cfg(text_file, model, **kw) -> HarvestConfig:
    base = dict(lm=LMConfig(model=model.name, layer=1), corpus=str(text_file), tokens=300, context_len=16,
                batch_size=4, shard_tokens=64)
    return HarvestConfig(**{**base, **kw})


def all_raw(cache: ActivationCache) -> torch.Tensor:
    return torch.cat([cache.load_shard(i) for i in range(len(cache.shards))])


class Boom:
    """Stands in for a model: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) on a cache hit")


def test_harvest_drops_bos_and_matches_the_model(home, text_file, lm):
    cfg = make_cfg(text_file, lm)
    cache = ActivationCache(harvest(cfg, lm=lm, progress=False))
    assert cache.n_tokens == 300 and cache.d_in == 32 and len(cache.shards) == 5
    assert [s["n_tokens"] for s in cache.shards] == [64, 64, 64, 64, 44]
    rows = corpus.pack(corpus.iter_texts(str(text_file), "train"), lm.tokenizer, 16, max_rows=20)
    ids = torch.cat([load_file(cache.path / s["file"])["token_ids"] for s in cache.shards]).long()
    assert torch.equal(ids, rows[:, 1:].reshape(-1)[:300])  # exactly the non-BOS tokens, in order
    assert not (ids == lm.tokenizer.bos_token_id).any()
    expected = resid_at(lm, rows[:4], 1)[:, 1:].reshape(-1, 32)
    assert torch.allclose(all_raw(cache)[:60].float(), expected, rtol=2e-3, atol=2e-3)
    assert cache.manifest["bos_dropped"] and cache.manifest["store_dtype"] == "float16"
    assert cache.store_dtype == torch.float16


def test_cache_key_changes_with_every_field(text_file, lm, home):
    cfg = make_cfg(text_file, lm)
    fields = activations.key_fields(cfg, "fp")
    base = activations.cache_key(fields)
    assert base == activations.cache_key(activations.key_fields(make_cfg(text_file, lm), "fp"))
    variants = [
        dataclasses.replace(cfg, lm=LMConfig(model="other", layer=1)),
        dataclasses.replace(cfg, lm=LMConfig(model=lm.name, layer=0)),
        dataclasses.replace(cfg, lm=LMConfig(model=lm.name, layer=1, dtype="bfloat16")),
        dataclasses.replace(cfg, context_len=17),
        dataclasses.replace(cfg, tokens=301),
        dataclasses.replace(cfg, store_dtype="bfloat16"),
        dataclasses.replace(cfg, shard_tokens=65),
    ]
    keys = {activations.cache_key(activations.key_fields(v, "fp")) for v in variants}
    keys.add(activations.cache_key(activations.key_fields(cfg, "other-fp")))
    keys.add(activations.cache_key({**fields, "format_version": fields["format_version"] + 1}))
    assert base not in keys and len(keys) == len(variants) + 2
    # batch size and device do not change the data, so they share the cache
    assert activations.cache_path(dataclasses.replace(cfg, batch_size=3)) == activations.cache_path(cfg)


def test_second_harvest_is_a_cache_hit(home, text_file, lm):
    cfg = make_cfg(text_file, lm)
    path = harvest(cfg, lm=lm, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert harvest(cfg, lm=Boom(), progress=False) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_resume_after_crash_gives_identical_data(tmp_path, monkeypatch, text_file, lm):
    cfg = make_cfg(text_file, lm, batch_size=3)  # batches (45 tokens) straddle shards (64)
    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "clean"))
    clean = ActivationCache(harvest(cfg, lm=lm, progress=False))

    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "crashy"))
    real_write = activations._write_shard
    written = []

    def crash_after_two(out, index, acts, ids):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        written.append(index)
        return real_write(out, index, acts, ids)

    monkeypatch.setattr(activations, "_write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg, lm=lm, progress=False)
    path = activations.cache_path(cfg)
    assert not (path / "manifest.json").exists()
    with pytest.raises(FcsaeInputError, match="not a complete cache"):
        ActivationCache(path)

    resumed_at = []
    monkeypatch.setattr(activations, "_write_shard", lambda out, i, a, t: resumed_at.append(i) or real_write(out, i, a, t))
    resumed = ActivationCache(harvest(cfg, lm=lm, progress=False))
    assert resumed_at == [2, 3, 4]  # shards 0 and 1 were kept
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in clean.shards]
    assert resumed.norm_scale == pytest.approx(clean.norm_scale, rel=1e-12)
    assert not (path / "progress.json").exists()


def row_ids(batch_BD: torch.Tensor, normed_ND: torch.Tensor) -> list[int]:
    """Index of each batch row in the cache (rows are matched exactly)."""
    eq = (batch_BD[:, None, :] == normed_ND[None, :, :]).all(-1)
    assert (eq.sum(1) >= 1).all()
    return eq.float().argmax(1).tolist()


def test_batches_cover_every_row_once_per_epoch(home, text_file, lm):
    cache = ActivationCache(harvest(make_cfg(text_file, lm), lm=lm, progress=False))
    normed = all_raw(cache).float() * cache.norm_scale
    it = cache.batches(30, seed=3, window_shards=2)  # 5 shards -> 3 windows
    epochs = [[i for _ in range(10) for i in row_ids(next(it), normed)] for _ in range(2)]
    assert sorted(epochs[0]) == list(range(300)) and sorted(epochs[1]) == list(range(300))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(300))


def test_batches_deterministic_and_exact_resume(home, text_file, lm):
    cache = ActivationCache(harvest(make_cfg(text_file, lm), lm=lm, progress=False))
    it = cache.batches(47, seed=1, window_shards=2)
    ref = [next(it) for _ in range(15)]  # 705 rows: crosses two epoch boundaries, uneven batches
    again = cache.batches(47, seed=1, window_shards=2)
    assert all(torch.equal(a, next(again)) for a in ref)
    other = next(cache.batches(47, seed=2, window_shards=2))
    assert not torch.equal(other, ref[0])
    for k in (1, 6, 7, 13):
        resumed = cache.batches(47, seed=1, start_batch=k, window_shards=2)
        assert all(torch.equal(ref[j], next(resumed)) for j in range(k, 15))
    assert ref[0].dtype == torch.float32 and ref[0].shape == (47, 32)


def test_skipping_reads_only_the_needed_shards(home, text_file, lm, monkeypatch):
    cache = ActivationCache(harvest(make_cfg(text_file, lm), lm=lm, progress=False))
    loaded = []
    real = ActivationCache.load_shard
    monkeypatch.setattr(ActivationCache, "load_shard", lambda self, i: loaded.append(i) or real(self, i))
    it = cache.batches(10, seed=0, start_batch=27, window_shards=1)  # row 270 of 300: inside the last window
    next(it)
    assert len(loaded) == 1  # one shard in memory, the skipped ones never read
    windows = cache._windows(0, 0, 1)
    assert loaded == windows[-1]


def test_normalisation_round_trip(home, text_file, lm):
    cache = ActivationCache(harvest(make_cfg(text_file, lm, store_dtype="bfloat16"), lm=lm, progress=False))
    assert cache.store_dtype == torch.bfloat16
    epoch = torch.cat([b for b, _ in zip(cache.batches(50, seed=0), range(6))])
    assert epoch.norm(dim=1).mean().item() == pytest.approx(math.sqrt(32), rel=1e-4)
    raw = all_raw(cache).float()
    assert raw.norm(dim=1).mean().item() == pytest.approx(cache.manifest["mean_norm"], rel=1e-4)
    assert abs(raw.norm(dim=1).mean().item() - math.sqrt(32)) > 0.5  # the constant does something
    ids = row_ids(epoch, raw * cache.norm_scale)
    assert torch.allclose(cache.denormalize(epoch), raw[ids], rtol=1e-6, atol=1e-6)


def test_corrupt_shard_is_detected_and_harvest_repairs_it(home, text_file, lm):
    cfg = make_cfg(text_file, lm)
    path = harvest(cfg, lm=lm, progress=False)
    good = ActivationCache(path)
    reference = all_raw(good)
    shard = path / good.shards[3]["file"]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # same size, one flipped byte in the tensor data
    shard.write_bytes(bytes(data))
    cache = ActivationCache(path)  # sizes still match: found when read
    with pytest.raises(FcsaeInputError, match=r"shard_00003\.safetensors.*sha256.*fcsae harvest"):
        cache.verify()
    with pytest.raises(FcsaeInputError, match="shard_00003"):
        for _ in cache.batches(100, window_shards=5):
            pass
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(FcsaeInputError, match=r"shard_00003\.safetensors.*truncated"):
        ActivationCache(path)
    # Re-running the same harvest verifies, recomputes from the bad shard, and gives the same data.
    assert harvest(cfg, lm=lm, progress=False) == path
    repaired = ActivationCache(path)
    repaired.verify()
    assert torch.equal(all_raw(repaired), reference)


def test_bad_harvest_input(home, text_file, lm, tmp_path):
    with pytest.raises(FcsaeInputError, match="tokens"):
        make_cfg(text_file, lm, tokens=0)
    with pytest.raises(FcsaeInputError, match="tokens"):
        make_cfg(text_file, lm, tokens=-5)
    with pytest.raises(FcsaeInputError, match="layer"):
        harvest(make_cfg(text_file, lm, lm=LMConfig(model=lm.name, layer=2)), lm=lm, progress=False)
    with pytest.raises(FcsaeInputError, match="corpus"):
        harvest(make_cfg(tmp_path / "nope.txt", lm), lm=lm, progress=False)
    with pytest.raises(FcsaeInputError, match="fewer than"):
        harvest(make_cfg(text_file, lm, tokens=10**6), lm=lm, progress=False)
    huge = make_tiny_model("gpt_neox", d_model=32, n_layers=2)
    with torch.no_grad():
        huge.model.original_model.gpt_neox.embed_in.weight.mul_(1e6)  # residuals far beyond float16's 65504
    with pytest.raises(FcsaeInputError, match="bfloat16"):
        harvest(make_cfg(text_file, huge), lm=huge, progress=False)
    assert not any((home / "activations").iterdir())  # nothing half-written
    with pytest.raises(FcsaeInputError, match="batch_size"):
        next(ActivationCache(harvest(make_cfg(text_file, lm), lm=lm, progress=False)).batches(0))
    with pytest.raises(FcsaeInputError, match="no manifest"):
        ActivationCache(tmp_path)
    bad = tmp_path / "badcache"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(FcsaeInputError, match="unreadable manifest"):
        ActivationCache(bad)


def test_cli_harvest(home, text_file, lm, tmp_path, capsys):
    model_dir = save_model(lm, tmp_path / "tiny-model")
    args = ["harvest", "--model", str(model_dir), "--layer", "1", "--tokens", "100", "--corpus", str(text_file),
            "--context-len", "16", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip()
    assert ActivationCache(out).n_tokens == 100
    assert main(args) == 0 and capsys.readouterr().out.strip() == out  # cache hit
    for bad in (["--tokens", "0"], ["--tokens", "-3"], ["--layer", "7"], ["--corpus", str(tmp_path / "no.txt")],
                ["--model", "no-such-model-xyz"]):
        assert main(args + bad) == 2
        # (transformers may draw its own loading bar on stderr before the error)
        lines = [ln for ln in re.split(r"[\r\n]+", capsys.readouterr().err) if "fcsae: error: " in ln]
        assert len(lines) == 1 and lines[0].startswith("fcsae: error: ")
