"""The real trial runner: activation cache -> ``train_from_cache`` -> core and absorption evals.

``prepare`` runs once in the driver (harvest, warm the eval caches);
``run`` runs inside a Tune trial. The language model needed by the evals is
kept per worker process, so with ``reuse_actors`` consecutive trials on one
worker load it once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fcsae.config import section_configs
from orchestrator.space import SweepSpec
from orchestrator.trainable import TrialContext, TrialOutcome, now_seconds

log = logging.getLogger(__name__)

_LM_CACHE: dict[tuple, Any] = {}


def _lm(lm_cfg):
    """The worker's loaded model for ``lm_cfg`` (loads once per process; drops other models)."""
    from fcsae.lm import load_model

    key = (lm_cfg.model, lm_cfg.device, lm_cfg.dtype)
    if key not in _LM_CACHE:
        _LM_CACHE.clear()
        _LM_CACHE[key] = load_model(lm_cfg.model, device=lm_cfg.device, dtype=lm_cfg.dtype)
    return _LM_CACHE[key]


def prepare(spec: SweepSpec) -> dict[str, Any]:
    """Harvest the activation cache and warm the enabled evals' caches, once, in the driver."""
    from fcsae.activations import ActivationCache, harvest

    cfgs = section_configs(spec.fixed)
    lm = _lm(cfgs["lm"])
    cache_path = harvest(cfgs["harvest"], lm=lm)
    if spec.evals["core"]:
        from fcsae.evals.core import prepare_core_cache

        prepare_core_cache(cfgs["lm"], cfgs["eval"], lm=lm)
    if spec.evals["absorption"]:
        from fcsae.evals.absorption import prepare_absorption_cache

        prepare_absorption_cache(cfgs["lm"], cfgs["eval"], lm=lm)
    cache = ActivationCache(cache_path)
    _LM_CACHE.clear()  # the driver does not need the model any more
    return {"cache_path": str(Path(cache_path).resolve()), "d_in": int(cache.d_in), "norm_scale": float(cache.norm_scale)}


class _TuneCallback:
    """Trainer callback: interim metrics to Tune; the report at a checkpoint step carries a checkpoint."""

    def __init__(self, ctx: TrialContext, trainer_cfg):
        self.ctx, self.cfg = ctx, trainer_cfg
        self.pending: dict | None = None  # metrics of a step that will also checkpoint
        self.latest: dict = {}

    def on_metrics(self, step: int, metrics: dict) -> None:
        self.latest = dict(metrics)
        if self.cfg.checkpoints_at(step):
            self.pending = self.latest
        else:
            self.ctx.report(self.latest, False)

    def on_checkpoint(self, step: int) -> None:
        # The final step may not be a logging step: send the latest metrics we have, with this step.
        self.ctx.report({**(self.pending or self.latest), "step": step}, True)
        self.pending = None


def run(ctx: TrialContext) -> TrialOutcome:
    """Train (resuming from ``ctx.trial_dir/checkpoint``) and evaluate one SAE."""
    from fcsae.trainer import train_from_cache

    shared = ctx.shared
    cfgs = section_configs(ctx.spec.fixed, ctx.params, d_in=shared["d_in"])
    cfgs["trainer"] = cfgs["trainer"].resumable()
    t0 = now_seconds()
    result = train_from_cache(shared["cache_path"], cfgs["sae"], cfgs["trainer"], cfgs["split"], cfgs["tracker"],
                              out_dir=ctx.trial_dir, callbacks=[_TuneCallback(ctx, cfgs["trainer"])], resume=True,
                              progress=False)
    train_s = now_seconds() - t0
    metrics: dict[str, float] = {}
    per_letter = None
    t1 = now_seconds()
    if ctx.spec.evals["core"]:
        from fcsae.evals.core import evaluate_core

        core = evaluate_core(result.sae, cfgs["lm"], cfgs["eval"], shared["norm_scale"], lm=_lm(cfgs["lm"]))
        metrics.update({f"core.{k}": v for k, v in core.items()})
    if ctx.spec.evals["absorption"]:
        from fcsae.evals.absorption import evaluate_absorption

        absorption = evaluate_absorption(result.sae, cfgs["lm"], cfgs["eval"], shared["norm_scale"], lm=_lm(cfgs["lm"]))
        metrics.update({f"absorption.{k}": v for k, v in absorption.summary.items()})
        per_letter = absorption.per_letter
    kinds = [ev.kind for ev in result.events]
    return TrialOutcome(
        metrics=metrics, per_letter=per_letter, configs=cfgs,
        tokens_trained=int(result.metrics.get("tokens", cfgs["trainer"].total_steps * cfgs["trainer"].batch_size)),
        train_seconds=train_s, eval_seconds=now_seconds() - t1,
        # Every split.operation event (split or extract) counts as a split; resample is the dead baseline's.
        n_split_events=len(kinds) - kinds.count("resample"), n_resample_events=kinds.count("resample"),
        final_loss=result.metrics.get("loss"), sae_path=str(ctx.trial_dir / "sae"),
        events_path=str(ctx.trial_dir / "events.jsonl"),
    )
