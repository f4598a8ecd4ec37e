"""A fast stand-in runner for orchestrator tests: no language model, no cache.

It walks ``trainer.total_steps`` steps, sleeping ``step_s`` seconds per step, checkpointing its step every
other step to ``trial_dir/fake_ckpt.json`` (so an interrupted trial
continues), and returns metrics that are a deterministic function of the
params. Behaviour is steered by ``fake.json`` next to the experiment dir (workers of an
already running Ray cluster do not see later environment changes):

- ``step_s``: seconds per step (default 0.01);
- ``fail``: a ``split.criterion`` value whose trials raise;
- ``die``: a ``split.criterion`` value whose trials kill their worker process;
- ``hold_s``: seconds to wait after logging a completion, before the trial's row is written (the window in
  which a killed driver leaves a trial that finished its work but has no row);
- every completed run appends its trial id to ``<experiment>/fake_completions.log``
  and every start to ``fake_starts.log`` (so tests can check nothing ran twice); ``fake_nodes.log`` gets
  ``trial_id node_id step`` per start (which Ray node ran it, from which checkpointed step).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl

from orchestrator.space import section_configs
from orchestrator.trainable import TrialOutcome


def prepare(spec) -> dict:
    """Nothing to harvest: a fixed d_in. ``$FCSAE_FAKE_PREPARE_ERROR`` makes it refuse, as a bad model name would.

    ``$FCSAE_FAKE_PREPARE_WAIT_RAY``: wait up to that many seconds for the driver's Ray to come up, as a long
    harvest would, and record whether it did (``ray_up_during_prepare``).
    """
    if os.environ.get("FCSAE_FAKE_PREPARE_ERROR"):
        from fcsae.errors import FcsaeInputError

        raise FcsaeInputError(os.environ["FCSAE_FAKE_PREPARE_ERROR"])
    out = {"d_in": 8, "norm_scale": 1.0, "prepared_at": time.time()}
    if os.environ.get("FCSAE_FAKE_PREPARE_WAIT_RAY"):
        import ray

        end = time.time() + float(os.environ["FCSAE_FAKE_PREPARE_WAIT_RAY"])
        while not ray.is_initialized() and time.time() < end:
            time.sleep(0.1)
        out["ray_up_during_prepare"] = ray.is_initialized()
    return out


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _append(path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def run(ctx) -> TrialOutcome:
    """Walk the steps with interim reports and resumable checkpoints; fail on the configured criterion."""
    cfgs = section_configs(ctx.spec.fixed, ctx.params, d_in=ctx.shared["d_in"])
    # Remote storage runs trials in a scratch dir: the test then names the log dir in $FCSAE_FAKE_DIR.
    exp = Path(os.environ.get("FCSAE_FAKE_DIR") or ctx.trial_dir.parent.parent)
    _append(exp / "fake_starts.log", ctx.trial_id)
    ckpt = ctx.trial_dir / "fake_ckpt.json"
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    _append(exp / "fake_nodes.log", f"{ctx.trial_id} {_node_id()} {step}")
    total = cfgs["trainer"].total_steps
    knobs = exp.parent / "fake.json"
    behaviour = json.loads(knobs.read_text()) if knobs.exists() else {}
    step_s = float(behaviour.get("step_s", 0.01))
    t0 = time.perf_counter()
    if cfgs["split"].criterion == behaviour.get("fail"):
        raise FloatingPointError(f"loss diverged at step {step} (fake)")
    if cfgs["split"].criterion == behaviour.get("die"):
        os._exit(137)  # the worker dies as under the OOM killer: no row, no exception in the trial
    while step < total:
        time.sleep(step_s)
        step += 1
        loss = 1.0 / step
        if step % 2 == 0 or step == total:  # checkpoint every other step, like checkpoint_every
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, ckpt)
            (ctx.trial_dir / "checkpoint").mkdir(exist_ok=True)  # stands in for the trainer's resume state
            (ctx.trial_dir / "checkpoint" / "state.json").write_text(json.dumps({"step": step}))
        fvu = loss * cfgs["tracker"].ema_alpha  # differs between trials, so ASHA has something to rank
        ctx.report({"loss": loss, "fvu": fvu, "step": step}, step % 2 == 0 or step == total)
    alpha = cfgs["tracker"].ema_alpha
    seed = cfgs["trainer"].seed
    crit = cfgs["split"].criterion
    absorption = 0.2 + 0.1 * alpha + 0.01 * seed - (0.05 if crit == "fc" else 0.0)
    metrics = {"core.explained_variance": 0.9 - 0.001 * cfgs["sae"].dict_size / 64, "core.l0": float(cfgs["sae"].k),
               "absorption.mean_absorption_fraction": absorption, "absorption.mean_full_absorption": absorption / 2,
               "absorption.not_in_schema": 1.5}
    per_letter = pl.DataFrame({"letter": ["a", "b"], "mean_absorption_fraction": [absorption, absorption],
                               "probe_f1": [0.9, 0.8]})
    _append(exp / "fake_completions.log", ctx.trial_id)
    time.sleep(float(behaviour.get("hold_s", 0.0)))
    return TrialOutcome(metrics=metrics, per_letter=per_letter, configs=cfgs, tokens_trained=total * cfgs["trainer"].batch_size,
                        train_seconds=time.perf_counter() - t0, eval_seconds=0.0, n_split_events=1 if crit == "fc" else 0,
                        n_resample_events=1 if crit == "dead" else 0, final_loss=1.0 / max(step, 1))
