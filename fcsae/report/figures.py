"""The report's figures, each built from a polars frame and returned unsaved (tests inspect the axes).

Conventions: one fixed colour per split criterion, seeds shown as individual
points next to the mean with an error bar (standard deviation across seeds),
every axis labelled with its unit (``fcsae.plotting.axis_label``).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from fcsae.plotting import axis_label, colour_for, new_figure
from fcsae.report.tables import with_bins

CRITERION = "split.criterion"
SEED = "trainer.seed"


def group_values(df: pl.DataFrame, col: str) -> list:
    """Distinct values of ``col`` in a stable order (criteria in their canonical order, others sorted)."""
    from fcsae.config import CRITERIA

    values = [v for v in df[col].unique().to_list() if v is not None] if col in df.columns else []
    if col == CRITERION:
        return [c for c in CRITERIA if c in values] + sorted(v for v in values if v not in CRITERIA)
    return sorted(values)


def pareto_figure(ok: pl.DataFrame, x: str, y: str, front_mask: list[bool], x_mode: str, y_mode: str) -> Figure:
    """Trials as points coloured by criterion, the Pareto-optimal ones ringed and joined by a step line."""
    fig, (ax,) = new_figure()
    groups = group_values(ok, CRITERION) or [None]
    for i, g in enumerate(groups):
        sub = ok if g is None else ok.filter(pl.col(CRITERION) == g)
        ax.scatter(sub[x].to_numpy(), sub[y].to_numpy(), s=28, alpha=0.8, color=colour_for(g, i),
                   label=str(g) if g is not None else "trials")
    front = ok.filter(pl.Series(front_mask)).sort(x)
    if front.height:
        ax.scatter(front[x].to_numpy(), front[y].to_numpy(), s=90, facecolors="none", edgecolors="black",
                   linewidths=1.2, label="Pareto front")
        ax.step(front[x].to_numpy(), front[y].to_numpy(), where="post", color="black", linewidth=0.8, alpha=0.6)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    better = f"better: {'lower' if x_mode == 'min' else 'higher'} x, {'lower' if y_mode == 'min' else 'higher'} y"
    ax.set_title(f"Pareto front ({better})", fontsize=10)
    ax.legend(fontsize=8, title="split criterion", title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _seed_means(df: pl.DataFrame, param: str, metric: str) -> pl.DataFrame:
    """Mean of ``metric`` per (param value, seed): the seed is the unit of replication."""
    keys = [param, SEED] if SEED in df.columns and param != SEED else [param]
    return df.group_by(keys).agg(pl.col(metric).mean().alias("value"))


def categorical_effect_figure(ok: pl.DataFrame, param: str, metrics: list[str]) -> Figure:
    """Per value of ``param``: one point per seed (mean over that seed's trials) and mean +- std across seeds."""
    fig, axes = new_figure(len(metrics), width=5.2)
    values = group_values(ok, param)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for ax, metric in zip(axes, metrics):
        sm = _seed_means(ok.filter(pl.col(metric).is_not_null()), param, metric)
        for i, v in enumerate(values):
            pts = sm.filter(pl.col(param) == v)["value"].drop_nulls().to_numpy()
            if not len(pts):
                continue
            c = colour_for(v, i)
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(pts)), pts, s=22, alpha=0.7, color=c,
                       label="one seed" if i == 0 else None)
            std = float(np.std(pts, ddof=1)) if len(pts) > 1 else 0.0
            ax.errorbar(i + 0.3, float(np.mean(pts)), yerr=std, fmt="D", color="black", capsize=4, markersize=5,
                        label="mean ± std across seeds" if i == 0 else None)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(axis_label(param))
        ax.set_ylabel(axis_label(metric))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"Effect of {param}: dots = seeds, diamond = mean ± std across seeds", fontsize=10)
    return fig


