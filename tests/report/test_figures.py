"""Report figures as a reader sees them: a readable width, ranges that stay in range, n = 1 said, overlaps named."""

from __future__ import annotations

import string

import numpy as np
import polars as pl

from fcsae.report import figures as figs
from fcsae.report import tables as rt
from fcsae.report.build import build_report
from results_schema.store import write_trial

CRIT = "split.criterion"


def _letter_stats(n_trials: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for crit in ("none", "dead", "fc"):
        for t in range(n_trials):
            for letter in string.ascii_lowercase:
                rows.append({"trial_id": f"{crit}{t}", "letter": letter,
                             "mean_absorption_fraction": float(abs(rng.normal(0.005, 0.01)))})
    letters = pl.DataFrame(rows)
    ok = letters.select("trial_id").unique().with_columns(pl.col("trial_id").str.slice(0, 4).str.strip_chars("0123456789")
                                                          .alias(CRIT))
    return rt.letter_stats(ok, letters)


def _bar_ends(fig) -> list[float]:
    ends = []
    for ax in fig.axes:
        for c in ax.collections:
            for seg in getattr(c, "get_segments", lambda: [])():
                ends += [float(y) for _, y in seg]
    return ends


def test_alphabet_fits_the_report_width_in_two_rows():
    fig = figs.letters_figure(_letter_stats(3))
    w, _ = fig.get_size_inches() * 130  # save_png's dpi
    assert w <= 1100 and len(fig.axes) == 2  # the HTML report is 1100 px wide: shown unscaled
    ends = _bar_ends(fig)
    assert ends and min(ends) >= 0.0  # min-max ranges of a fraction never dip below 0 (std bars did)


def test_one_trial_per_criterion_draws_no_bars_and_says_so():
    stats = _letter_stats(1)
    fig = figs.letters_figure(stats)
    assert _bar_ends(fig) == [] and "no spread" in fig._suptitle.get_text()
    table = rt.letters_wide(stats)
    assert not any("±" in str(v) or "[" in str(v) for v in table.drop("letter").row(0))  # no "± 0.0" for n = 1


def test_identical_series_are_named():
    df = pl.DataFrame({CRIT: ["none", "dead", "fc"], "x": [0.1, 0.1, 0.2], "y": [0.8, 0.8, 0.7]})
    assert "none = dead: identical values" in figs.coincident_note(df, CRIT, ["x", "y"])
    assert figs.coincident_note(df.filter(pl.col(CRIT) != "dead"), CRIT, ["x", "y"]) == ""


def test_equal_l0_everywhere_gives_a_sentence_not_a_front(tmp_path):
    exp = tmp_path / "exp"
    for i, crit in enumerate(("none", "dead", "fc")):
        write_trial(exp / "results", {"trial_id": f"t{i}", "status": "ok", CRIT: crit, "trainer.seed": 0,
                                      "absorption.mean_absorption_fraction": 0.01 + 0.001 * i,
                                      "core.explained_variance": 0.8 - 0.01 * i, "core.l0": 32.0})
    res = build_report(exp / "results")
    md = res.markdown.read_text()
    assert "Every trial has `core.l0` = 32: no front of absorption vs core.l0" in md
    names = {p.name for p in res.figures}
    assert "pareto_absorption_l0.png" not in names and "pareto_absorption_ev.png" in names


def test_pareto_marks_architectures_when_several_are_compared():
    ok = pl.DataFrame({CRIT: ["none", "none", "fc", "fc"],
                       "sae.activation": ["topk", "matryoshka", "topk", "matryoshka"],
                       rt.ABSORPTION: [0.40, 0.10, 0.38, 0.12], rt.L0: [32.0, 31.5, 32.2, 30.9]})
    mask = rt.pareto_mask(ok[rt.ABSORPTION].to_list(), ok[rt.L0].to_list(), "min", "min")
    ax = figs.pareto_figure(ok, rt.ABSORPTION, rt.L0, mask, "min", "min").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"none / topk", "none / matryoshka", "fc / topk", "fc / matryoshka"} <= set(labels)
    assert "architecture" in ax.get_legend().get_title().get_text()
    # One architecture: the legend stays per criterion, with no architecture suffix.
    one = ok.filter(pl.col("sae.activation") == "topk")
    mask1 = rt.pareto_mask(one[rt.ABSORPTION].to_list(), one[rt.L0].to_list(), "min", "min")
    labels1 = [t.get_text() for t in figs.pareto_figure(one, rt.ABSORPTION, rt.L0, mask1, "min", "min").axes[0].get_legend().get_texts()]
    assert "none" in labels1 and not any("/" in s for s in labels1)
