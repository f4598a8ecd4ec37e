"""fcsae-report: Pareto fronts, seed statistics, figures with labelled axes, full/partial/bad-input builds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcsae.plotting import save_png, unlabelled_axes
from fcsae.report import build as report_mod
from fcsae.report import figures as figs
from fcsae.report import tables as rt
from fcsae.report.build import build_report
from fcsae.report.cli import main as report_main
from results_schema.schema import SCHEMA_VERSION
from tests._report_utils import write_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ pure parts


def test_pareto_mask_hand_checked():
    # x = absorption (min), y = explained variance (max).
    x = [0.10, 0.20, 0.30, 0.10, float("nan"), 0.05, 0.25, None]
    y = [0.50, 0.90, 0.80, 0.50, 1.00, 0.10, 0.90, 0.99]
    # (0.3, 0.8) is dominated by (0.2, 0.9); (0.25, 0.9) by (0.2, 0.9) (worse x, same y);
    # the duplicate (0.1, 0.5) points are both on the front; NaN/None never are.
    assert rt.pareto_mask(x, y, "min", "max") == [True, True, False, True, False, True, False, False]
    # Both minimised: only the smallest x and the smallest y survive here.
    assert rt.pareto_mask([1, 2, 3, 0.5], [3, 1, 2, 4], "min", "min") == [True, True, False, True]
    assert rt.pareto_mask([], [], "min", "max") == []
    with pytest.raises(ValueError):
        rt.pareto_mask([1], [1], "low", "max")


def _frame(values: dict[str, list[float]]) -> pl.DataFrame:
    rows = []
    for crit, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"trial_id": f"{crit}{seed}", "split.criterion": crit, "trainer.seed": seed, "status": "ok",
                         rt.ABSORPTION: v})
    return pl.DataFrame(rows)


def test_seed_stats_average_each_seed_first():
    df = pl.DataFrame({"trial_id": ["a", "b", "c"], "split.criterion": ["fc"] * 3, "trainer.seed": [0, 0, 1],
                       rt.ABSORPTION: [0.1, 0.3, 0.5]})
    s = rt.seed_stats(df, "split.criterion", rt.ABSORPTION).row(0, named=True)
    # seed 0 -> 0.2, seed 1 -> 0.5: mean 0.35, std across the two seed means.
    assert s["n_trials"] == 3 and s["n_seeds"] == 2
    assert s["mean"] == pytest.approx(0.35) and s["std"] == pytest.approx(math.sqrt(2) * 0.15)
    assert s["se"] == pytest.approx(0.15)


def test_comparison_reads_a_clear_effect_and_a_null_one():
    df = _frame({"none": [0.30, 0.32, 0.31], "fc": [0.20, 0.22, 0.21], "dead": [0.31, 0.30, 0.33]})
    cmp = rt.criterion_comparison(df, [rt.ABSORPTION])
    fc = cmp.filter(pl.col("criterion") == "fc").row(0, named=True)
    assert fc["Δ vs none"] == pytest.approx(-0.10)
    assert fc["Δ SE"] == pytest.approx(math.sqrt(2 * 0.01 ** 2 / 3))
    assert cmp.filter(pl.col("criterion") == "none")["Δ vs none"].item() is None
    text = " ".join(rt.comparison_sentences(cmp, rt.ABSORPTION))
    assert "`fc`" in text and "lower than the baseline" in text
    assert "`dead`" in text and "no measurable difference" in text


def test_comparison_without_baseline_says_so():
    cmp = rt.criterion_comparison(_frame({"fc": [0.2, 0.3]}), [rt.ABSORPTION])
    assert "no comparison" in rt.comparison_sentences(cmp, rt.ABSORPTION)[0]


def test_architectures_compared_at_matched_measured_l0():
    rows = []
    for arch, l0s, absorption in (("topk", (16.0, 32.0), 0.4), ("matryoshka", (15.2, 30.9), 0.1)):
        for l0 in l0s:
            for seed in (0, 1):
                rows.append({"trial_id": f"{arch}{l0}{seed}", "sae.activation": arch, rt.CRITERION: "none",
                             rt.SEED: seed, rt.L0: l0 + 0.1 * seed, rt.ABSORPTION: absorption + 0.02 * seed + l0 / 1000})
    table = rt.architecture_comparison(pl.DataFrame(rows), [rt.ABSORPTION, rt.L0])
    assert table["L0 bin"].to_list() == [16.0, 16.0, 32.0, 32.0]  # 15.2 and 16.0 are matched; so are 30.9 and 32.0
    assert table["architecture"].to_list() == ["matryoshka", "topk", "matryoshka", "topk"]
    row = table.row(3, named=True)
    assert row["n_seeds"] == 2 and row[rt.ABSORPTION] == pytest.approx(0.4 + 0.01 + 0.032)
    assert row[f"{rt.ABSORPTION} std"] == pytest.approx(0.02 / math.sqrt(2))
    assert rt.architecture_comparison(pl.DataFrame(rows).filter(pl.col("sae.activation") == "topk"), [rt.ABSORPTION]).height == 0


def test_batchtopk_seeds_just_under_their_k_share_one_bin_with_topk():
    """The study's L0s (BatchTopK k 32: 29.81, 30.07, 30.19): bins of 4 put them in 28 and 32, split across seeds."""
    rows = [{"trial_id": f"b{s}", "sae.activation": "batchtopk", rt.CRITERION: "none", rt.SEED: s, rt.L0: l0,
             rt.ABSORPTION: 0.6} for s, l0 in enumerate((29.81, 30.07, 30.19))]
    rows += [{"trial_id": f"t{s}", "sae.activation": "topk", rt.CRITERION: "none", rt.SEED: s, rt.L0: 32.0,
              rt.ABSORPTION: 0.5} for s in range(3)]
    table = rt.architecture_comparison(pl.DataFrame(rows), [rt.ABSORPTION])
    assert table["L0 bin"].to_list() == [32.0, 32.0] and table["n_seeds"].to_list() == [3, 3]