def numeric_effect_figure(ok: pl.DataFrame, param: str, metrics: list[str]) -> Figure:
    """Each trial as a point, ``metric`` against ``param``, coloured by criterion; log x for wide positive ranges."""
    fig, axes = new_figure(len(metrics), width=5.2)
    groups = group_values(ok, CRITERION) or [None]
    vals = ok[param].drop_nulls().to_numpy().astype(float)
    log_x = len(vals) and vals.min() > 0 and vals.max() / vals.min() >= 10
    for ax, metric in zip(axes, metrics):
        for i, g in enumerate(groups):
            sub = ok if g is None else ok.filter(pl.col(CRITERION) == g)
            ax.scatter(sub[param].to_numpy(), sub[metric].to_numpy(), s=22, alpha=0.75, color=colour_for(g, i),
                       label=str(g) if g is not None else "trials")
        # Binned means with the spread across seeds, over all criteria: the grouped effect of this parameter.
        binned = _seed_means(with_bins(ok.filter(pl.col(metric).is_not_null()), param), "bin_centre", metric)
        for j, ((centre,), b) in enumerate(binned.group_by(["bin_centre"], maintain_order=True)):
            pts = b["value"].drop_nulls().to_numpy()
            std = float(np.std(pts, ddof=1)) if len(pts) > 1 else 0.0
            ax.errorbar(centre, float(np.mean(pts)), yerr=std, fmt="D", color="black", capsize=4, markersize=5,
                        label="quartile-bin mean ± std across seeds" if j == 0 else None)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(axis_label(param) + (" [log scale]" if log_x else ""))
        ax.set_ylabel(axis_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="split criterion", title_fontsize=8)
    fig.suptitle(f"Effect of {param}: dots = trials, diamonds = quartile-bin mean ± std across seeds", fontsize=10)
    return fig


def letters_figure(stats: pl.DataFrame, metric: str = "mean_absorption_fraction") -> Figure:
    """Grouped bars per letter, one bar per criterion: mean across that criterion's trials, error bar = std."""
    letters = sorted(stats["letter"].unique().to_list())
    groups = group_values(stats, CRITERION)
    fig, (ax,) = new_figure(width=max(7.0, 0.45 * len(letters) * max(1, len(groups)) ** 0.5 + 3), height=4.4)
    width = 0.8 / max(1, len(groups))
    pos = {l: i for i, l in enumerate(letters)}
    for j, g in enumerate(groups):
        sub = stats.filter(pl.col(CRITERION) == g)
        xs = np.array([pos[l] for l in sub["letter"].to_list()]) - 0.4 + width * (j + 0.5)
        ax.bar(xs, sub["mean"].to_numpy(), width=width, yerr=sub["std"].fill_null(0).to_numpy(), capsize=2,
               color=colour_for(g, j), label=f"{g} (n={int(sub['n_trials'].max())})", error_kw={"linewidth": 0.8})
    ax.set_xticks(range(len(letters)), letters)
    ax.set_xlabel("first letter")
    ax.set_ylabel(axis_label(metric))
    ax.set_title("Per-letter absorption by split criterion (mean ± std across trials)", fontsize=10)
    ax.legend(fontsize=8, title="split criterion (trials)", title_fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def split_events_figure(curves: pl.DataFrame) -> Figure:
    """Cumulative split/resample events against training tokens: a thin line per trial, colour per criterion."""
    fig, (ax,) = new_figure(width=6.5)
    for i, g in enumerate(group_values(curves, CRITERION)):
        sub = curves.filter(pl.col(CRITERION) == g)
        first = True
        for (tid,), t in sub.group_by(["trial_id"], maintain_order=True):
            t = t.sort("tokens")
            ax.step(t["tokens"].to_numpy(), t["cumulative"].to_numpy(), where="post", color=colour_for(g, i),
                    alpha=0.6, linewidth=1.0, label=f"{g} ({sub['trial_id'].n_unique()} trials)" if first else None)
            first = False
    ax.set_xlabel("training tokens (activation vectors)")
    ax.set_ylabel("cumulative split + resample events (count)")
    ax.set_title("Split and resample events over training (one line per trial)", fontsize=10)
    ax.legend(fontsize=8, title="split criterion", title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def event_counts_figure(ok: pl.DataFrame) -> Figure:
    """Fallback without event logs: split and resample counts per criterion, one point per trial."""
    fig, axes = new_figure(2, width=4.8)
    groups = group_values(ok, CRITERION) or [None]
    for ax, col in zip(axes, ("n_split_events", "n_resample_events")):
        for i, g in enumerate(groups):
            sub = ok if g is None else ok.filter(pl.col(CRITERION) == g)
            v = sub[col].drop_nulls().to_numpy().astype(float)
            if len(v):
                ax.scatter(np.full(len(v), i), v, color=colour_for(g, i), alpha=0.7, s=22)
                ax.errorbar(i + 0.25, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="D", color="black", capsize=4)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups])
        ax.set_xlabel(axis_label(CRITERION))
        ax.set_ylabel(axis_label(col))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Events per trial (from the result rows; dots = trials, diamond = mean ± std)", fontsize=10)
    return fig

