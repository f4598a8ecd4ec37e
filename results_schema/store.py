"""Write one Parquet file per trial atomically; scan a results directory with polars.

Layout of a results directory::

    results/<trial_id>.parquet              one row of TRIAL_SCHEMA
    results/per_letter/<trial_id>.parquet   that trial's per-letter absorption rows

Each file is written to a temporary name in the same directory and renamed
into place (``os.replace``), so concurrent readers never see a torn file and a
re-written trial replaces its row instead of duplicating it. The per-letter
file is written first: a trial's main row existing means its outputs are
complete.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path
from results_schema.schema import METADATA_KEY, PER_LETTER_SCHEMA, SCHEMA_VERSION, STATUSES, TRIAL_SCHEMA, major

log = logging.getLogger(__name__)

PER_LETTER_DIR = "per_letter"
"""Sub-directory of a results directory holding the per-letter child table."""
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_trial_id(trial_id: str) -> None:
    if not trial_id or not _SAFE_ID.match(trial_id):
        raise ValueError(f"trial_id {trial_id!r} is not a safe file name")


def _table(rows: list[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly ``schema``'s columns; unknown keys are a programming error."""
    names = set(schema.names)
    for row in rows:
        unknown = sorted(set(row) - names)
        if unknown:
            raise ValueError(f"result row has keys not in the schema: {', '.join(unknown)}")
    full = [{name: row.get(name) for name in schema.names} for row in rows]
    return pa.Table.from_pylist(full, schema=schema)


def _write(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_trial(results_dir: str | Path, row: Mapping[str, Any], per_letter: pl.DataFrame | None = None) -> Path:
    """Write one trial's row (and its per-letter rows) atomically; returns the row's path.

    ``row`` maps column names to values; missing columns are null;
    ``schema_version`` is filled in. ``per_letter`` has the child table's
    letter columns (``letter``, ``probe_f1`` ...); ids are added here.
    """
    results_dir = Path(results_dir)
    row = dict(row)
    row["schema_version"] = SCHEMA_VERSION
    trial_id = row.get("trial_id") or ""
    _check_trial_id(trial_id)
    if row.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
    if per_letter is not None and per_letter.height:
        known = [c for c in per_letter.columns if c in PER_LETTER_SCHEMA.names]
        dropped = sorted(set(per_letter.columns) - set(known))
        if dropped:
            log.warning("per-letter columns without a schema column dropped: %s", ", ".join(dropped))
        letters = per_letter.select(known).to_dicts()
        for r in letters:
            r.update(schema_version=SCHEMA_VERSION, sweep_id=row.get("sweep_id"), trial_id=trial_id)
        _write(_table(letters, PER_LETTER_SCHEMA), results_dir / PER_LETTER_DIR / f"{trial_id}.parquet")
    path = results_dir / f"{trial_id}.parquet"
    _write(_table([row], TRIAL_SCHEMA), path)
    return path


def _check_file(path: Path) -> None:
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
    for f in files:
        _check_file(f)
    # The current schema is the reference: older minors get the newer columns as nulls.
    reference = pl.from_arrow(schema.empty_table()).schema
    return pl.scan_parquet([str(f) for f in files], schema=reference, missing_columns="insert", extra_columns="ignore")


def trial_files(results_dir: str | Path) -> list[Path]:
    """The trial-row files of a results directory, sorted (no error if none)."""
    return sorted(Path(results_dir).glob("*.parquet"))


def scan_results(results_dir: str | Path) -> pl.LazyFrame:
    """A LazyFrame over all trial rows of a results directory, after checking every file's schema version.

    Raises ``FcsaeInputError`` for a missing or empty directory, a corrupt file
    or a file of an unknown major schema version (each message names the path).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FcsaeInputError(f"{results_dir}: results directory does not exist")
    files = trial_files(results_dir)
    if not files:
        raise FcsaeInputError(f"{results_dir}: no result files (*.parquet) yet; has any trial finished?")
    return _scan(files, TRIAL_SCHEMA)


def scan_per_letter(results_dir: str | Path) -> pl.LazyFrame:
    """A LazyFrame over the per-letter absorption rows of a results directory (join on ``trial_id``)."""
    sub = Path(results_dir) / PER_LETTER_DIR
    files = sorted(sub.glob("*.parquet")) if sub.is_dir() else []
    if not files:
        raise FcsaeInputError(f"{sub}: no per-letter result files; did any trial run the absorption eval?")
    return _scan(files, PER_LETTER_SCHEMA)


def read_trial(results_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The stored row of one trial as a dict, or None if the trial has no (readable) row yet."""
    _check_trial_id(trial_id)
    path = Path(results_dir) / f"{trial_id}.parquet"
    if not path.exists():
        return None
    try:
        _check_file(path)
        rows = pq.read_table(path).to_pylist()
    except FcsaeInputError as e:
        log.warning("ignoring unreadable row: %s", e)
        return None
    return rows[0] if rows else None


def finished_trials(results_dir: str | Path) -> dict[str, str]:
    """trial_id -> status for every trial with a row (empty dict if none)."""
    files = trial_files(results_dir)
    if not files:
        return {}
    df = scan_results(results_dir).select("trial_id", "status").collect()
    return dict(zip(df["trial_id"].to_list(), df["status"].to_list()))
