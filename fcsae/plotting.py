"""Shared figure helpers for reports and analyses: axis labels with units, a label check, atomic PNG writes.

Figures are plain ``matplotlib.figure.Figure`` objects, not pyplot's: they
need no display and no backend switch, so importing this module changes no
global matplotlib state (a program that uses pyplot interactively keeps its
backend) and works on servers and in CI. Every saved figure must have labelled axes: ``save_png`` refuses one
without (a programming error, ``ValueError``), so no unlabelled figure reaches
a report.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from fcsae.io import atomic_path

AXIS_LABELS: dict[str, str] = {
    "absorption.mean_absorption_fraction": "absorption fraction (share of true positives)",
    "absorption.mean_full_absorption": "full-absorption rate (share of true positives)",
    "absorption.mean_num_split_features": "split features per letter (latents)",
    "mean_absorption_fraction": "absorption fraction (share of true positives)",
    "full_absorption_rate": "full-absorption rate (share of true positives)",
    "core.explained_variance": "explained variance (fraction)",
    "core.l0": "L0 (active latents per token)",
    "core.mse": "MSE (per dimension, normalised inputs)",
    "core.ce_loss_score": "CE-loss score (1 = no loss from splicing)",
    "core.kl_div_score": "KL score (1 = no divergence from splicing)",
    "core.frac_dead": "dead latents (fraction of dictionary)",
    "split.criterion": "split criterion",
    "trainer.seed": "seed",
    "sae.dict_size": "dictionary size (latents)",
    "sae.k": "k (active latents per token, TopK)",
    "tracker.ema_alpha": "tracker EMA decay alpha (unitless)",
    "tracker.tau_act": "activation threshold tau_act (normalised activation units)",
    "trainer.lr": "learning rate (Adam)",
    "split.z": "split z-score threshold (standard deviations)",
    "split.top_fraction": "split top fraction (share of latents)",
    "n_split_events": "latent splits (count)",
    "n_resample_events": "dead-latent resamples (count)",
}
"""Column -> axis label with its unit; unknown columns are labelled by their name."""

CRITERION_COLOURS: dict[str, str] = {
    "none": "#555555", "dead": "#1f77b4", "fc": "#d62728", "frequency": "#2ca02c", "inconsistency": "#9467bd",
    "siblings": "#8c564b", "encdec": "#ff7f0e", "coact": "#17becf", "coact_member": "#e377c2",
}
"""Fixed colour per split criterion, so every figure of a report uses the same key."""


CRITERION_MARKERS: dict[str, str] = {"none": "o", "dead": "s", "fc": "^", "frequency": "D", "inconsistency": "v",
                                     "siblings": "P", "encdec": "X", "coact": "<", "coact_member": ">"}
"""Fixed marker per split criterion: series that coincide stay distinguishable (drawn large to small)."""
ACTIVATION_MARKERS: dict[str, str] = {"topk": "o", "batchtopk": "s", "matryoshka": "*", "relu": "X"}
"""Fixed marker per architecture (``sae.activation``) where a figure compares architectures (colour = criterion)."""
LINESTYLES = ("-", "--", ":", "-.")
"""Line styles cycled per group, so a line lying on another still shows through its gaps."""


def marker_for(value, i: int) -> str:
    """Marker of a criterion (fixed) or of the i-th other group."""
    if isinstance(value, str) and value in CRITERION_MARKERS:
        return CRITERION_MARKERS[value]
    return "osD^v<>"[i % 7]


def axis_label(column: str) -> str:
    """The axis label (with unit) for a result column."""
    return AXIS_LABELS.get(column, column)


def colour_for(value, i: int) -> str:
    """Colour of a criterion (fixed) or of the i-th other group (matplotlib's cycle)."""
    if isinstance(value, str) and value in CRITERION_COLOURS:
        return CRITERION_COLOURS[value]
    return f"C{i % 10}"


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2) -> tuple[Figure, list]:
    """A figure with ``ncols`` side-by-side axes (returned as a list)."""
    fig = Figure(figsize=(width * ncols, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, list(axes[0])


def unlabelled_axes(fig: Figure) -> list[str]:
    """Descriptions of the visible axes that lack an x or y label (empty when all are labelled)."""
    bad = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.has_data():
            continue
        if not ax.get_xlabel().strip() or not ax.get_ylabel().strip():
            bad.append(f"axes {i} ({ax.get_title() or 'untitled'})")
    return bad


def save_png(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    """Check the labels, write ``fig`` as a PNG atomically; returns the path."""
    bad = unlabelled_axes(fig)
    if bad:
        raise ValueError(f"figure {Path(path).name}: unlabelled axes: {', '.join(bad)}")
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
