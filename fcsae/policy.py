"""The one table of resampling/splitting criteria and latent operations, and the policy factory.

This module imports neither torch nor the implementations, so ``fcsae.config``
validates ``split.criterion`` and ``split.operation`` against it; the
implementations are named as ``"module:attribute"`` and imported by
``make_policy`` (the only place that turns a config into a policy).

A **criterion** (``split.criterion``) says which latents are touched at a
resampling event:

- ``needs_tracker``: the trainer runs the frequency-consistency tracker;
- ``score``: ``TrackerScores -> score_F``, the per-latent quantity the
  selection rule (``split.rule``) ranks by (None for criteria that do not rank);
- ``policy``: the callable class run at each event (``Policy`` below).

An **operation** (``split.operation``) is what a score-selected latent
undergoes: ``fn(ctx, split_cfg, latent, x_ND, partner) -> LatentEvent | None``
with ``ctx`` the ``fcsae.resample.ResampleContext``, ``x_ND`` the latent's
activating inputs in the buffer relative to ``b_dec`` (at least
``split.min_inputs`` rows) and ``partner`` the recycled latent it may take
(dead first, else the least frequent); it returns the event (its ``score`` is
filled in by the policy) or None when it skipped the latent (the partner then
stays free for the next one). See ``fcsae.split.split_latent``.
Every operation writes latents through ``fcsae.resample.reinit_latents``, the
one re-initialisation path (SAE rows, Adam moments, tracker statistics, dead
counters).

To add a criterion: one row in ``CRITERIA`` (and, if it needs a new tracker
statistic, the field in ``TrackerScores``). To add an operation: one row in
``OPERATIONS`` and its function. A new SAE architecture needs nothing here as
long as its ``ForwardOutput`` has ``idx_BK``/``acts_BK`` or ``latents_BF`` and
its latents are the rows of ``W_dec``/columns of ``W_enc``/entries of ``b_enc``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # for annotations only: importing the config here would be a cycle
    from fcsae.config import SplitConfig, TrackerConfig

Policy = Callable[[Any], list]
"""``policy(ctx: ResampleContext) -> list[LatentEvent]``; edits the SAE and optimizer state in place."""


@dataclass(frozen=True)
class Criterion:
    """One row of ``CRITERIA``."""

    doc: str
    """What the criterion selects (shown in ``SplitConfig.criterion``'s error message and docs)."""
    needs_tracker: bool
    """The trainer must run the frequency-consistency tracker."""
    score: Callable[[Any], Any] | None
    """``TrackerScores -> score_F`` ranked by ``split.rule``; None when the policy does not rank latents."""
    policy: str | None
    """``"module:Class"`` built as ``Class(split_cfg)`` at each run; None: no policy (nothing is touched)."""
    detector: str | None = None
    """A ``fcsae.detectors.DETECTORS`` name scoring the latents from the SAE's weights and the input buffer
    (instead of ``score``)."""


@dataclass(frozen=True)
class Operation:
    """One row of ``OPERATIONS``."""

    doc: str
    """What happens to a selected latent."""
    fn: str
    """``"module:function"`` with the signature in the module docstring."""


CRITERIA: dict[str, Criterion] = {
    "none": Criterion("no resampling or splitting", False, None, None),
    "dead": Criterion("classic dead-latent resampling (Towards Monosemanticity)", False, None,
                      "fcsae.resample:DeadResamplePolicy"),
    "fc": Criterion("absorption score f*(1-c)", True, lambda s: s.score_F, "fcsae.split:SplitPolicy"),
    "frequency": Criterion("firing frequency f", True, lambda s: s.freq_F, "fcsae.split:SplitPolicy"),
    "inconsistency": Criterion("inconsistency 1-c", True, lambda s: 1.0 - s.consistency_F, "fcsae.split:SplitPolicy"),
    # Detectors (fcsae.detectors). They read weights and the buffer, not the tracker; the tracker still runs for the
    # eligibility (latents with tracked inputs) and recycling order every scored criterion uses.
    "siblings": Criterion("decoder rows shared with other latents (absorbers and their parent)", True, None,
                          "fcsae.split:SplitPolicy", "siblings"),
    "encdec": Criterion("encoder/decoder disagreement 1-cos(W_enc_i, W_dec_i)", True, None, "fcsae.split:SplitPolicy",
                        "encdec"),
    "coact": Criterion("silent where decoder partners fire although its direction is there (absorbed parents)", True,
                       None, "fcsae.split:SplitPolicy", "coact"),
    "coact_member": Criterion("fires where a decoder partner is silent although needed (absorbers)", True, None,
                              "fcsae.split:SplitPolicy", "coact_member"),
}
"""Criterion name -> how it is scored and which policy runs it. Keys are ``SplitConfig.criterion``'s values."""

OPERATIONS: dict[str, Operation] = {
    "split": Operation("2-means of the latent's activating inputs; the latent and a recycled partner take one "
                       "centroid each", "fcsae.split:split_latent"),
    "extract": Operation("the latent and its decoder siblings give their shared component to their parent latent (or "
                         "the recycled partner) and lose it from their own rows", "fcsae.extract:extract_latent"),
}
"""Operation name -> implementation. Keys are ``SplitConfig.operation``'s values."""


def scored(name: str) -> bool:
    """True for criteria that rank latents by a score (tracker or detector; the ones ``split.operation`` applies to)."""
    return CRITERIA[name].score is not None or CRITERIA[name].detector is not None


def load(ref: str) -> Any:
    """The object named by ``"module:attribute"``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def needs_tracker(split_cfg: "SplitConfig", tracker_cfg: "TrackerConfig") -> bool:
    """Whether the trainer runs the tracker: asked for, or needed by the criterion."""
    return tracker_cfg.enabled or CRITERIA[split_cfg.criterion].needs_tracker


def make_policy(split_cfg: "SplitConfig", tracker_cfg: "TrackerConfig | None" = None) -> Policy | None:
    """The policy for ``split_cfg.criterion`` (None for ``none``); ``tracker_cfg`` is accepted for symmetry."""
    ref = CRITERIA[split_cfg.criterion].policy
    return None if ref is None else load(ref)(split_cfg)