def test_architecture_sentences_against_topk_none_with_seed_se():
    rows = []
    for arch, vals in (("topk", (0.50, 0.52, 0.54)), ("matryoshka", (0.20, 0.22, 0.24)), ("batchtopk", (0.49, 0.53, 0.55))):
        for seed, v in enumerate(vals):
            rows.append({"trial_id": f"{arch}{seed}", "sae.activation": arch, rt.CRITERION: "none", rt.SEED: seed,
                         rt.L0: 32.0, rt.ABSORPTION: v})
    rows.append({"trial_id": "fc0", "sae.activation": "topk", rt.CRITERION: "fc", rt.SEED: 0, rt.L0: 32.0,
                 rt.ABSORPTION: 0.1})
    df = pl.DataFrame(rows)
    lines = rt.architecture_sentences(rt.architecture_comparison(df, [rt.ABSORPTION]), rt.ABSORPTION)
    assert len(lines) == 2  # batchtopk and matryoshka vs topk none; the fc cell is not an architecture's baseline
    mat = next(line for line in lines if "`matryoshka`" in line)
    se = math.sqrt(2 * 0.02 ** 2 / 3)  # std 0.02 on both sides, 3 seeds each
    assert f"Δ = -0.3 ± {se:.2g} SE" in mat and "SE lower than topk" in mat
    assert "no measurable difference" in next(line for line in lines if "`batchtopk`" in line)
    # The criteria are compared within topk only: batchtopk/matryoshka 'none' must not enter topk's baseline.
    cmp = rt.criterion_comparison(df, [rt.ABSORPTION])
    assert cmp["architecture"].unique().to_list() == ["topk"]
    base = cmp.filter(pl.col("criterion") == "none").row(0, named=True)
    assert base["mean"] == pytest.approx(0.52) and base["n_seeds"] == 3
    assert rt.comparison_sentences(cmp, rt.ABSORPTION)[0].startswith("topk: `fc`")


