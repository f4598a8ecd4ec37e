"""Atomic per-trial Parquet rows, schema versions, corrupt and empty directories, concurrent writers."""

import multiprocessing as mp
import threading
import time

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcsae.errors import FcsaeInputError
from results_schema import reader, schema, store


def _row(trial_id, status="ok", **extra):
    row = {"sweep_id": "s1", "sweep_name": "t", "trial_id": trial_id, "status": status,
           "split.criterion": "fc", "tracker.ema_alpha": 0.95, "sae.dict_size": 64,
           "core.explained_variance": 0.5, "absorption.mean_absorption_fraction": 0.1,
           "searched_params": ["split.criterion"]}
    row.update(extra)
    return row


def test_every_column_has_a_docstring():
    docs = schema.column_docs(schema.TRIAL_SCHEMA)
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    assert all(schema.column_docs(schema.PER_LETTER_SCHEMA).values())
    # config fields appear by their dotted names with their config docstring
    assert "ema_alpha" not in docs and "EMA decay" in docs["tracker.ema_alpha"]
    assert schema.TRIAL_SCHEMA.field("sae.dict_size").type == pa.int64()
    assert schema.TRIAL_SCHEMA.metadata[schema.METADATA_KEY] == schema.SCHEMA_VERSION.encode()


def test_write_and_scan_round_trip(tmp_path):
    letters = pl.DataFrame({"letter": ["a", "b"], "probe_f1": [0.9, 0.8], "mean_absorption_fraction": [0.1, 0.0],
                            "main_latents": [[1, 2], [3]],
                            "unknown_col": [1, 2]})
    store.write_trial(tmp_path, _row("t1"), per_letter=letters)
    store.write_trial(tmp_path, _row("t2", status="failed", failure_reason="boom"))
    df = reader.scan_results(tmp_path).sort("trial_id").collect()
    assert df["trial_id"].to_list() == ["t1", "t2"]
    assert df["status"].to_list() == ["ok", "failed"]
    assert df["schema_version"].to_list() == [schema.SCHEMA_VERSION] * 2
    assert df["core.mse"].null_count() == 2  # missing metric -> null, not 0
    pl_df = reader.scan_per_letter(tmp_path).collect()
    assert pl_df["trial_id"].to_list() == ["t1", "t1"] and "unknown_col" not in pl_df.columns
    assert reader.finished_trials(tmp_path) == {"t1": "ok", "t2": "failed"}
    assert reader.read_trial(tmp_path, "t2")["failure_reason"] == "boom"
    assert reader.read_trial(tmp_path, "t3") is None


def test_rewrite_replaces_row_without_duplicates(tmp_path):
    store.write_trial(tmp_path, _row("t1", status="failed"))
    store.write_trial(tmp_path, _row("t1"))
    df = reader.scan_results(tmp_path).collect()
    assert df.height == 1 and df["status"][0] == "ok"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_unknown_key_and_bad_status_refused(tmp_path):
    with pytest.raises(ValueError, match="not in the schema"):
        store.write_trial(tmp_path, _row("t1", bogus=1))
    with pytest.raises(ValueError, match="status"):
        store.write_trial(tmp_path, _row("t1", status="weird"))
    with pytest.raises(ValueError, match="safe file name"):
        store.write_trial(tmp_path, _row("../x"))
    assert not list(tmp_path.rglob("*.parquet"))


def test_empty_and_missing_dirs_are_clear_errors(tmp_path):
    with pytest.raises(FcsaeInputError, match="no result files"):
        reader.scan_results(tmp_path)
    with pytest.raises(FcsaeInputError, match="does not exist"):
        reader.scan_results(tmp_path / "nope")
    assert reader.finished_trials(tmp_path) == {}


def test_corrupt_file_named(tmp_path):
    store.write_trial(tmp_path, _row("t1"))
    bad = tmp_path / "t2.parquet"
    bad.write_bytes((tmp_path / "t1.parquet").read_bytes()[:100])
    with pytest.raises(FcsaeInputError, match="t2.parquet: not a readable Parquet"):
        reader.scan_results(tmp_path)


def test_unknown_major_refused_newer_minor_accepted(tmp_path):
    store.write_trial(tmp_path, _row("t1"))
    table = pq.read_table(tmp_path / "t1.parquet")
    newer_minor = table.replace_schema_metadata({schema.METADATA_KEY: b"1.7"})
    newer_minor = newer_minor.append_column("future_col", pa.array([1.0]))
    pq.write_table(newer_minor, tmp_path / "t2.parquet")
    df = reader.scan_results(tmp_path).collect()
    assert df.height == 2 and "future_col" not in df.columns
    pq.write_table(table.replace_schema_metadata({schema.METADATA_KEY: b"2.0"}), tmp_path / "t3.parquet")
    with pytest.raises(FcsaeInputError, match=r"t3.parquet: schema version 2.0 is not readable"):
        reader.scan_results(tmp_path)
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "t3.parquet")
    with pytest.raises(FcsaeInputError, match="t3.parquet: no fcsae schema version"):
        reader.scan_results(tmp_path)


def _writer(results_dir, n, worker):
    for i in range(n):
        store.write_trial(results_dir, _row(f"w{worker}_{i % 3}", **{"core.mse": float(i)}))


def test_concurrent_writers_never_produce_torn_files(tmp_path):
    """Two processes rewrite the same trial files while this one scans: every scan reads whole rows."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, 60, w)) for w in range(2)]
    for p in procs:
        p.start()
    scans, errors = 0, []
    while any(p.is_alive() for p in procs) or scans < 5:
        if reader.trial_files(tmp_path):
            try:
                df = reader.scan_results(tmp_path).collect()
                assert df["trial_id"].n_unique() == df.height
                scans += 1
            except Exception as e:  # any torn read is a failure
                errors.append(repr(e))
        time.sleep(0.005)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert not errors, errors[:3]
    assert scans >= 5
    final = reader.scan_results(tmp_path).collect()
    assert final.height == 6 and set(final["core.mse"].to_list()) == {57.0, 58.0, 59.0}


def test_1_0_rows_with_integer_k_read_beside_fractional_k(tmp_path):
    """Schema 1.1 made ``sae.k`` a float (batchtopk's fractional k); 1.0 files hold it as int64."""
    assert schema.TRIAL_SCHEMA.field("sae.k").type == pa.float64()
    assert schema.TRIAL_SCHEMA.field("sae.matryoshka_groups").type == pa.string()
    old = pa.table({"trial_id": ["old"], "status": ["ok"], "sae.k": pa.array([32], pa.int64())})
    pq.write_table(old.replace_schema_metadata({schema.METADATA_KEY: b"1.0"}), tmp_path / "old.parquet")
    store.write_trial(tmp_path, _row("new", **{"sae.k": 2.5, "sae.activation": "batchtopk"}))
    df = reader.scan_results(tmp_path).sort("trial_id").collect()
    assert df["sae.k"].to_list() == [2.5, 32.0]
    tables = reader.load_tables(tmp_path)
    assert tables.problems == [] and sorted(tables.trials["sae.k"].to_list()) == [2.5, 32.0]
