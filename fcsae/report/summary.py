"""The compact end-of-sweep summary: one line per arm, a one-line verdict that says when differences are noise.

An arm is one combination of the grid axes other than the seed (for the
quickstart: the split criterion). Columns: trials, absorption with a 95%
interval, explained variance, CE-loss score, L0, splits. The interval is the
spread across an arm's trials (a t interval on their mean, clipped to [0, 1])
when it has two or more; with one trial it is that trial's bootstrap interval
over words when the row carries one (``absorption.mean_absorption_fraction_lo``
/ ``_hi``), else there is none and the verdict says so. Arms are never ranked:
they are listed in the criteria's canonical order.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from fcsae.report.tables import ABSORPTION, ACTIVATION, BASE_ACTIVATION, BASELINE, CRITERION

LO, HI = f"{ABSORPTION}_lo", f"{ABSORPTION}_hi"
MEANINGFUL = "absorption.meaningful"
COLUMNS = {  # result column -> (header, how to read it)
    "core.explained_variance": ("EV", "explained variance, higher is better"),
    "core.ce_loss_score": ("CE score", "1 = splicing the SAE in costs no LM loss, higher is better"),
    "core.l0": ("L0", "active latents per token"),
    "absorption.letters_with_latent": ("letters", "letters with a latent: the best single latent alone detects the "
                                                  "letter (k=1 sparse-probe F1 > 0.6); 0 = the absorption score is degenerate"),
    "n_split_events": ("splits", "latents split during training"),
    "n_resample_events": ("resamples", "dead latents re-initialised during training"),
}
"""The metric columns shown after absorption, with their headers and meanings."""


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def _interval(values: list[float], lo: list, hi: list) -> tuple[float | None, float | None, str]:
    """(lo, hi, kind) of an arm's absorption: seed spread for n >= 2, the row's bootstrap for n = 1."""
    if len(values) >= 2:
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        half = _t975(len(values) - 1) * sd / math.sqrt(len(values))
        return max(0.0, mean - half), min(1.0, mean + half), "trials"
    if len(values) == 1 and lo and hi and lo[0] is not None and hi[0] is not None:
        return float(lo[0]), float(hi[0]), "words"
    return None, None, "none"


def arm_keys(searched_grid: list[str], trials: pl.DataFrame) -> list[str]:
    """The grid axes that define an arm (the seed excluded); the criterion when there are none."""
    keys = [k for k in searched_grid if k != "trainer.seed" and k in trials.columns]
    return keys or [CRITERION]


def summary_frame(trials: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Per arm: ok trials (``n``), failed, absorption mean and interval (``lo``, ``hi``, ``interval``), metric means."""
    from fcsae.report.figures import group_values

    ok_col = pl.col("status") == "ok"
    metrics = [c for c in COLUMNS if c in trials.columns]
    rows = []
    for arm, g in trials.group_by(keys, maintain_order=True):
        ok = g.filter(ok_col)
        row = dict(zip(keys, arm))
        row.update(n=ok.height, failed=g.height - ok.height)
        vals = ok[ABSORPTION].drop_nulls().drop_nans().to_list() if ABSORPTION in ok.columns else []
        lo = ok[LO].to_list() if LO in ok.columns else []
        hi = ok[HI].to_list() if HI in ok.columns else []
        row["absorption"] = sum(vals) / len(vals) if vals else None
        row["sd"] = (math.sqrt(sum((v - row["absorption"]) ** 2 for v in vals) / (len(vals) - 1))
                     if len(vals) >= 2 else None)
        row["lo"], row["hi"], row["interval"] = _interval(vals, lo, hi)
        row["meaningful"] = bool(ok[MEANINGFUL].drop_nulls().all()) if MEANINGFUL in ok.columns and ok[MEANINGFUL].drop_nulls().len() else None
        for m in metrics:
            row[m] = ok[m].drop_nulls().drop_nans().mean() if ok.height else None
        rows.append(row)
    out = pl.DataFrame(rows)
    if keys[0] == CRITERION:  # canonical order, never ranked by a metric
        order = {v: i for i, v in enumerate(group_values(out, CRITERION))}
        out = out.sort(pl.col(CRITERION).replace_strict(order, default=len(order)))
    # A column no trial filled (an eval switched off) says nothing, nor resamples where none happened: drop them.
    empty = [c for c in metrics if out[c].drop_nulls().len() == 0
             or (c == "n_resample_events" and not out[c].drop_nulls().abs().sum())]
    return out.drop(empty)


