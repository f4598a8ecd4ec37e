"""Where experiments live: a local directory (the default) or any pyarrow filesystem URI (``s3://bucket/prefix``).

``location(text)`` returns a ``pathlib.Path`` for a local path and a
``RemotePath`` for a URI. ``RemotePath`` offers the part of the ``Path`` API
that fcsae's experiment code uses (``/``, ``name``, ``parent``, ``exists``,
``is_dir``, ``read_text``, ``write_text``, ``iterdir``, ``glob``, ``unlink``,
``mkdir``), so one code path serves both; ``rmtree``, ``upload_dir`` and
``download_dir`` cover trees.

A URI is whatever ``pyarrow.fs.FileSystem.from_uri`` accepts, query included
(``s3://bkt/exp?endpoint_override=127.0.0.1:9000&scheme=http``); credentials
come from the usual environment (``AWS_ACCESS_KEY_ID`` ...) on every node.
An object store has no rename, but one PUT is atomic: a reader sees the old
object or the new one, never a torn one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterator

import pyarrow.fs as pafs

from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path, write_json as _write_local_json


def is_uri(text: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (an object store or other pyarrow filesystem), False for a local path."""
    return "://" in str(text) and not str(text).startswith("file://")


def location(text: "str | os.PathLike | RemotePath") -> "Path | RemotePath":
    """A local absolute ``Path`` or a ``RemotePath``; FcsaeInputError for a URI pyarrow cannot open."""
    if isinstance(text, (Path, RemotePath)):
        return text if isinstance(text, RemotePath) else text.expanduser().resolve()
    text = str(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not is_uri(text):
        return Path(text).expanduser().resolve()
    base, _, query = text.partition("?")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/ValueError for bad or unsupported URIs
        raise FcsaeInputError(f"{base}: not a storage URI pyarrow can open ({type(e).__name__}: {e}); "
                              "use a local directory or e.g. s3://bucket/prefix") from None
    return RemotePath(fs, path.rstrip("/"), base.split("://", 1)[0], query)


def local_cache(loc: "Path | RemotePath", kind: str) -> Path:
    """A node-local directory for a remote location (``$FCSAE_HOME/<kind>/<hash>``); the location itself if local."""
    if isinstance(loc, Path):
        return loc
    from fcsae.paths import fcsae_home

    digest = hashlib.sha256(str(loc).encode()).hexdigest()[:16]
    return fcsae_home() / kind / f"{loc.name}-{digest}"


def rmtree(loc: "Path | RemotePath") -> None:
    """Delete a directory tree (missing is fine)."""
    if isinstance(loc, RemotePath):
        if loc.is_dir():
            loc.fs.delete_dir(loc.path)
    elif loc.is_dir() and not loc.is_symlink():
        shutil.rmtree(loc)


def upload_dir(local: Path, dest: "Path | RemotePath") -> None:
    """Copy a local directory's files into ``dest`` (a copy for a local ``dest``)."""
    if isinstance(dest, Path):
        if local.resolve() != dest.resolve():
            shutil.copytree(local, dest, dirs_exist_ok=True)
        return
    pafs.copy_files(str(local), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)


def download_dir(src: "Path | RemotePath", local: Path) -> None:
    """Copy ``src``'s files into a local directory."""
    local.mkdir(parents=True, exist_ok=True)
    if isinstance(src, Path):
        shutil.copytree(src, local, dirs_exist_ok=True)
        return
    pafs.copy_files(src.path, str(local), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())


def upload_file(local: Path, dest: "Path | RemotePath") -> None:
    """One file to ``dest``: a rename for a local one (atomic), one PUT for a remote one (atomic)."""
    if isinstance(dest, Path):
        with atomic_path(dest) as tmp:
            shutil.copyfile(local, tmp)
        return
    with local.open("rb") as src, dest.fs.open_output_stream(dest.path) as out:
        shutil.copyfileobj(src, out)


def write_json(loc: "Path | RemotePath", obj) -> None:
    """Indented JSON, atomically (rename locally, one PUT remotely)."""
    if isinstance(loc, Path):
        _write_local_json(loc, obj)
    else:
        import json

        loc.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class RemotePath:
    """A path on a pyarrow filesystem, with the subset of ``pathlib.Path`` fcsae uses."""

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str, query: str = ""):
        self.fs, self.path, self.scheme, self.query = fs, path, scheme, query

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> "RemotePath":
        return RemotePath(self.fs, str(PurePosixPath(self.path) / str(part)), self.scheme, self.query)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, str(PurePosixPath(self.path).parent), self.scheme, self.query)

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_symlink(self) -> bool:
        return False

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.exists():
                raise FileNotFoundError(str(self)) from None
            raise e

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def iterdir(self) -> Iterator["RemotePath"]:
        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        for info in self.fs.get_file_info(sel):
            yield RemotePath(self.fs, info.path, self.scheme, self.query)

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Names in this directory matching ``pattern`` (one level, like ``Path.glob('*.parquet')``)."""
        return (p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def mirror(remote: RemotePath, local: Path) -> Path:
    """Make ``local`` a copy of the remote directory's files (new or changed ones fetched, gone ones dropped).

    Each file is fetched to a temporary name and renamed, so a concurrent
    reader of the mirror never sees a torn file. Returns ``local``.
    """
    local.mkdir(parents=True, exist_ok=True)
    sel = pafs.FileSelector(remote.path, recursive=True, allow_not_found=True)
    wanted = set()
    for info in remote.fs.get_file_info(sel):
        if info.type != pafs.FileType.File:
            continue
        rel = PurePosixPath(info.path).relative_to(remote.path)
        dest = local / rel
        wanted.add(dest)
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        if dest.exists() and dest.stat().st_size == info.size and abs(dest.stat().st_mtime - mtime) < 1e-3:
            continue
        with atomic_path(dest) as tmp:
            with remote.fs.open_input_stream(info.path) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
            os.utime(tmp, (mtime, mtime))
    for f in list(local.rglob("*")):
        if f.is_file() and f not in wanted and not f.name.startswith("."):
            f.unlink()
    return local
