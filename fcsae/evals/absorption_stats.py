"""Summary of one SAE's absorption eval: the means, a bootstrap interval, and whether the number means anything.

The mean absorption fraction averages per-letter means over the scored
letters; its interval resamples each letter's scored words (probe true
positives) with replacement, so it covers word sampling only, not the probe's
or the SAE's training noise.

"Meaningful": absorption is measured against each letter's main latents,
so it only says something about letters that have one. A letter *has a
latent* when its best single latent alone detects the letter (k=1 sparse-probe
F1 > ``LATENT_F1``). The score is meaningful when SAEBench would score the
model/layer at all (>= ``MIN_LETTERS`` letters pass the probe) and at least
``MEANINGFUL_SHARE`` of the scored letters have a latent; otherwise a low
score only says that no latent exists to be absorbed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

MIN_LETTERS = 20
"""SAEBench's ``min_feats_for_eval``: with fewer kept letters it refuses to score (``fcsae eval`` too; sweeps warn)."""
LATENT_F1 = 0.6
"""A letter "has a latent" when its best single latent's k=1 sparse-probe F1 exceeds this (SAEBench's probe bar)."""
MEANINGFUL_SHARE = 0.5
"""The score is meaningful when at least this share of the scored letters has a latent (and >= MIN_LETTERS are kept)."""


def bootstrap_interval(fractions: list[np.ndarray], n_resamples: int, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over letters of per-letter mean fractions, resampling words within letters."""
    groups = [f for f in fractions if len(f)]
    if not groups or n_resamples <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means_BL = np.stack([f[rng.integers(0, len(f), (n_resamples, len(f)))].mean(1) for f in groups], axis=1)
    overall_B = means_BL.mean(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(overall_B, [tail, 100 - tail])
    return float(lo), float(hi)


def summarise(table: pl.DataFrame, fractions: list[np.ndarray], data, eval_cfg, n_kept: int) -> dict[str, Any]:
    """The summary dict of one SAE (``absorption.*`` row columns)."""
    scored = table.filter(pl.col("num_probe_true_positives") > 0)
    mean = lambda col: float(scored[col].mean()) if scored.height else float("nan")  # noqa: E731
    lo, hi = bootstrap_interval(fractions, eval_cfg.absorption_bootstrap, seed=eval_cfg.seed)
    with_latent = int((scored["sparse_f1_k1"] > LATENT_F1).sum()) if scored.height else 0
    meaningful = bool(n_kept >= MIN_LETTERS and scored.height and with_latent >= MEANINGFUL_SHARE * scored.height)
    return {
        "mean_absorption_fraction": mean("mean_absorption_fraction"),
        "mean_absorption_fraction_lo": lo,
        "mean_absorption_fraction_hi": hi,
        "mean_full_absorption": mean("full_absorption_rate"),
        "mean_num_split_features": mean("num_split_features"),
        "n_letters": float(n_kept),
        "n_letters_scored": float(scored.height),
        "n_scored_words": float(scored["num_probe_true_positives"].sum()) if scored.height else 0.0,
        "probe_f1_mean": float(np.mean([m["f1"] for m in data.probe_metrics])),
        "letters_with_latent": with_latent,
        "meaningful": meaningful,
        "probe": eval_cfg.absorption_probe,
        "n_words": int(len(data.labels_train_N) + len(data.labels_test_N)),
    }


def verdict(summary: dict[str, Any]) -> str:
    """One plain sentence on what the score can say (for ``fcsae eval``, summaries and reports)."""
    n = int(summary.get("n_letters_scored") or 0)
    with_latent = int(summary.get("letters_with_latent") or 0)
    value, lo, hi = (summary.get(k) for k in ("mean_absorption_fraction", "mean_absorption_fraction_lo",
                                               "mean_absorption_fraction_hi"))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "No absorption score: no letter could be scored."
    span = f"{value:.3f} (95% interval {lo:.3f}-{hi:.3f} over {int(summary.get('n_scored_words') or 0)} words, {n} letters)"
    if summary.get("meaningful"):
        return f"Mean absorption fraction {span}; {with_latent} of {n} letters have a first-letter latent."
    if int(summary.get("n_letters") or 0) < MIN_LETTERS:
        return (f"Mean absorption fraction {span}, but SAEBench would not score this model/layer (fewer than "
                f"{MIN_LETTERS} letters pass the probe): the number means little.")
    return (f"Degenerate SAE: only {with_latent} of {n} letters have a latent that alone detects the letter "
            f"(k=1 F1 > {LATENT_F1}), so its mean absorption fraction {span} says little about absorption.")
