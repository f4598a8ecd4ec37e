"""scripts/scale_pilot.py: its plan parsing, and its table from finished runs (no training here)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scale_pilot.py"


@pytest.fixture(scope="module")
def pilot():
    spec = importlib.util.spec_from_file_location("scale_pilot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_parses_counts(pilot):
    assert pilot.parse_plan("4096:1M,16384:300k, 512:2000") == [(4096, 1_000_000), (16384, 300_000), (512, 2000)]


@pytest.mark.parametrize("bad", ["", "4096", "4096:1M:2", "4096:x", "0:1M"])
def test_bad_plan_is_one_line(pilot, bad):
    with pytest.raises(SystemExit, match="--plan: expected comma-separated DICT:TOKENS"):
        pilot.parse_plan(bad)


def test_row_and_table_from_a_finished_run(pilot, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"n_tokens": 500_000}))
    run = tmp_path / "4096-1000000"
    run.mkdir()
    (run / "train.json").write_text(json.dumps({"metrics": {"fvu": 0.2}}))
    summary = {"letters_with_latent": 13, "n_letters": 20.0, "meaningful": True, "mean_absorption_fraction": 0.25,
               "mean_absorption_fraction_lo": 0.2, "mean_absorption_fraction_hi": 0.3, "mean_full_absorption": 0.1}
    (run / "eval.json").write_text(json.dumps({"core": {"explained_variance": 0.8, "ce_loss_score": 0.9, "l0": 32.0,
                                                        "frac_dead": 0.01}, "absorption": {"summary": summary}}))
    row = pilot.row_of(run, cache, 4096, 1_000_000, {"train": 60.0, "eval": 30.0})
    assert row["epochs"] == 2.0 and row["letters_with_latent"] == 13 and row["dead_frac"] == 0.01
    args = type("A", (), {"k": 32, "batch_size": 4096, "words": 4000, "core_tokens": 4096})()
    pilot.write_table([row], tmp_path / "pilot.md", cache, args)
    line = (tmp_path / "pilot.md").read_text().splitlines()[-1]
    assert line.startswith("| 4,096 | 1,000,000 | 2.0 | 0.800 | 0.900 | 32.0 | 0.010 | 13 of 20 | 0.250 [0.200, 0.300] |")