def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and abs(v - round(v)) < 1e-9 and abs(v) >= 1:
        return str(int(round(v)))
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def format_summary(frame: pl.DataFrame, keys: list[str]) -> str:
    """The summary as an aligned text table with a key under it."""
    metrics = [c for c in COLUMNS if c in frame.columns]
    head = [k.split(".")[-1] for k in keys] + ["n", "absorption [95% interval]", "sd"] + [COLUMNS[m][0] for m in metrics]
    body = []
    for r in frame.iter_rows(named=True):
        interval = f" [{_num(r['lo'], 3)}, {_num(r['hi'], 3)}]" if r["lo"] is not None else " [no interval]"
        cells = [_num(r[k]) for k in keys] + [f"{r['n']}" + (f" (+{r['failed']} failed)" if r["failed"] else ""),
                                              (_num(r["absorption"]) + interval) if r["absorption"] is not None else "-",
                                              _num(r["sd"], 2)]
        body.append(cells + [_num(r[m]) for m in metrics])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    kinds = set(frame["interval"].to_list())
    how = {"trials": "t interval over the arm's trials", "words": "bootstrap over words of the one trial (not seeds)",
           "none": "none with one trial"}
    key = ["absorption: mean absorption fraction of the first-letter eval, lower is better; interval: "
           + "; ".join(how[k] for k in ("trials", "words", "none") if k in kinds) + "; sd: across the arm's trials"]
    key += [f"{COLUMNS[m][0]}: {COLUMNS[m][1]}" for m in metrics]
    return "\n".join([line(head), *(line(b) for b in body), "", *key])


def verdict(frame: pl.DataFrame, keys: list[str]) -> str:
    """One line: which arms differ from the baseline beyond noise on absorption, or that none can be told apart."""
    d = frame.filter(pl.col("absorption").is_not_null())
    if d.height < 2:
        return "Verdict: fewer than two arms with absorption results; nothing to compare."
    caveat = ""
    if "meaningful" in d.columns and d["meaningful"].drop_nulls().len() and not d["meaningful"].drop_nulls().all():
        caveat = " Caution: the absorption eval flags these results as not meaningful (too few letters with a latent)."
    if d["lo"].null_count():
        return ("Verdict: one trial per arm and no interval, so the differences above cannot be told from noise; "
                "do not rank the arms on this run (add seeds: trainer.seed to the grid)." + caveat)
    names = [" ".join(str(r[k]) for k in keys) for r in d.iter_rows(named=True)]
    # The baseline: the `none` criterion (of the base architecture when arms differ in architecture too).
    base_i = next((i for i, r in enumerate(d.iter_rows(named=True))
                   if r.get(CRITERION, r.get(keys[0])) == BASELINE
                   and r.get(ACTIVATION, BASE_ACTIVATION) == BASE_ACTIVATION),
                  next((i for i, r in enumerate(d.iter_rows(named=True)) if r.get(CRITERION, r.get(keys[0])) == BASELINE), 0))
    lo, hi, mean = d["lo"].to_list(), d["hi"].to_list(), d["absorption"].to_list()
    parts = []
    for i in range(d.height):
        if i == base_i:
            continue
        if lo[i] <= hi[base_i] and lo[base_i] <= hi[i]:
            parts.append(f"{names[i]} within noise of {names[base_i]}")
        else:
            parts.append(f"{names[i]} {'lower' if mean[i] < mean[base_i] else 'higher'} than {names[base_i]}")
    words_only = "words" in d["interval"].to_list()
    tail = " (intervals from word sampling only: seeds would widen them)" if words_only else ""
    return "Verdict on absorption (95% intervals; overlapping = within noise): " + "; ".join(parts) + tail + "." + caveat


def next_commands(experiment: Path, bin_prefix: str = "") -> list[str]:
    """The commands to look further: the report and a query, copy-pasteable from the current directory."""
    try:
        exp = Path(experiment).resolve().relative_to(Path.cwd().resolve())
    except (ValueError, TypeError):  # elsewhere on disk, or an object-store location (s3://...)
        exp = experiment
    return [f"{bin_prefix}fcsae-report {exp}            # report with figures: {exp}/report/report.html",
            f"{bin_prefix}fcsae query --results {exp} --recipe best   # or --list for the other recipes"]


def summary_text(trials: pl.DataFrame, keys: list[str], experiment: Path, bin_prefix: str = "") -> str:
    """Table, verdict and next commands as one text block."""
    frame = summary_frame(trials, keys)
    return "\n".join([format_summary(frame, keys), "", verdict(frame, keys), "", "Next:",
                      *("  " + c for c in next_commands(experiment, bin_prefix))])
