"""The compact end-of-sweep summary: intervals against a hand computation, verdicts that admit noise, no ranking."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from scipy.stats import t

from fcsae.report.summary import arm_keys, format_summary, summary_frame, summary_text, verdict
from results_schema.reader import load_tables
from tests._report_utils import FC_EFFECT, write_sweep

KEYS = ["split.criterion"]


def _rows(values: dict[str, list[float]], **extra) -> pl.DataFrame:
    rows = []
    for crit, vals in values.items():
        for i, v in enumerate(vals):
            rows.append({"trial_id": f"{crit}{i}", "status": "ok", "split.criterion": crit, "trainer.seed": i,
                         "absorption.mean_absorption_fraction": v, "core.explained_variance": 0.8, "core.l0": 32.0,
                         "core.ce_loss_score": 0.9, "n_split_events": 4 if crit == "fc" else 0,
                         "n_resample_events": 0, **{k: f(crit, i) for k, f in extra.items()}})
    return pl.DataFrame(rows)


def test_seed_spread_interval_matches_a_t_interval_and_respects_zero():
    vals = [0.010, 0.014, 0.003]
    f = summary_frame(_rows({"none": vals, "fc": [0.001, 0.002, 0.0015]}), KEYS)
    none = f.filter(pl.col("split.criterion") == "none").row(0, named=True)
    mean = sum(vals) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    half = t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert math.isclose(none["absorption"], mean)
    assert math.isclose(none["hi"], mean + half)
    assert none["lo"] == 0.0 < mean - half + 1  # mean - half is negative here: clipped at 0, the range of a fraction
    assert mean - half < 0
    assert none["n"] == 3 and none["interval"] == "trials"
    assert math.isclose(none["sd"], sd)


def test_one_trial_per_arm_says_noise_and_never_ranks():
    rows = _rows({"fc": [0.0101], "dead": [0.0070], "none": [0.0090]})
    f = summary_frame(rows, KEYS)
    assert f["split.criterion"].to_list() == ["none", "dead", "fc"]  # canonical order, not sorted by absorption
    v = verdict(f, KEYS)
    assert "cannot be told from noise" in v and "do not rank" in v
    text = format_summary(f, KEYS)
    assert "[no interval]" in text and "lower is better" in text
    assert "resamples" not in text  # no arm resampled: the column says nothing
    assert "32 " in text and "32.0000" not in text
    assert all(r["sd"] is None for r in f.iter_rows(named=True))  # one trial: no spread


def test_word_bootstrap_intervals_give_a_verdict_per_arm():
    lo = {"none": 0.006, "dead": 0.005, "fc": 0.0001}
    hi = {"none": 0.012, "dead": 0.011, "fc": 0.002}
    rows = _rows({"none": [0.009], "dead": [0.008], "fc": [0.001]},
                 **{"absorption.mean_absorption_fraction_lo": lambda c, i: lo[c],
                    "absorption.mean_absorption_fraction_hi": lambda c, i: hi[c]})
    f = summary_frame(rows, KEYS)
    v = verdict(f, KEYS)
    assert "dead within noise of none" in v and "fc lower than none" in v and "word sampling only" in v
    assert "[0.006, 0.012]" in format_summary(f, KEYS)


def test_not_meaningful_absorption_is_flagged():
    rows = _rows({"none": [0.01, 0.02], "fc": [0.01, 0.02]}, **{"absorption.meaningful": lambda c, i: False})
    assert "not meaningful" in verdict(summary_frame(rows, KEYS), KEYS)


def test_planted_effect_is_found_on_the_synthetic_sweep(tmp_path):
    results = write_sweep(tmp_path / "exp", seeds=tuple(range(12)), n_failed=1)
    trials = load_tables(results).trials
    keys = arm_keys(["split.criterion", "trainer.seed"], trials)
    assert keys == KEYS
    text = summary_text(trials, keys, tmp_path / "exp", ".venv/bin/")
    assert "fc lower than none" in text and "dead within noise of none" in text, text  # FC_EFFECT = 0.05
    assert FC_EFFECT > 0
    assert "(+1 failed)" in text
    assert f".venv/bin/fcsae-report {tmp_path / 'exp'}" in text and "--recipe best" in text
    assert max(len(line) for line in text.splitlines()[:4]) < 120  # compact: fits a terminal


def test_next_commands_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    from fcsae.report.summary import next_commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments" / "quickstart").mkdir(parents=True)
    cmds = next_commands(Path("experiments/quickstart").resolve(), ".venv/bin/")
    assert cmds[0].startswith(".venv/bin/fcsae-report experiments/quickstart ")


def test_verdict_baseline_is_topk_none_when_arms_span_architectures():
    keys = ["sae.activation", "split.criterion"]
    rows = []
    for arch, crit, vals in (("matryoshka", "none", [0.20, 0.21, 0.22]), ("topk", "none", [0.50, 0.51, 0.52]),
                             ("topk", "fc", [0.49, 0.50, 0.53])):
        for seed, v in enumerate(vals):
            rows.append({"trial_id": f"{arch}{crit}{seed}", "status": "ok", "sae.activation": arch, "split.criterion": crit,
                         "trainer.seed": seed, "absorption.mean_absorption_fraction": v})
    v = verdict(summary_frame(pl.DataFrame(rows), keys), keys)
    assert "matryoshka none lower than topk none" in v and "topk fc within noise of topk none" in v