def test_letter_stats_keep_architectures_apart(tmp_path):
    ok = pl.DataFrame({"trial_id": ["t0", "t1", "m0", "m1"], "sae.activation": ["topk", "topk", "matryoshka", "matryoshka"],
                       rt.CRITERION: ["none"] * 4})
    letters = pl.DataFrame({"trial_id": ["t0", "t1", "m0", "m1"], "letter": ["a"] * 4,
                            "mean_absorption_fraction": [0.5, 0.5, 0.9, 0.7]})
    stats = rt.letter_stats(ok, letters)
    assert dict(zip(stats[rt.CRITERION], stats["mean"])) == pytest.approx({"none": 0.5, "matryoshka none": 0.8})
    assert save_png(figs.letters_figure(stats), tmp_path / "l.png").is_file()


def test_quartile_bins_hand_checked():
    df = pl.DataFrame({"p": [1.0, 2, 3, 4, 5, 6, 7, 8]})
    b = rt.with_bins(df, "p")
    assert b["bin_index"].to_list() == [0, 0, 1, 1, 2, 2, 3, 3]  # edges 1, 2.75, 4.5, 6.25, 8
    assert b["bin"][0] == "Q1: 1–2.75" and b["bin"][7] == "Q4: 6.25–8"
    assert b["bin_centre"].to_list() == [1.5, 1.5, 3.5, 3.5, 5.5, 5.5, 7.5, 7.5]
    const = rt.with_bins(pl.DataFrame({"p": [2.0, 2.0]}), "p")
    assert const["bin_index"].to_list() == [0, 0]


# ------------------------------------------------------------------ figures


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("rep") / "exp", seeds=(0, 1, 2), per_cell=2)


def _check_axes(fig, legend: bool = True):
    assert unlabelled_axes(fig) == []
    for ax in fig.axes:
        if ax.has_data():
            assert ax.get_xlabel().strip() and ax.get_ylabel().strip()
            if legend:
                assert ax.get_legend() is not None


def test_every_figure_has_labelled_axes_and_a_legend(sweep):
    from results_schema.reader import load_tables

    t = load_tables(sweep)
    ok = rt.ok_trials(t.trials)
    mask = rt.pareto_mask(ok[rt.ABSORPTION].to_list(), ok[rt.EV].to_list(), "min", "max")
    built = [figs.pareto_figure(ok, rt.ABSORPTION, rt.EV, mask, "min", "max"),
             figs.categorical_effect_figure(ok, "split.criterion", [rt.ABSORPTION, rt.EV]),
             figs.numeric_effect_figure(ok, "tracker.ema_alpha", [rt.ABSORPTION]),
             figs.letters_figure(rt.letter_stats(ok, t.letters)),
             figs.split_events_figure(rt.event_curves(ok)[0])]
    for fig in built:
        _check_axes(fig)
        plt.close(fig)
    fig = figs.event_counts_figure(ok)
    _check_axes(fig, legend=False)
    plt.close(fig)
    # Units are in the labels.
    fig = figs.pareto_figure(ok, rt.ABSORPTION, rt.L0, mask, "min", "min")
    assert "active latents per token" in fig.axes[0].get_ylabel()
    plt.close(fig)


