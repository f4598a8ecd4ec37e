"""Trainer: one SAE, a stream of batches, Adam, schedules, resampling, exact checkpoint/resume.

The loop only sees an iterable of normalised [B, D] batches; metrics, events
and checkpoints go out through callbacks (objects with any of
``on_metrics(step, metrics)``, ``on_event(event)``, ``on_checkpoint(step)``).

Losses (inputs normalised so that E||x|| = sqrt(d_in), see ``ActivationCache``):

- reconstruction: ``mse = mean_b ||x_b - x_hat_b||^2`` (summed over D);
- relu: ``+ l1 * mean_b sum_i a_bi ||W_dec_i||`` (Anthropic's April-2024 form; L1 warm-up);
- topk, batchtopk, matryoshka: ``+ auxk_coeff * ||e - e_hat||^2 / ||e - mean(e)||^2`` where ``e`` is the
  (detached) residual and ``e_hat`` its reconstruction by the top ``auxk_k`` dead
  latents (Gao et al. 2024). Their decoders are kept at unit row norm
  (gradient parallel to the rows removed, rows renormalised after each step);
- matryoshka: the reconstruction term is ``matryoshka_loss``, the weighted mean
  over nested prefixes of each prefix's error, all prefixes decoding the same
  BatchTopK activations truncated to the prefix (Bussmann et al. 2025);
- batchtopk, matryoshka: after each step the inference threshold moves toward
  the batch's smallest kept activation (``SparseAutoencoder.update_threshold``).

Checkpoint layout (a directory written under a temporary name and renamed):
``state.safetensors`` (SAE parameters ``sae.*``, Adam moments ``optim.*``,
tracker state ``tracker.*``, dead counters, the input buffer, the RNG state) and
``state.json`` (step, configs, buffer position, event counts, events).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fcsae.config import SPARSE_ACTIVATIONS, SAEConfig, SplitConfig, TrackerConfig, TrainerConfig, from_dict
from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path, write_json
from fcsae.policy import make_policy, needs_tracker
from fcsae.resample import LatentEvent, ResampleContext
from fcsae.sae import ForwardOutput, SparseAutoencoder, bf16_encoder_pays

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LOGGED_METRICS = ("loss", "mse", "l1", "auxk", "fvu", "l0", "dead_frac", "lr", "step", "tokens")
"""Interim metrics ``Trainer._metrics`` logs every ``log_every`` steps (loss parts depend on the activation);
sweeps may early-stop on them as ``train.<name>``."""
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class StepOutput(NamedTuple):
    """What ``Trainer.train_step`` returns."""

    metrics: dict | None
    """Metrics on logging steps (every ``log_every`` and the last), else None."""
    events: list
    """The ``LatentEvent`` s of a resampling event at this step (empty on most steps)."""


class TrainResult(NamedTuple):
    """What ``train_from_cache`` returns."""

    sae: SparseAutoencoder
    """The trained SAE (also saved under ``out_dir/sae``)."""
    tracker: Any
    """The ``FrequencyConsistencyTracker`` or None."""
    events: list
    """All ``LatentEvent`` s of the run (also in ``out_dir/events.jsonl``)."""
    metrics: dict
    """Metrics of the last step."""
    out_dir: Path
    """Where the outputs were written."""


def _callback(callbacks, name: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


def matryoshka_loss(prefix_BLD: torch.Tensor, x_BD: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Weighted mean over nested prefixes of ``mean_b ||x_b - prefix_recon_b||^2`` (weights sum to 1)."""
    err_L = (prefix_BLD - x_BD[:, None, :]).pow(2).sum(2).mean(0)
    return (err_L * torch.tensor(weights, dtype=err_L.dtype, device=err_L.device)).sum()


class LayoutAdam(torch.optim.Adam):
    """``torch.optim.Adam`` that hands a transposed-view parameter (``W_enc``) to the fused kernel as its contiguous
    transpose.

    The CPU fused kernel walks the parameter, gradient and moments as flat
    memory (fine when all four share one layout) but first calls
    ``grad.contiguous()``, which for ``W_enc``'s [D, F] view of an [F, D]
    tensor is a strided copy it then does not use (measured 50 ms of a 65 ms
    update at 16,384 x 576, one thread). Passing the ``.t()`` of all four, which
    are contiguous and hold the same elements in the same memory, gives the
    kernel the same element-wise update without the copy. Tensors whose four
    layouts differ are passed as they are.
    """

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *rest):
        first = len(params)
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *rest)
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
        for i in range(first, len(params)):
            p = params[i]
            if p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous() and all(
                    lst[i].stride() == p.stride() for lst in lists):
                for lst in lists:
                    lst[i] = lst[i].t()
        return has_complex


