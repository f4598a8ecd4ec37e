"""The report's numbers as polars frames: Pareto fronts, grouped effects across seeds, per-letter stats, event curves.

Pure functions of the result tables (no plotting, no files except the event
logs), so each is testable on a hand-made frame. The seed is the unit of
replication: a group's trials are first averaged per seed, and spreads are the
standard deviation across those seed means.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl

from fcsae.query import L0_BIN_SQL, L0_BIN_TEXT

log = logging.getLogger(__name__)

CRITERION = "split.criterion"
SEED = "trainer.seed"
ABSORPTION = "absorption.mean_absorption_fraction"
EV = "core.explained_variance"
L0 = "core.l0"
ACTIVATION = "sae.activation"
BASELINE = "none"
"""The criterion the methods are compared against (no resampling, no splitting)."""
BASE_ACTIVATION = "topk"
"""The architecture the others are compared against, and whose arms keep their bare criterion name."""


def pareto_mask(x, y, x_mode: str = "min", y_mode: str = "max") -> list[bool]:
    """Which points are Pareto-optimal for (x, y) with the given directions.

    A point is on the front when no other point is at least as good on both
    axes and strictly better on one. Identical points are all on the front.
    NaN or None points are never on it (nor dominate anything).
    """
    if x_mode not in ("min", "max") or y_mode not in ("min", "max"):
        raise ValueError(f"modes must be min or max, got {x_mode!r}, {y_mode!r}")
    xs = np.array([np.nan if v is None else v for v in x], dtype=float)
    ys = np.array([np.nan if v is None else v for v in y], dtype=float)
    # Flip to "smaller is better" on both axes.
    xs = xs if x_mode == "min" else -xs
    ys = ys if y_mode == "min" else -ys
    valid = np.isfinite(xs) & np.isfinite(ys)
    xv, yv = np.where(valid, xs, np.inf), np.where(valid, ys, np.inf)
    le = (xv[:, None] <= xv[None, :]) & (yv[:, None] <= yv[None, :])  # [j, i]: j at least as good as i
    lt = (xv[:, None] < xv[None, :]) | (yv[:, None] < yv[None, :])
    dominated = ((le & lt) & valid[:, None]).any(axis=0)
    return (valid & ~dominated).tolist()


def ok_trials(trials: pl.DataFrame) -> pl.DataFrame:
    """The trials that trained and evaluated."""
    return trials.filter(pl.col("status") == "ok")


def metric_present(df: pl.DataFrame, col: str) -> bool:
    """True when ``col`` exists and has at least one finite value."""
    return col in df.columns and df.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan()).height > 0


def seed_stats(df: pl.DataFrame, by: str, metric: str) -> pl.DataFrame:
    """Per value of ``by``: trials, seeds, mean and std of ``metric`` across seed means, and its standard error."""
    d = df.filter(pl.col(metric).is_not_null() & pl.col(metric).is_not_nan())
    has_seed = SEED in d.columns and by != SEED
    per_seed = d.group_by([by, SEED] if has_seed else [by, "trial_id"]).agg(
        pl.col(metric).mean().alias("v"), pl.len().alias("n"))
    out = per_seed.group_by(by).agg(
        pl.col("n").sum().alias("n_trials"), pl.len().alias("n_seeds"),
        pl.col("v").mean().alias("mean"), pl.col("v").std(ddof=1).alias("std"))
    out = out.with_columns((pl.col("std") / pl.col("n_seeds").cast(pl.Float64).sqrt()).alias("se"))
    return out.sort(by)


def with_bins(df: pl.DataFrame, param: str, n_bins: int = 4) -> pl.DataFrame:
    """``df`` plus ``bin`` (text range) and ``bin_centre`` (median value) columns: quantile bins of a numeric ``param``."""
    v = df[param].cast(pl.Float64).to_numpy()
    edges = np.unique(np.quantile(v[np.isfinite(v)], np.linspace(0, 1, n_bins + 1))) if np.isfinite(v).any() else np.array([0.0])
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0]])
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)
    labels = [f"Q{i + 1}: {edges[i]:.4g}–{edges[i + 1]:.4g}" for i in range(len(edges) - 1)]  # Qn sorts in order
    out = df.with_columns(pl.Series("bin_index", idx), pl.Series("bin", [labels[i] for i in idx]))
    centres = out.group_by("bin_index").agg(pl.col(param).cast(pl.Float64).median().alias("bin_centre"))
    return out.join(centres, on="bin_index", how="left")


def criterion_comparison(ok: pl.DataFrame, metrics: list[str]) -> pl.DataFrame:
    """Per (criterion, metric): trials, seeds, mean and std across seeds, difference from the baseline and its SE.

    The SE of the difference is sqrt(se_c^2 + se_none^2), with se = std / sqrt(seeds).
    Long format (one row per criterion and metric) so the table stays readable.
    With several architectures (``sae.activation``) criteria are compared within each architecture that has more
    than one, against that architecture's own baseline (an ``architecture`` column first): pooling them would make
    the baseline a mix of architectures.
    """
    if CRITERION not in ok.columns or ok.height == 0:
        return pl.DataFrame()
    if ACTIVATION in ok.columns and ok[ACTIVATION].n_unique() > 1:
        parts = [_criterion_comparison(g, metrics).select(pl.lit(act).alias("architecture"), pl.all())
                 for (act,), g in ok.group_by(ACTIVATION, maintain_order=True) if g[CRITERION].n_unique() > 1]
        parts = [p for p in parts if p.height]
        return pl.concat(parts) if parts else pl.DataFrame()
    return _criterion_comparison(ok, metrics)


def _criterion_comparison(ok: pl.DataFrame, metrics: list[str]) -> pl.DataFrame:
    parts = []
    for m in metrics:
        if not metric_present(ok, m):
            continue
        s = seed_stats(ok, CRITERION, m)
        b = s.filter(pl.col(CRITERION) == BASELINE)
        if b.height:
            delta = pl.col("mean") - b["mean"].item()
            se = (pl.col("se") ** 2 + (b["se"].item() or 0.0) ** 2).sqrt()
        else:
            delta = se = pl.lit(None, pl.Float64)
        is_base = pl.col(CRITERION) == BASELINE  # the baseline's difference from itself is not a result
        parts.append(s.with_columns(pl.lit(m).alias("metric"),
                                    pl.when(is_base).then(None).otherwise(delta).alias(f"Δ vs {BASELINE}"),
                                    pl.when(is_base).then(None).otherwise(se).alias("Δ SE")))
    if not parts:
        return pl.DataFrame()
    out = pl.concat(parts).rename({CRITERION: "criterion"})
    return out.select("criterion", "metric", "n_trials", "n_seeds", "mean", "std", f"Δ vs {BASELINE}", "Δ SE")


def architecture_comparison(ok: pl.DataFrame, metrics: list[str]) -> pl.DataFrame:
    """Per (measured-L0 bin, architecture, criterion): seeds, and each metric's mean and std across seed means.

    Architectures are compared at matched *measured* L0 (``core.l0``, the
    inference code's), not at nominal k: batchtopk/matryoshka reach their L0
    on average through a threshold. Empty unless the trials span at least two
    ``sae.activation`` values.
    """
    if ACTIVATION not in ok.columns or L0 not in ok.columns or ok[ACTIVATION].n_unique() < 2:
        return pl.DataFrame()
    crit = pl.col(CRITERION) if CRITERION in ok.columns else pl.lit(BASELINE)
    d = ok.filter(pl.col(L0).is_not_null() & pl.col(L0).is_not_nan()).with_columns(
        pl.sql_expr(L0_BIN_SQL).alias("L0 bin"), crit.alias("_crit"))
    d = d.with_columns(pl.concat_str([pl.col("L0 bin").cast(pl.Utf8), pl.col(ACTIVATION), pl.col("_crit")],
                                     separator="|").alias("_cell"))
    out = None
    for m in [m for m in metrics if metric_present(d, m)]:
        s = seed_stats(d, "_cell", m).select("_cell", "n_seeds", pl.col("mean").alias(m), pl.col("std").alias(f"{m} std"))
        out = s if out is None else out.join(s.drop("n_seeds"), on="_cell", how="full", coalesce=True)
    if out is None:
        return pl.DataFrame()
    cell = pl.col("_cell").str.split("|")
    out = out.with_columns(cell.list.get(0).cast(pl.Float64).alias("L0 bin"), cell.list.get(1).alias("architecture"),
                           cell.list.get(2).alias("criterion"))
    return out.select("L0 bin", "architecture", "criterion", pl.exclude("_cell", "L0 bin", "architecture", "criterion")
                      ).sort("L0 bin", "architecture", "criterion")


def comparison_sentences(cmp: pl.DataFrame, metric: str) -> list[str]:
    """Plain-words reading of each criterion against the baseline on ``metric``, with its uncertainty
    (per architecture when ``cmp`` has an ``architecture`` column)."""
    if "architecture" in cmp.columns:
        return [f"{act}: {line}" for (act,), g in cmp.group_by("architecture", maintain_order=True)
                for line in comparison_sentences(g.drop("architecture"), metric)]
    dcol = f"Δ vs {BASELINE}"
    rows = cmp.filter(pl.col("metric") == metric) if cmp.height else cmp
    if rows.height == 0 or BASELINE not in rows["criterion"].to_list():
        return [f"No `{BASELINE}` baseline trials with `{metric}`: no comparison against the baseline."]
    base = rows.filter(pl.col("criterion") == BASELINE).row(0, named=True)
    out = []
    for r in rows.filter(pl.col("criterion") != BASELINE).iter_rows(named=True):
        d, se = r[dcol], r["Δ SE"]
        if d is None or not math.isfinite(d):
            continue
        if r["n_seeds"] < 2 or base["n_seeds"] < 2 or se is None or not math.isfinite(se) or se == 0:
            verdict = "uncertainty unknown (fewer than 2 seeds on a side)"
        elif abs(d) < 2 * se:
            verdict = f"|Δ| = {abs(d) / se:.1f} SE: no measurable difference at this number of seeds"
        else:
            verdict = f"|Δ| = {abs(d) / se:.1f} SE: {'lower' if d < 0 else 'higher'} than the baseline"
        se_txt = f"{se:.2g}" if se is not None and math.isfinite(se) else "?"
        out.append(f"`{r['criterion']}`: {r['mean']:.4g} vs `{BASELINE}` {base['mean']:.4g} "
                   f"(Δ = {d:+.4g} ± {se_txt} SE; {r['n_seeds']} vs {base['n_seeds']} seeds) — {verdict}.")
    return out


def architecture_sentences(table: pl.DataFrame, metric: str, base_arch: str = BASE_ACTIVATION) -> list[str]:
    """Each architecture's ``none`` cell against ``base_arch``'s ``none`` in the same L0 bin, on ``metric``
    (an ``architecture_comparison`` table): difference, its SE from the seeds' std, and whether it exceeds 2 SE."""
    if table.height == 0 or metric not in table.columns:
        return []
    out = []
    cells = table.filter(pl.col("criterion") == BASELINE)
    for (l0,), g in cells.group_by("L0 bin", maintain_order=True):
        base = g.filter(pl.col("architecture") == base_arch)
        if base.height == 0:
            continue
        b = base.row(0, named=True)
        for r in g.filter(pl.col("architecture") != base_arch).iter_rows(named=True):
            if r[metric] is None or b[metric] is None:
                continue
            d = r[metric] - b[metric]
            ses = [r.get(f"{metric} std"), b.get(f"{metric} std")]
            if r["n_seeds"] < 2 or b["n_seeds"] < 2 or any(v is None or not math.isfinite(v) for v in ses):
                verdict = "uncertainty unknown (fewer than 2 seeds on a side)"
                se_txt = "?"
            else:
                se = math.sqrt(ses[0] ** 2 / r["n_seeds"] + ses[1] ** 2 / b["n_seeds"])
                se_txt = f"{se:.2g}"
                verdict = ("no measurable difference at this number of seeds" if se == 0 or abs(d) < 2 * se
                           else f"{abs(d) / se:.1f} SE {'lower' if d < 0 else 'higher'} than {base_arch}")
            out.append(f"L0 ~{l0:g}: `{r['architecture']}` {r[metric]:.4g} vs `{base_arch}` {b[metric]:.4g} "
                       f"(Δ = {d:+.4g} ± {se_txt} SE; {r['n_seeds']} vs {b['n_seeds']} seeds) — {verdict}.")
    return out


def best_trials(ok: pl.DataFrame, metric: str, mode: str, n: int = 5, extra: list[str] | None = None) -> pl.DataFrame:
    """The ``n`` best ok trials by ``metric`` (``mode`` min or max) with their criterion, seed and key metrics."""
    cols = ["trial_id", CRITERION, ACTIVATION, SEED] + (extra or []) + [metric, EV, L0]
    cols = list(dict.fromkeys(c for c in cols if c in ok.columns))
    d = ok.filter(pl.col(metric).is_not_null() & pl.col(metric).is_not_nan())
    return d.sort(metric, descending=mode == "max").head(n).select(cols)


def letter_stats(ok: pl.DataFrame, letters: pl.DataFrame, metric: str = "mean_absorption_fraction") -> pl.DataFrame:
    """Per (criterion, letter): trials, mean, std, min and max of the per-letter ``metric`` across trials."""
    if letters.height == 0 or metric not in letters.columns:
        return pl.DataFrame()
    keys = ["trial_id", CRITERION] if CRITERION in ok.columns else ["trial_id"]
    if CRITERION in ok.columns:
        ok = ok.with_columns(arm_label(ok).alias(CRITERION))
    j = letters.join(ok.select(keys), on="trial_id", how="inner").filter(
        pl.col(metric).is_not_null() & pl.col(metric).is_not_nan())
    if CRITERION not in j.columns:
        j = j.with_columns(pl.lit("all").alias(CRITERION))
    return j.group_by([CRITERION, "letter"]).agg(
        pl.len().alias("n_trials"), pl.col(metric).mean().alias("mean"), pl.col(metric).std(ddof=1).alias("std"),
        pl.col(metric).min().alias("min"), pl.col(metric).max().alias("max"),
    ).sort(CRITERION, "letter")


def arm_label(ok: pl.DataFrame) -> pl.Expr:
    """The split criterion, prefixed by the architecture when trials span several (``batchtopk none``; topk's, or
    else the first architecture's, keep the bare criterion), so architectures are never pooled under one name."""
    if ACTIVATION not in ok.columns or ok[ACTIVATION].n_unique() < 2:
        return pl.col(CRITERION)
    acts = ok[ACTIVATION].unique(maintain_order=True).to_list()
    base = BASE_ACTIVATION if BASE_ACTIVATION in acts else acts[0]
    return pl.when(pl.col(ACTIVATION) == base).then(pl.col(CRITERION)).otherwise(
        pl.concat_str([pl.col(ACTIVATION), pl.col(CRITERION)], separator=" "))


def letters_wide(stats: pl.DataFrame) -> pl.DataFrame:
    """Letters as rows, criteria as text columns: ``mean [min, max]`` across trials, the mean alone for one trial."""
    cell = stats.with_columns(
        pl.when(pl.col("n_trials") > 1)
        .then(pl.format("{} [{}, {}]", pl.col("mean").round(4), pl.col("min").round(4), pl.col("max").round(4)))
        .otherwise(pl.col("mean").round(4).cast(pl.Utf8)).alias("cell"))
    return cell.pivot(on=CRITERION, index="letter", values="cell").sort("letter")


def _events_file(row: dict) -> Path | None:
    for cand in (row.get("events_path"), row.get("trial_dir") and str(Path(row["trial_dir"]) / "events.jsonl")):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def event_curves(ok: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Cumulative events against training tokens per trial, from the trials' events.jsonl; and how many were read.

    Trials are labelled by their arm (``arm_label``: other architectures' ``none`` is not topk's).

    A trial whose log is missing or unreadable is left out (logged); trials
    that logged no event contribute a flat line at 0.
    """
    rows, n_read = [], 0
    cols = [c for c in ("trial_id", "trainer.batch_size", "events_path", "trial_dir", "tokens_trained")
            if c in ok.columns]
    arm = arm_label(ok).alias(CRITERION) if CRITERION in ok.columns else pl.lit(None, pl.Utf8).alias(CRITERION)
    for r in ok.select(*cols, arm).iter_rows(named=True):
        path = _events_file(r)
        if path is None:
            continue
        try:
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            steps = sorted(int(ev["step"]) for ev in events if ev.get("kind") in ("split", "extract", "resample"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable event log (%s); left out of the events figure", path, e)
            continue
        n_read += 1
        bs = r.get("trainer.batch_size") or 1
        crit = r.get(CRITERION) or "all"
        end = r.get("tokens_trained") or (steps[-1] * bs if steps else 0)
        pts = [(0, 0)] + [(s * bs, i + 1) for i, s in enumerate(steps)] + [(max(end, steps[-1] * bs if steps else 0), len(steps))]
        rows += [{"trial_id": r["trial_id"], CRITERION: crit, "tokens": int(t), "cumulative": int(c)} for t, c in pts]
    schema = {"trial_id": pl.Utf8, CRITERION: pl.Utf8, "tokens": pl.Int64, "cumulative": pl.Int64}
    return pl.DataFrame(rows, schema=schema), n_read