def test_save_png_refuses_unlabelled_axes(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_xlabel("x (units)")
    with pytest.raises(ValueError, match="unlabelled axes"):
        save_png(fig, tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_event_curves_follow_the_logs(sweep):
    from results_schema.reader import load_tables

    ok = rt.ok_trials(load_tables(sweep).trials)
    curves, n = rt.event_curves(ok)
    assert n == ok.height
    last = curves.group_by("trial_id").agg(pl.col("cumulative").max(), pl.col("split.criterion").first())
    assert set(last.filter(pl.col("split.criterion") == "fc")["cumulative"]) == {6}
    assert set(last.filter(pl.col("split.criterion") == "none")["cumulative"]) == {0}
    # Tokens are steps x batch size (256): the first fc split is at step 5.
    fc = curves.filter((pl.col("split.criterion") == "fc") & (pl.col("cumulative") == 1))
    assert set(fc["tokens"]) == {5 * 256}
    # Another architecture's trials are their own arm, never pooled into topk's `none`.
    mixed = ok.with_columns(pl.when(pl.col("trial_id") == ok["trial_id"][0]).then(pl.lit("batchtopk"))
                            .otherwise(pl.lit("topk")).alias("sae.activation"))
    arms = rt.event_curves(mixed)[0].group_by("trial_id").agg(pl.col("split.criterion").first())
    first = arms.filter(pl.col("trial_id") == ok["trial_id"][0])["split.criterion"].item()
    assert first == f"batchtopk {ok['split.criterion'][0]}" and "batchtopk" not in " ".join(
        arms.filter(pl.col("trial_id") != ok["trial_id"][0])["split.criterion"])


# ------------------------------------------------------------------ whole reports


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_full_report_builds(sweep, capsys):
    out = sweep.parent / "report"
    assert report_main([str(sweep)]) == 0
    assert "report: " in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for heading in ("## Status", "## Per arm", "## Best trials per objective", "## Baseline vs split criteria", "## Pareto fronts",
                    "## Effect of each searched parameter", "## Per-letter absorption", "## Split events over training"):
        assert heading in md
    assert "PARTIAL" not in md and "## Problems" not in md
    assert "19 (18 ok, 1 failed, 0 pruned) of 19 asked for" in md
    arms = md.split("## Per arm")[1].split("\n## ")[0]
    # No grid in this sweep's space (random search only): the arms are the split criteria.
    assert "| split.criterion | n | failed | absorption mean | absorption sd | 95% lo | 95% hi |" in arms and "Verdict" in arms
    assert "tracker.ema_alpha" not in arms
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert {"pareto_absorption_ev.png", "pareto_absorption_l0.png", "effect_split_criterion.png",
            "effect_sae_dict_size.png", "effect_tracker_ema_alpha.png", "letters_absorption.png", "split_events.png"} <= names
    for p in (out / "figures").glob("*.png"):
        _assert_png(p)
        assert f"figures/{p.name}" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(names)
    assert list((out / "tables").glob("*.csv"))
    # A second run replaces the report in place and leaves no temporary directories.
    assert report_main([str(sweep.parent)]) == 0
    assert [p.name for p in sweep.parent.iterdir() if p.name.startswith(".")] == []


def test_report_builds_without_ray(tmp_path):
    """The report needs polars and matplotlib only: it must build where Ray cannot even be imported."""
    import subprocess
    import sys

    results = write_sweep(tmp_path / "exp", seeds=(0, 1), n_failed=0, events=False)
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
            "from fcsae.report.cli import main\n"
            f"sys.exit(main([{str(results)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "exp" / "report" / "report.md").is_file()


def test_partial_sweep_says_so(tmp_path, capsys):
    results = write_sweep(tmp_path / "exp", seeds=(0, 1), num_samples=12, n_failed=0, events=False)
    (tmp_path / "exp" / "trials" / "t999").mkdir(parents=True)  # a trial in flight: a directory, no row
    res = build_report(results)
    assert res.partial
    md = res.markdown.read_text()
    assert "**PARTIAL RESULTS**" in md and "6 (6 ok, 0 failed, 0 pruned) of 12 asked for" in md
    assert "t999" in md
    # Without event logs the counts from the rows are plotted instead.
    assert "No trial's events.jsonl is reachable" in md and (res.out_dir / "figures" / "event_counts.png").exists()
    assert report_main([str(results)]) == 0
    assert "PARTIAL" in capsys.readouterr().out


def test_bad_files_are_named_and_the_rest_builds(tmp_path, capsys):
    results = write_sweep(tmp_path / "exp", seeds=(0, 1), n_failed=0)
    (results / "zz_torn.parquet").write_bytes(b"PAR1 torn")
    future = pa.table({"trial_id": ["f1"], "status": ["ok"]}).replace_schema_metadata({b"fcsae.schema_version": b"2.0"})
    pq.write_table(future, results / "zz_future.parquet")
    # A newer minor version of the same major, with an extra column: readable, its row counted.
    cols = {"trial_id": ["m1"], "status": ["ok"], "split.criterion": ["fc"], "trainer.seed": [0], "schema_version": ["1.7"],
            rt.ABSORPTION: [0.2], rt.EV: [0.8], "core.l0": [31.5], "new.column": [1.0]}
    minor = pa.table(cols).replace_schema_metadata({b"fcsae.schema_version": b"1.7"})
    pq.write_table(minor, results / "zz_minor.parquet")
    (results / "per_letter" / "t000.parquet").write_bytes(b"broken")
    assert report_main([str(results)]) == 0
    captured = capsys.readouterr()
    md = (tmp_path / "exp" / "report" / "report.md").read_text()
    assert "## Problems" in md
    for name in ("zz_torn.parquet", "zz_future.parquet", "per_letter/t000.parquet"):
        assert name in md and name in captured.err
    assert "2.0" in md and f"Schema versions of the rows: {SCHEMA_VERSION}, 1.7" in md
    assert "7 (7 ok" in md  # 6 synthetic + the minor-version row
    assert (tmp_path / "exp" / "report" / "figures" / "letters_absorption.png").exists()


def test_a_failing_section_does_not_cost_the_others(tmp_path, monkeypatch):
    results = write_sweep(tmp_path / "exp", seeds=(0,), n_failed=0, events=False)

    def boom(ctx):
        raise RuntimeError("planted failure")

    sections = [(t, boom if t == "per-letter absorption" else f) for t, f in report_mod.SECTIONS]
    monkeypatch.setattr(report_mod, "SECTIONS", sections)
    res = build_report(results)
    md = res.markdown.read_text()
    assert "section 'per-letter absorption' could not be built: RuntimeError: planted failure" in md
    assert "## Pareto fronts" in md and (res.out_dir / "figures" / "pareto_absorption_ev.png").exists()


def test_nothing_to_build_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no result files" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t0.parquet").write_bytes(b"junk")
    assert report_main([str(bad)]) == 2
    assert "t0.parquet" in capsys.readouterr().err
    assert not (bad / "report").exists()
    assert report_main([str(tmp_path / "missing")]) == 2


def test_out_dir_that_is_not_a_report_is_refused(tmp_path, capsys):
    results = write_sweep(tmp_path / "exp", seeds=(0,), n_failed=0, events=False)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "data.txt").write_text("mine")
    assert report_main([str(results), "--out", str(keep)]) == 2
    assert "--out:" in capsys.readouterr().err and (keep / "data.txt").read_text() == "mine"