class Trainer:
    """Trains one ``SparseAutoencoder`` (see the module docstring)."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainerConfig, split_cfg: SplitConfig = SplitConfig(),
                 tracker_cfg: TrackerConfig = TrackerConfig()):
        """Set up Adam, the RNG, dead counters, the input buffer, the tracker and the policy."""
        self.cfg, self.split_cfg, self.tracker_cfg = cfg, split_cfg, tracker_cfg
        self.device = torch.device(cfg.device)
        self.sae = sae.to(self.device)
        self.sae.encoder_bf16 = cfg.bf16_encoder == "on" or (cfg.bf16_encoder == "auto" and bf16_encoder_pays(self.device))
        n_lat, d_in = sae.cfg.dict_size, sae.cfg.d_in
        # fused: one pass per tensor instead of ~6 (2.4x faster Adam step on this CPU at 16384 x 640).
        self.optimizer = LayoutAdam(self.sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.tracker = None
        if needs_tracker(split_cfg, tracker_cfg):
            from fcsae.tracker import FrequencyConsistencyTracker  # lazy: optional for plain training

            self.tracker = FrequencyConsistencyTracker(tracker_cfg, n_lat, d_in, device=self.device)
        self.policy = make_policy(split_cfg, tracker_cfg)
        self.step = 0
        self.tokens_since_fired_F = torch.zeros(n_lat, dtype=torch.long, device=self.device)
        self.buffer_ND = torch.zeros(cfg.buffer_tokens, d_in, device=self.device)
        self.buffer_pos = 0
        self.buffer_fill = 0
        self.events: list[LatentEvent] = []
        self.last_metrics: dict = {}

    # ------------------------------------------------------------ schedules
    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: linear warm-up, flat, then linear decay to 0 from ``decay_start``."""
        c, total = self.cfg, self.cfg.total_steps
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        decay_from = int(c.decay_start * total)
        decay = (total - step) / (total - decay_from) if step >= decay_from and total > decay_from else 1.0
        return c.lr * warm * max(0.0, min(1.0, decay))

    def l1_at(self, step: int) -> float:
        """L1 coefficient at ``step`` (relu only): linear warm-up over ``l1_warmup_steps``."""
        c = self.cfg
        return c.l1_coeff * (min(1.0, (step + 1) / c.l1_warmup_steps) if c.l1_warmup_steps > 0 else 1.0)

    @property
    def dead_mask_F(self) -> torch.Tensor:
        """Latents that have not fired for ``dead_tokens`` tokens."""
        return self.tokens_since_fired_F >= self.cfg.dead_tokens

    # ---------------------------------------------------------------- step
    def _losses(self, x_BD: torch.Tensor, step: int) -> tuple[torch.Tensor, dict, ForwardOutput]:
        sae, c = self.sae, self.cfg
        relu = sae.cfg.activation == "relu"
        use_aux = not relu and c.auxk_coeff > 0
        out, aux = sae.forward_aux(x_BD, self.dead_mask_F if use_aux else None, c.auxk_k if use_aux else 0)
        err_BD = out.recon_BD - x_BD
        mse = err_BD.pow(2).sum(1).mean()
        parts = {"mse": mse}
        loss = mse
        if out.prefix_recons_BLD is not None:
            loss = matryoshka_loss(out.prefix_recons_BLD, x_BD, sae.level_weights)
            parts["matryoshka_mse"] = loss
        if relu:
            l1 = (out.latents_BF * sae.W_dec.norm(dim=1)).sum(1).mean()
            parts["l1"] = l1
            loss = loss + self.l1_at(step) * l1
        if aux is not None:
            resid_BD = -err_BD.detach()
            denom = (resid_BD - resid_BD.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
            auxk = (sae.decode_aux(aux) - resid_BD).pow(2).sum(1).mean() / denom
            parts["auxk"] = auxk
            loss = loss + c.auxk_coeff * auxk
        parts["loss"] = loss
        return loss, parts, out

    def train_step(self, x_BD: torch.Tensor) -> "StepOutput":
        """One optimiser step on ``x_BD`` (then a resampling event when one is due)."""
        c, sae, step = self.cfg, self.sae, self.step
        x_BD = x_BD.to(self.device, torch.float32)
        if step == 0 and c.b_dec_init != "zeros":
            sae.init_b_dec(x_BD, c.b_dec_init)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, parts, out = self._losses(x_BD, step)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss.item()} at step {step}; the last checkpoint (if any) is left as it was")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sparse = sae.cfg.activation in SPARSE_ACTIVATIONS
        if sparse:
            sae.remove_parallel_decoder_grad()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), c.grad_clip)
        self.optimizer.step()
        sae.recycle_grads()
        if sparse:
            sae.normalize_decoder()
        with torch.no_grad():
            out = out._replace(**{f: t.detach() for f, t in out._asdict().items() if isinstance(t, torch.Tensor)})
            if sae.batch:
                sae.update_threshold(out, c.threshold_decay)
            self._update_counters(out, x_BD)
        self.step += 1
        events = self._maybe_resample()
        metrics = None
        if self.step % c.log_every == 0 or self.step >= c.total_steps:
            metrics = self._metrics(parts, out, x_BD, lr)
        return StepOutput(metrics, events)

    def _update_counters(self, out: ForwardOutput, x_BD: torch.Tensor) -> None:
        if out.idx_BK is not None:
            fired_F = torch.zeros_like(self.tokens_since_fired_F, dtype=torch.bool)
            fired_F[out.idx_BK[out.acts_BK > 0]] = True
        else:
            fired_F = (out.latents_BF > 0).any(0)
        self.tokens_since_fired_F += len(x_BD)
        self.tokens_since_fired_F[fired_F] = 0
        if self.tracker is not None:
            self.tracker.update(out, x_BD)
        self._push_buffer(x_BD)

    def _push_buffer(self, x_BD: torch.Tensor) -> None:
        cap = len(self.buffer_ND)
        if cap == 0:
            return
        x_BD = x_BD[-cap:]
        n = len(x_BD)
        first = min(n, cap - self.buffer_pos)
        self.buffer_ND[self.buffer_pos:self.buffer_pos + first] = x_BD[:first]
        self.buffer_ND[:n - first] = x_BD[first:]
        self.buffer_pos = (self.buffer_pos + n) % cap
        self.buffer_fill = min(cap, self.buffer_fill + n)

    def _maybe_resample(self) -> list[LatentEvent]:
        c = self.cfg
        if self.policy is None or c.resample_every == 0 or self.step % c.resample_every:
            return []
        if self.step > c.resample_until * c.total_steps:
            return []
        ctx = ResampleContext(self.sae, self.optimizer, self.buffer_ND[:self.buffer_fill], self.dead_mask_F,
                              self.tracker, self.step, self.generator, self.tokens_since_fired_F)
        events = self.policy(ctx) or []
        self.events.extend(events)
        return events

    @torch.no_grad()
    def _metrics(self, parts: dict, out: ForwardOutput, x_BD: torch.Tensor, lr: float) -> dict:
        m = {k: float(v) for k, v in parts.items()}
        err = (out.recon_BD - x_BD).pow(2).sum()
        var = (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        m["fvu"] = float(err / var)
        if out.acts_BK is not None:
            m["l0"] = float((out.acts_BK > 0).sum(1).float().mean())
        else:
            m["l0"] = float((out.latents_BF > 0).sum(1).float().mean())
        m["dead_frac"] = float(self.dead_mask_F.float().mean())
        m["lr"] = lr
        m["step"] = self.step
        m["tokens"] = self.step * self.cfg.batch_size
        self.last_metrics = m
        return m

    # ----------------------------------------------------------------- fit
    def fit(self, batches: Iterable[torch.Tensor], callbacks=None, progress: bool = False) -> list[dict]:
        """Train until ``total_steps`` (or the stream ends); returns the events of this call."""
        callbacks = list(callbacks or [])
        c = self.cfg
        new_events: list[LatentEvent] = []
        if self.step >= c.total_steps:
            return new_events
        bar = tqdm(total=c.total_steps * c.batch_size, initial=self.step * c.batch_size, unit="tok",
                   unit_scale=True, disable=not progress, desc="train")
        try:
            for x_BD in batches:
                metrics, events = self.train_step(x_BD)
                bar.update(len(x_BD))
                for ev in events:
                    _callback(callbacks, "on_event", ev)
                new_events.extend(events)
                if metrics is not None:
                    bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}")
                    _callback(callbacks, "on_metrics", self.step, metrics)
                if c.checkpoints_at(self.step):
                    _callback(callbacks, "on_checkpoint", self.step)
                if self.step >= c.total_steps:
                    break
        finally:
            bar.close()
        return new_events

    # ---------------------------------------------------------- checkpoint
    def _param_names(self) -> dict[str, torch.nn.Parameter]:
        return {name: getattr(self.sae, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the training state (SAE, Adam, tracker, counters, buffer, RNG)."""
        t = {f"sae.{n}": p.detach() for n, p in self._param_names().items()}
        for n, p in self._param_names().items():
            for key, val in self.optimizer.state.get(p, {}).items():
                t[f"optim.{n}.{key}"] = val
        if self.tracker is not None:
            t.update({f"tracker.{k}": v for k, v in self.tracker.state_dict().items()})
        if self.sae.batch:
            t["sae.threshold"] = self.sae.threshold
        t["state.tokens_since_fired"] = self.tokens_since_fired_F
        t["state.buffer"] = self.buffer_ND[:self.buffer_fill]
        t["state.rng"] = self.generator.get_state()
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write the full training state to directory ``path`` (temporary directory, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            save_file(self.state_tensors(), str(tmp / STATE_TENSORS))
            meta = {
                "version": CHECKPOINT_VERSION, "step": self.step, "buffer_pos": self.buffer_pos,
                "buffer_fill": self.buffer_fill, "fast": self.sae.fast,
                "events": [ev.to_dict() for ev in self.events],
                "sae": dataclasses.asdict(self.sae.cfg), "trainer": dataclasses.asdict(self.cfg),
                "split": dataclasses.asdict(self.split_cfg), "tracker": dataclasses.asdict(self.tracker_cfg),
            }
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
            old = path.parent / f".{path.name}.old"
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load_checkpoint(cls, path: str | os.PathLike, device: str | None = None) -> "Trainer":
        """Rebuild a trainer from ``save_checkpoint`` output; continuing it reproduces the uninterrupted run."""
        path = Path(path)
        try:
            meta = json.loads((path / STATE_JSON).read_text())
            tensors = load_file(str(path / STATE_TENSORS))
        except FileNotFoundError:
            raise FcsaeInputError(f"{path}: not a checkpoint directory (needs {STATE_JSON} and {STATE_TENSORS})") from None
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise FcsaeInputError(f"{path}: corrupt checkpoint ({e})") from None
        if meta.get("version") != CHECKPOINT_VERSION:
            raise FcsaeInputError(f"{path}: checkpoint version {meta.get('version')!r}, this fcsae reads {CHECKPOINT_VERSION}")
        trainer_d = dict(meta["trainer"], **({"device": device} if device else {}))
        trainer = cls(SparseAutoencoder(from_dict(SAEConfig, meta["sae"], "sae."), fast=meta.get("fast", True)),
                      from_dict(TrainerConfig, trainer_d, "trainer."), from_dict(SplitConfig, meta["split"], "split."),
                      from_dict(TrackerConfig, meta["tracker"], "tracker."))
        trainer._load_tensors(tensors, path)
        trainer.step, trainer.buffer_pos, trainer.buffer_fill = meta["step"], meta["buffer_pos"], meta["buffer_fill"]
        trainer.events = [LatentEvent.from_dict(ev) for ev in meta["events"]]
        return trainer

    @torch.no_grad()
    def _load_tensors(self, t: dict[str, torch.Tensor], path: Path) -> None:
        def take(name: str) -> torch.Tensor:
            if name not in t:
                raise FcsaeInputError(f"{path}: checkpoint lacks tensor {name}")
            return t.pop(name)

        for n, p in self._param_names().items():
            val = take(f"sae.{n}")
            if val.shape != p.shape:
                raise FcsaeInputError(f"{path}: sae.{n} has shape {tuple(val.shape)}, expected {tuple(p.shape)}")
            p.copy_(val)
            state = {}
            for key in [k.split(".", 2)[2] for k in list(t) if k.startswith(f"optim.{n}.")]:
                val = take(f"optim.{n}.{key}")
                if key == "step":
                    state[key] = val.to(p.device)  # fused Adam keeps its step counter on the parameter's device
                else:
                    # Same memory layout as the parameter (W_enc is a transposed view).
                    state[key] = torch.empty_like(p).copy_(val.to(self.device))
            if state:
                self.optimizer.state[p] = state
        if self.sae.batch:
            self.sae.threshold.copy_(take("sae.threshold"))
        if self.tracker is not None:
            prefix = "tracker."
            self.tracker.load_state_dict({k[len(prefix):]: t.pop(k).to(self.device) for k in list(t) if k.startswith(prefix)})
        self.tokens_since_fired_F.copy_(take("state.tokens_since_fired"))
        buf = take("state.buffer")
        self.buffer_ND[:len(buf)] = buf.to(self.device)
        self.generator.set_state(take("state.rng"))


class LogMetrics:
    """Callback that logs each metrics dict through ``logging`` (used by ``fcsae train``)."""

    def on_metrics(self, step: int, metrics: dict) -> None:
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step",)))

    def on_event(self, event) -> None:
        log.debug("event %s", event)


class _CheckpointCallback:
    """Saves the trainer's state to ``path`` whenever the loop asks for a checkpoint."""

    def __init__(self, trainer: Trainer, path: Path):
        self.trainer, self.path = trainer, path

    def on_checkpoint(self, step: int) -> None:
        self.trainer.save_checkpoint(self.path)


def _resume_or_new(ckpt: Path, sae_cfg, trainer_cfg, split_cfg, tracker_cfg, resume: bool) -> Trainer:
    if not ckpt.exists() and (ckpt.parent / f".{ckpt.name}.old").exists():
        ckpt = ckpt.parent / f".{ckpt.name}.old"  # a crash between the two renames of save_checkpoint
    if resume and ckpt.exists():
        trainer = Trainer.load_checkpoint(ckpt, device=trainer_cfg.device)
        got = (trainer.sae.cfg, dataclasses.replace(trainer.cfg, device=trainer_cfg.device), trainer.split_cfg, trainer.tracker_cfg)
        for name, a, b in zip(("sae", "trainer", "split", "tracker"), got, (sae_cfg, trainer_cfg, split_cfg, tracker_cfg)):
            if a != b:
                raise FcsaeInputError(f"{ckpt}: checkpoint was made with a different {name} config; "
                                      f"use a new --out or resume=False")
        log.info("resuming from %s at step %d", ckpt, trainer.step)
        return trainer
    return Trainer(SparseAutoencoder(sae_cfg, seed=trainer_cfg.seed), trainer_cfg, split_cfg, tracker_cfg)


def remove_checkpoint(out_dir) -> int:
    """Delete ``out_dir``'s training checkpoint (``checkpoint`` and its ``.checkpoint.old``); returns bytes freed.

    For runs that are finished and recorded (a sweep trial with its row written):
    the SAE in ``out_dir/sae`` stays; only the resume state (Adam moments, buffer) goes.
    """
    freed = 0
    for path in (Path(out_dir) / "checkpoint", Path(out_dir) / ".checkpoint.old"):
        if path.is_dir() and not path.is_symlink():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
    return freed


def train_from_cache(cache_path, sae_cfg: SAEConfig, trainer_cfg: TrainerConfig, split_cfg: SplitConfig = SplitConfig(),
                     tracker_cfg: TrackerConfig = TrackerConfig(), out_dir=None, callbacks=None,
                     resume: bool = True, progress: bool = True) -> TrainResult:
    """Train one SAE on an activation cache and write ``out_dir/sae``, ``out_dir/events.jsonl``, ``out_dir/train.json``.

    Resumes from ``out_dir/checkpoint`` when present (and ``resume``); the
    reader restarts at batch ``trainer.step`` of the same seeded order, so the
    resumed run equals the uninterrupted one. Checkpoints are written every
    ``checkpoint_every`` steps and at the end.
    """
    from fcsae.activations import ActivationCache  # lazy: keeps the trainer importable on its own

    if out_dir is None:
        raise FcsaeInputError("out_dir: required")
    cache = ActivationCache(cache_path)
    if cache.d_in != sae_cfg.d_in:
        raise FcsaeInputError(f"d_in: the cache {cache_path} holds {cache.d_in}-dim activations, the SAE config says {sae_cfg.d_in}")
    out_dir = Path(out_dir)
    trainer = _resume_or_new(out_dir / "checkpoint", sae_cfg, trainer_cfg, split_cfg, tracker_cfg, resume)
    batches = cache.batches(trainer_cfg.batch_size, seed=trainer_cfg.seed, start_batch=trainer.step)
    trainer.fit(batches, callbacks=[_CheckpointCallback(trainer, out_dir / "checkpoint"), *(callbacks or [])],
                progress=progress)
    extra = {f"tracker.{k}": v for k, v in trainer.tracker.state_dict().items()} if trainer.tracker is not None else None
    trainer.sae.save(out_dir / "sae", extra_tensors=extra)
    with atomic_path(out_dir / "events.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(ev.to_dict()) + "\n" for ev in trainer.events))
    metrics = trainer.last_metrics
    write_json(out_dir / "train.json", {
        "cache": str(cache_path), "norm_scale": cache.norm_scale, "step": trainer.step, "metrics": metrics,
        "sae": dataclasses.asdict(sae_cfg), "trainer": dataclasses.asdict(trainer_cfg),
        "split": dataclasses.asdict(split_cfg), "tracker": dataclasses.asdict(tracker_cfg),
    })
    return TrainResult(trainer.sae, trainer.tracker, list(trainer.events), metrics, out_dir)
