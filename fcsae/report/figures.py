"""The report's figures, each built from a polars frame and returned unsaved (tests inspect the axes).

Conventions: one fixed colour and marker per split criterion, seeds shown as
individual points next to the mean with a bar for the range across seeds
(min to max: it never leaves the metric's range, and there is none with one
seed, which the figure then says), series that coincide named in the title,
every axis labelled with its unit (``fcsae.plotting.axis_label``).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from fcsae.plotting import ACTIVATION_MARKERS, LINESTYLES, axis_label, colour_for, marker_for, new_figure
from fcsae.report.tables import with_bins

CRITERION = "split.criterion"
SEED = "trainer.seed"
ACTIVATION = "sae.activation"


def group_values(df: pl.DataFrame, col: str) -> list:
    """Distinct values of ``col`` in a stable order (criteria in their canonical order, others sorted)."""
    from fcsae.config import CRITERIA

    values = [v for v in df[col].unique().to_list() if v is not None] if col in df.columns else []
    if col == CRITERION:
        return [c for c in CRITERIA if c in values] + sorted(v for v in values if v not in CRITERIA)
    return sorted(values)


def coincident_note(df: pl.DataFrame, group: str, values: list[str], overlap: bool = True) -> str:
    """``" (a = b: identical values[, drawn on top of each other])"`` for groups whose ``values`` rows all match; else ""."""
    if group not in df.columns or df.height == 0:
        return ""
    seen: dict[tuple, list] = {}
    for g in group_values(df, group):
        rows = df.filter(pl.col(group) == g).select(values).sort(values).rows()
        seen.setdefault(tuple(rows), []).append(str(g))
    same = [" = ".join(gs) for gs in seen.values() if len(gs) > 1]
    where = ", drawn on top of each other" if overlap else ""
    return f" ({'; '.join(same)}: identical values{where})" if same else ""


def _spread(pts: np.ndarray, mean: float) -> np.ndarray | None:
    """Asymmetric error bar from the mean to the min and max of ``pts``; None for a single point."""
    if len(pts) < 2:
        return None
    return np.array([[mean - pts.min()], [pts.max() - mean]])


def _n_note(counts: list[int], unit: str = "seed") -> str:
    """What the bars mean, or that there are none (one point per group)."""
    if counts and max(counts) < 2:
        return f"one {unit} per group, so no spread to show"
    return f"bars = range (min–max) across {unit}s"


def pareto_figure(ok: pl.DataFrame, x: str, y: str, front_mask: list[bool], x_mode: str, y_mode: str) -> Figure:
    """Trials as points, the Pareto-optimal ones ringed and joined by a step line.

    Colour and marker per criterion; where the trials span several architectures
    (``sae.activation``), the marker is the architecture's instead, so points of
    different architectures at the same measured L0 stay comparable.
    """
    fig, (ax,) = new_figure()
    archs = group_values(ok, ACTIVATION) if ACTIVATION in ok.columns else []
    by_arch = len(archs) > 1
    groups = [(c, a) for c in (group_values(ok, CRITERION) or [None]) for a in (archs if by_arch else [None])]
    for i, (g, a) in enumerate(groups):  # drawn large to small: a point lying on another stays visible
        sub = ok if g is None else ok.filter(pl.col(CRITERION) == g)
        if a is not None:
            sub = sub.filter(pl.col(ACTIVATION) == a)
        if sub.height == 0:
            continue
        marker = ACTIVATION_MARKERS.get(a, "o") if by_arch else marker_for(g, i)
        label = ("trials" if g is None else str(g)) + (f" / {a}" if a is not None else "")
        ax.scatter(sub[x].to_numpy(), sub[y].to_numpy(), s=170 - 130 * i / max(1, len(groups) - 1), alpha=0.85,
                   color=colour_for(g, i), marker=marker, edgecolors="white", linewidths=0.5, label=label, zorder=2 + i)
    front = ok.filter(pl.Series(front_mask)).sort(x)
    if front.height:
        ax.scatter(front[x].to_numpy(), front[y].to_numpy(), s=190, facecolors="none", edgecolors="black",
                   linewidths=1.2, label="Pareto front", zorder=1)
        ax.step(front[x].to_numpy(), front[y].to_numpy(), where="post", color="black", linewidth=0.8, alpha=0.6, zorder=1)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    better = f"better: {'lower' if x_mode == 'min' else 'higher'} x, {'lower' if y_mode == 'min' else 'higher'} y"
    ax.set_title(f"Pareto front ({better}){coincident_note(ok, CRITERION, [x, y])}", fontsize=9, wrap=True)
    title = "split criterion / architecture" if by_arch else "split criterion"
    ax.legend(fontsize=8, title=title, title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _seed_means(df: pl.DataFrame, param: str, metric: str) -> pl.DataFrame:
    """Mean of ``metric`` per (param value, seed): the seed is the unit of replication."""
    keys = [param, SEED] if SEED in df.columns and param != SEED else [param]
    return df.group_by(keys).agg(pl.col(metric).mean().alias("value"))


def categorical_effect_figure(ok: pl.DataFrame, param: str, metrics: list[str]) -> Figure:
    """Per value of ``param``: one point per seed (mean over that seed's trials), the mean, and the range across seeds."""
    fig, axes = new_figure(len(metrics), width=5.2)
    values = group_values(ok, param)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    counts = []
    for ax, metric in zip(axes, metrics):
        sm = _seed_means(ok.filter(pl.col(metric).is_not_null()), param, metric)
        for i, v in enumerate(values):
            pts = sm.filter(pl.col(param) == v)["value"].drop_nulls().to_numpy()
            if not len(pts):
                continue
            counts.append(len(pts))
            c = colour_for(v, i)
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(pts)), pts, s=26, alpha=0.75, color=c, marker=marker_for(v, i),
                       label="one seed" if i == 0 else None)
            mean = float(np.mean(pts))
            ax.errorbar(i + 0.3, mean, yerr=_spread(pts, mean), fmt="D", color="black", capsize=4, markersize=5,
                        label=("mean, range across seeds" if len(pts) > 1 else "mean") if i == 0 else None)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(axis_label(param))
        ax.set_ylabel(axis_label(metric))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"Effect of {param}\ndots = seeds, diamond = mean; {_n_note(counts)}", fontsize=9)
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
            ax.scatter(sub[param].to_numpy(), sub[metric].to_numpy(), s=24, alpha=0.75, color=colour_for(g, i),
                       marker=marker_for(g, i), label=str(g) if g is not None else "trials")
        # Binned means with the spread across seeds, over all criteria: the grouped effect of this parameter.
        binned = _seed_means(with_bins(ok.filter(pl.col(metric).is_not_null()), param), "bin_centre", metric)
        for j, ((centre,), b) in enumerate(binned.group_by(["bin_centre"], maintain_order=True)):
            pts = b["value"].drop_nulls().to_numpy()
            mean = float(np.mean(pts))
            ax.errorbar(centre, mean, yerr=_spread(pts, mean), fmt="D", color="black", capsize=4, markersize=5,
                        label="quartile-bin mean, range across seeds" if j == 0 else None)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(axis_label(param) + (" [log scale]" if log_x else ""))
        ax.set_ylabel(axis_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="split criterion", title_fontsize=8)
    fig.suptitle(f"Effect of {param}\ndots = trials, diamonds = quartile-bin mean, bars = range across seeds", fontsize=9)
    return fig


