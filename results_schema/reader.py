"""The one reader of result directories: every part of fcsae that reads trial rows calls this module.

Two modes over the same per-file check (readable Parquet, fcsae metadata,
known major schema version):

- strict (``scan_results``, ``scan_per_letter``, ``finished_trials``): any bad
  file raises ``FcsaeInputError`` naming it; the sweep driver resumes from this.
- tolerant (``load_tables``): a bad file is skipped with one problem line naming
  it, so one torn trial does not hide the others; the queries and the report
  read through this.

Rows of older minor schema versions are read against the current schema (their
missing columns are null). The directory layout is ``results_schema.store``'s.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fcsae import storage
from fcsae.errors import FcsaeInputError
from results_schema.schema import METADATA_KEY, PER_LETTER_SCHEMA, SCHEMA_VERSION, TRIAL_SCHEMA, major
from results_schema.store import PER_LETTER_DIR, check_trial_id

log = logging.getLogger(__name__)


class ResultTables(NamedTuple):
    """The readable rows of a results directory and what could not be read."""

    trials: pl.DataFrame
    """Trial rows (current schema's columns; older minors' missing columns are null)."""
    letters: pl.DataFrame
    """Per-letter rows of the trials in ``trials`` (empty when no trial ran the absorption eval)."""
    problems: list[str]
    """One line per skipped file, naming it and why."""
    results_dir: Path
    """The ``results`` directory that was read."""
    schema_versions: list[str]
    """Distinct schema versions of the readable trial rows, sorted."""


def local_dir(results_dir: "str | Path | storage.RemotePath") -> Path:
    """A local results directory: ``results_dir`` itself, or a node-local mirror of a remote one, synced now.

    The mirror (``$FCSAE_HOME/mirror/...``) also gets the experiment's ``sweep.json``, so everything downstream
    reads local files (``fcsae query``, ``fcsae-report`` and the driver alike).
    """
    if not storage.is_uri(results_dir) and not isinstance(results_dir, storage.RemotePath):
        return Path(results_dir)
    remote = storage.location(results_dir)
    local = storage.local_cache(remote.parent, "mirror")
    storage.mirror(remote, local / remote.name)
    marker = remote.parent / "sweep.json"
    if marker.is_file():
        (local / "sweep.json").write_bytes(marker.read_bytes())
    return local / remote.name


def resolve_results_dir(path: "str | Path | storage.RemotePath") -> Path:
    """``path`` itself, or ``path/results`` when ``path`` is an experiment directory (holds ``results/``).

    A pyarrow filesystem URI (``s3://bucket/prefix/exp``) is read through a local mirror (``local_dir``).
    """
    if storage.is_uri(path) or isinstance(path, storage.RemotePath):
        remote = storage.location(path)
        if not remote.is_dir():
            raise FcsaeInputError(f"{remote}: results directory does not exist; pass <experiment>/results or <experiment>")
        if (remote / "results").is_dir() and not any(remote.glob("*.parquet")):
            remote = remote / "results"
        return local_dir(remote)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FcsaeInputError(f"{path}: results directory does not exist; pass <experiment>/results or <experiment>")
    if (path / "results").is_dir() and not any(path.glob("*.parquet")):
        return path / "results"
    return path


def trial_files(results_dir: str | Path) -> list[Path]:
    """The trial-row files of a results directory, sorted (no error if none)."""
    return sorted(local_dir(results_dir).glob("*.parquet"))


def per_letter_files(results_dir: str | Path) -> list[Path]:
    """The per-letter files of a results directory, sorted (no error if none)."""
    sub = local_dir(results_dir) / PER_LETTER_DIR
    return sorted(sub.glob("*.parquet")) if sub.is_dir() else []


def check_file(path: Path) -> None:
    """Refuse a corrupt file or one of an unknown major schema version, naming the file."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as e:  # pyarrow raises several types for torn or foreign files
        raise FcsaeInputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); delete it or re-run its trial") from None
    version = meta.get(METADATA_KEY, b"").decode() or None
    if version is None:
        raise FcsaeInputError(f"{path}: no fcsae schema version in its metadata; not an fcsae result file")
    try:
        file_major = major(version)
    except ValueError:
        raise FcsaeInputError(f"{path}: malformed schema version {version!r}; expected MAJOR.MINOR") from None
    if file_major != major(SCHEMA_VERSION):
        raise FcsaeInputError(
            f"{path}: schema version {version} is not readable by this fcsae (reads {major(SCHEMA_VERSION)}.x); "
            "use the fcsae version that wrote it")