def test_rebuild_keeps_files_the_report_did_not_write(tmp_path, capsys):
    """A rebuild replaces the report's own files and keeps a user's notes beside them (docs/results/* hold READMEs)."""
    results = write_sweep(tmp_path / "exp", seeds=(0,), n_failed=0, events=False)
    out = tmp_path / "rep"
    first = build_report(results, out)
    assert json.loads((out / ".fcsae-report.json").read_text())["files"]
    (out / "README.md").write_text("how this was run")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("mine")
    (out / "figures" / "extra.png").write_bytes(b"user figure")
    (out / "figures" / first.figures[0].name).write_bytes(b"stale")  # the report's own file: replaced
    res = build_report(results, out)
    assert (out / "README.md").read_text() == "how this was run" and (out / "notes" / "a.txt").read_text() == "mine"
    assert (out / "figures" / "extra.png").read_bytes() == b"user figure"
    assert res.figures[0].read_bytes() != b"stale" and res.markdown.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep")]  # no set-aside or temp dir left
    # A user file where the new report writes: refused before anything moves, everything still there.
    (out / "figures" / "extra.png").unlink()
    manifest = json.loads((out / ".fcsae-report.json").read_text())
    manifest["files"].remove("report.html")
    (out / ".fcsae-report.json").write_text(json.dumps(manifest))
    (out / "report.html").write_text("<p>mine</p>")
    assert report_main([str(results), "--out", str(out)]) == 2
    assert "report.html was not written by fcsae-report" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "<p>mine</p>" and (out / "README.md").is_file()