LETTERS_PER_ROW = 13
"""Letters per panel of the per-letter figure: two rows for the alphabet keep it readable at report width."""


def letters_figure(stats: pl.DataFrame, metric: str = "mean_absorption_fraction") -> Figure:
    """Per letter, one marker per criterion at the mean across its trials, a bar for their range (min–max).

    Stacked panels of ``LETTERS_PER_ROW`` letters, so the figure keeps a fixed
    width that the HTML report shows unscaled. Markers are dodged sideways, so
    criteria with identical values both show (and the title names them).
    """
    letters = sorted(stats["letter"].unique().to_list())
    groups = group_values(stats, CRITERION)
    rows = [letters[i:i + LETTERS_PER_ROW] for i in range(0, len(letters), LETTERS_PER_ROW)] or [[]]
    fig = Figure(figsize=(8.0, 2.6 * len(rows) + 0.9))  # not pyplot's: save_png does not close pyplot figures
    axes = fig.subplots(len(rows), 1, squeeze=False, sharey=True)
    width = 0.7 / max(1, len(groups))
    counts = []
    for ax, row in zip(axes[:, 0], rows):
        pos = {l: i for i, l in enumerate(row)}
        for j, g in enumerate(groups):
            sub = stats.filter((pl.col(CRITERION) == g) & pl.col("letter").is_in(row))
            if not sub.height:
                continue
            xs = np.array([pos[l] for l in sub["letter"].to_list()]) - 0.35 + width * (j + 0.5)
            mean = sub["mean"].to_numpy()
            lo, hi = sub["min"].to_numpy(), sub["max"].to_numpy()
            n = int(sub["n_trials"].max())
            counts.append(n)
            # Clipped at 0: equal values can average a rounding below their minimum.
            yerr = np.clip(np.vstack([mean - lo, hi - mean]), 0.0, None) if n > 1 else None
            ax.errorbar(xs, mean, yerr=yerr, fmt=marker_for(g, j), color=colour_for(g, j), markersize=5, capsize=2,
                        elinewidth=0.9, linestyle="none", label=f"{g} (n={n})")
        ax.set_xticks(range(len(row)), row)
        ax.set_xlim(-0.6, LETTERS_PER_ROW - 0.4)
        ax.set_xlabel("first letter")
        ax.set_ylabel(axis_label(metric).replace(" (", "\n("))
        ax.grid(alpha=0.3, axis="y")
    top = float(stats["max"].max() or 0.0) if stats.height else 0.0
    ncol = max(1, min(3, len(groups)))  # more columns than 3 run off the figure's width
    legend_rows = -(-len(groups) // ncol)
    # shared y; headroom for the legend's rows, a fraction starts at 0
    axes[0, 0].set_ylim(0, top * (1.2 + 0.15 * legend_rows) if top > 0 else 1.0)
    title = "arm (trials)" if any(" " in str(g) for g in groups) else "split criterion (trials)"
    axes[0, 0].legend(fontsize=8, title=title, title_fontsize=8, ncol=ncol,
                      loc="upper right")
    note = coincident_note(stats, CRITERION, ["letter", "mean"], overlap=False)  # dodged: both visible
    fig.suptitle(f"Per-letter absorption: markers = mean across trials; {_n_note(counts, 'trial')}{note}",
                 fontsize=9, wrap=True)
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
                    alpha=0.8, linewidth=1.4 + 0.6 * (len(LINESTYLES) - 1 - i % len(LINESTYLES)) / 2,
                    linestyle=LINESTYLES[i % len(LINESTYLES)],
                    label=f"{g} ({sub['trial_id'].n_unique()} trials)" if first else None)
            first = False
    ax.set_xlabel("training tokens (activation vectors)")
    ax.set_ylabel("cumulative split + resample events (count)")
    note = coincident_note(curves, CRITERION, ["tokens", "cumulative"])
    ax.set_title(f"Split and resample events over training (one line per trial){note}", fontsize=9, wrap=True)
    mixed = any(" " in str(g) for g in group_values(curves, CRITERION))  # arm_label prefixed an architecture
    ax.legend(fontsize=8, title="architecture, split criterion" if mixed else "split criterion", title_fontsize=8)
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
                ax.scatter(np.full(len(v), i), v, color=colour_for(g, i), marker=marker_for(g, i), alpha=0.7, s=24)
                ax.errorbar(i + 0.25, v.mean(), yerr=_spread(v, float(v.mean())), fmt="D", color="black", capsize=4)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups])
        ax.set_xlabel(axis_label(CRITERION))
        ax.set_ylabel(axis_label(col))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Events per trial (from the result rows; dots = trials, diamond = mean, bar = range)", fontsize=10)
    return fig