def _scan(files: list[Path], schema: pa.Schema) -> pl.LazyFrame:
    """Check every file, then one lazy scan against the current schema (older minors get nulls)."""
    for f in files:
        check_file(f)
    reference = pl.from_arrow(schema.empty_table()).schema
    # allow-float: sae.k became a float column in 1.1 (fractional k for batchtopk); 1.0 files hold it as int64.
    return pl.scan_parquet([str(f) for f in files], schema=reference, missing_columns="insert", extra_columns="ignore",
                           cast_options=pl.ScanCastOptions(integer_cast="allow-float"))


# ------------------------------------------------------------------ strict


def scan_results(results_dir: str | Path) -> pl.LazyFrame:
    """A LazyFrame over all trial rows of a results directory, after checking every file's schema version.

    Raises ``FcsaeInputError`` for a missing or empty directory, a corrupt file
    or a file of an unknown major schema version (each message names the path).
    """
    results_dir = local_dir(results_dir)
    if not results_dir.is_dir():
        raise FcsaeInputError(f"{results_dir}: results directory does not exist")
    files = trial_files(results_dir)
    if not files:
        raise FcsaeInputError(f"{results_dir}: no result files (*.parquet) yet; has any trial finished?")
    return _scan(files, TRIAL_SCHEMA)


def scan_per_letter(results_dir: str | Path) -> pl.LazyFrame:
    """A LazyFrame over the per-letter absorption rows of a results directory (join on ``trial_id``)."""
    files = per_letter_files(results_dir)
    if not files:
        raise FcsaeInputError(f"{local_dir(results_dir) / PER_LETTER_DIR}: no per-letter result files; "
                              "did any trial run the absorption eval?")
    return _scan(files, PER_LETTER_SCHEMA)


def finished_trials(results_dir: str | Path) -> dict[str, str]:
    """trial_id -> status for every trial with a row (empty dict if none)."""
    results_dir = local_dir(results_dir)
    if not trial_files(results_dir):
        return {}
    df = scan_results(results_dir).select("trial_id", "status").collect()
    return dict(zip(df["trial_id"].to_list(), df["status"].to_list()))


# ------------------------------------------------------------------ tolerant


def read_trial(results_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The stored row of one trial as a dict, or None if the trial has no (readable) row yet."""
    check_trial_id(trial_id)
    if storage.is_uri(results_dir) or isinstance(results_dir, storage.RemotePath):
        return _read_remote_trial(storage.location(results_dir) / f"{trial_id}.parquet")
    path = Path(results_dir) / f"{trial_id}.parquet"
    if not path.exists():
        return None
    try:
        check_file(path)
        rows = pq.read_table(path).to_pylist()
    except FcsaeInputError as e:
        log.warning("ignoring unreadable row: %s", e)
        return None
    return rows[0] if rows else None


def _read_remote_trial(remote: "storage.RemotePath") -> dict[str, Any] | None:
    """One remote row without mirroring the whole directory (a trial asks this at every start)."""
    if not remote.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / remote.name
        local.write_bytes(remote.read_bytes())
        return read_trial(tmp, remote.stem)


def _read_each(files: list[Path], schema: pa.Schema, problems: list[str]) -> pl.DataFrame:
    """Read file by file so a bad file is skipped and named instead of failing the whole read."""
    frames = []
    for f in files:
        try:
            frames.append(_scan([f], schema).collect())
        except FcsaeInputError as e:
            problems.append(str(e))
        except Exception as e:  # a torn data page can pass the footer check and fail on read
            problems.append(f"{f}: not a readable Parquet file ({type(e).__name__}: {e}); delete it or re-run its trial")
    if not frames:
        return pl.from_arrow(schema.empty_table())
    return pl.concat(frames, how="vertical")


def load_tables(path: str | Path) -> ResultTables:
    """Trials and per-letter rows of a results (or experiment) directory, skipping unreadable files.

    Raises ``FcsaeInputError`` when the directory is missing, holds no result
    files, or none of its trial files is readable (the message lists why).
    """
    results_dir = resolve_results_dir(path)
    files = trial_files(results_dir)
    if not files:
        raise FcsaeInputError(f"{results_dir}: no result files (*.parquet); has any trial finished?")
    problems: list[str] = []
    trials = _read_each(files, TRIAL_SCHEMA, problems)
    if trials.height == 0:
        raise FcsaeInputError(f"{results_dir}: no readable trial rows ({len(problems)} bad files); first: {problems[0]}")
    letters = _read_each(per_letter_files(results_dir), PER_LETTER_SCHEMA, problems)
    # A per-letter file is written before its trial row: without the row the trial is not finished.
    letters = letters.filter(pl.col("trial_id").is_in(trials["trial_id"].implode()))
    for p in problems:
        log.debug("skipped: %s", p)
    versions = sorted(v for v in trials["schema_version"].unique().to_list() if v is not None)
    return ResultTables(trials, letters, problems, results_dir, versions)