def test_rebuild_of_a_report_without_manifest_keeps_top_level_files(tmp_path):
    results = write_sweep(tmp_path / "exp", seeds=(0,), n_failed=0, events=False)
    out = tmp_path / "rep"
    build_report(results, out)
    (out / ".fcsae-report.json").unlink()  # as reports built before the manifest existed
    (out / "README.md").write_text("kept")
    build_report(results, out)
    assert (out / "README.md").read_text() == "kept" and (out / ".fcsae-report.json").is_file()


def test_default_objectives_without_sweep_json(tmp_path):
    results = write_sweep(tmp_path / "exp", seeds=(0,), n_failed=0, events=False)
    (tmp_path / "exp" / "sweep.json").unlink()
    md = build_report(results).markdown.read_text()
    assert "the number asked for is unknown" in md
    assert "Top 5 by `absorption.mean_absorption_fraction`" in md and "Top 5 by `core.explained_variance`" in md


def _save_tracked_sae(path: Path, seed: int) -> None:
    import torch

    from fcsae.config import SAEConfig, TrackerConfig
    from fcsae.sae import SparseAutoencoder
    from fcsae.tracker import FrequencyConsistencyTracker

    sae = SparseAutoencoder(SAEConfig(d_in=8, dict_size=32, activation="topk", k=2), seed=seed)
    tracker = FrequencyConsistencyTracker(TrackerConfig(enabled=True), 32, 8)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tracker.update(sae(x), x)
    sae.save(path, extra_tensors={f"tracker.{k}": v for k, v in tracker.state_dict().items()})


def test_fc_patterns_of_trials_with_tracker_state(tmp_path):
    results = write_sweep(tmp_path / "exp", seeds=(0, 1), n_failed=0, events=False)
    from results_schema.reader import load_tables

    trials = load_tables(results).trials
    for r in trials.filter(pl.col("split.criterion") == "fc").iter_rows(named=True):
        _save_tracked_sae(Path(r["sae_path"]), seed=int(r["trainer.seed"]))
    res = build_report(results)
    md = res.markdown.read_text()
    assert "## Frequency-consistency patterns" in md
    assert (res.out_dir / "figures" / "fc_scatter_fc.png").exists()
    assert not (res.out_dir / "figures" / "fc_scatter_none.png").exists()
    assert "2 criteria's best trials have no reachable SAE with tracker state" in md


def test_every_criterion_has_its_own_colour_and_marker():
    # A criterion missing from the fixed keys fell back to the cycle, where the 4th group drew fc's red triangle.
    from fcsae.plotting import CRITERION_COLOURS, CRITERION_MARKERS
    from fcsae.policy import CRITERIA

    assert set(CRITERIA) <= set(CRITERION_COLOURS) and set(CRITERIA) <= set(CRITERION_MARKERS)
    assert len(set(CRITERION_COLOURS.values())) == len(CRITERION_COLOURS)
    assert len(set(CRITERION_MARKERS.values())) == len(CRITERION_MARKERS)


def test_arms_follow_the_grid_fields_the_driver_recorded(tmp_path):
    """sweep.json's ``grid_names`` (written by the driver from ``SweepSpec.grid_names``) decide the arms."""
    results = write_sweep(tmp_path / "exp", seeds=(0, 1), events=False, n_failed=0)
    meta = json.loads((tmp_path / "exp" / "sweep.json").read_text())
    meta["grid_names"] = ["sae.dict_size", "split.criterion", "trainer.seed"]
    (tmp_path / "exp" / "sweep.json").write_text(json.dumps(meta))
    assert report_main([str(results.parent)]) == 0
    arms = (tmp_path / "exp" / "report" / "report.md").read_text().split("## Per arm")[1].split("\n## ")[0]
    assert "| sae.dict_size | split.criterion | n |" in arms and "trainer.seed |" not in arms
