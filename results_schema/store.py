"""Write one Parquet file per trial atomically (reading is ``results_schema.reader``'s).

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
import tempfile
from pathlib import Path
from typing import Any, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fcsae import storage
from fcsae.io import atomic_path
from results_schema.schema import PER_LETTER_SCHEMA, SCHEMA_VERSION, STATUSES, TRIAL_SCHEMA

log = logging.getLogger(__name__)

PER_LETTER_DIR = "per_letter"
"""Sub-directory of a results directory holding the per-letter child table."""
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_trial_id(trial_id: str) -> None:
    """Refuse a trial id that is not a plain file name (it names the row's file)."""
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


def _write(table: pa.Table, path: "Path | storage.RemotePath") -> None:
    if isinstance(path, storage.RemotePath):  # one PUT: atomic on an object store
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, Path(tmp) / path.name)
            storage.upload_file(Path(tmp) / path.name, path)
        return
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_trial(results_dir: "str | Path | storage.RemotePath", row: Mapping[str, Any],
                per_letter: pl.DataFrame | None = None) -> "Path | storage.RemotePath":
    """Write one trial's row (and its per-letter rows) atomically; returns the row's path.

    ``row`` maps column names to values; missing columns are null;
    ``schema_version`` is filled in. ``per_letter`` has the child table's
    letter columns (``letter``, ``probe_f1`` ...); ids are added here.
    ``results_dir`` may be a pyarrow filesystem URI (``s3://...``, see ``fcsae.storage``).
    """
    results_dir = storage.location(results_dir)
    row = dict(row)
    row["schema_version"] = SCHEMA_VERSION
    trial_id = row.get("trial_id") or ""
    check_trial_id(trial_id)
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
        letters_path = results_dir / PER_LETTER_DIR / f"{trial_id}.parquet"
        _write(_table(letters, PER_LETTER_SCHEMA), letters_path)
    else:
        letters_path = None
    path = results_dir / f"{trial_id}.parquet"
    try:
        _write(_table([row], TRIAL_SCHEMA), path)
    except BaseException:
        if letters_path is not None:  # a trial's files land together or not at all
            letters_path.unlink(missing_ok=True)
        raise
    return path
