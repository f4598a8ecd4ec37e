"""Resampling and splitting policies: the interface the trainer calls, and the classic baseline.

The trainer calls ``policy(ctx)`` every ``resample_every`` steps until
``resample_until`` of training, where ``policy = make_policy(split_cfg,
tracker_cfg)``. A policy edits the SAE (and optimizer state) in place and
returns one event dict per touched latent::

    {"step", "kind": "resample"|"split", "latent", "partner", "score", "group_sizes"}

Criteria: ``dead`` -> ``DeadResamplePolicy`` here (classic dead-latent
resampling, as in Anthropic's "Towards Monosemanticity"); ``fc``,
``frequency``, ``inconsistency`` -> ``fcsae.split.SplitPolicy``; ``none`` ->
no policy.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import torch

from fcsae.config import SplitConfig, TrackerConfig

log = logging.getLogger(__name__)

Policy = Callable[["ResampleContext"], list[dict]]

ENCODER_NORM_FRACTION = 0.2
"""Resampled encoder directions get this fraction of the mean alive encoder norm (Anthropic's choice)."""


class ResampleContext(NamedTuple):
    """Everything a policy may look at or modify at one resampling event."""

    sae: Any
    """The ``SparseAutoencoder`` being trained (modified in place)."""
    optimizer: torch.optim.Adam
    """Its optimizer: touched latents get their moments reset (``reset_adam_rows``)."""
    buffer_ND: torch.Tensor
    """Recent normalised inputs, float32, on the SAE's device."""
    dead_mask_F: torch.Tensor
    """True for latents that have not fired for ``dead_tokens`` tokens."""
    tracker: Any
    """The ``FrequencyConsistencyTracker`` or None."""
    step: int
    """Current optimiser step."""
    generator: torch.Generator
    """The trainer's generator (checkpointed), for reproducible sampling."""


@torch.no_grad()
def reset_adam_rows(optimizer: torch.optim.Adam, sae, latent_ids) -> None:
    """Zero Adam's moments of the given latents: encoder columns, encoder biases, decoder rows.

    Adam's step counter is per tensor, not per row, so it is left alone; zeroed
    moments make the next updates of these latents start from scratch.
    """
    ids = torch.as_tensor(latent_ids, dtype=torch.long, device=sae.W_dec.device)
    if ids.numel() == 0:
        return
    for param, dim in ((sae.W_enc, 1), (sae.b_enc, 0), (sae.W_dec, 0)):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, ids, 0.0)


@torch.no_grad()
def reconstruction_errors(sae, x_ND: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Squared reconstruction error ||x - x_hat||^2 per input, computed in chunks."""
    out = [((sae(x_ND[i:i + chunk]).recon_BD - x_ND[i:i + chunk]) ** 2).sum(1) for i in range(0, len(x_ND), chunk)]
    return torch.cat(out) if out else x_ND.new_zeros(0)


@torch.no_grad()
def resample_latents(sae, optimizer, latent_ids: torch.Tensor, dirs_ND: torch.Tensor) -> None:
    """Point the given latents at the given input directions (classic resampling).

    Decoder row = unit direction; encoder column = the same direction scaled
    to ``ENCODER_NORM_FRACTION`` of the mean encoder norm of the other
    latents; encoder bias 0; Adam moments of the touched rows reset.
    """
    unit_ND = dirs_ND / dirs_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive_F = torch.ones(sae.cfg.dict_size, dtype=torch.bool, device=unit_ND.device)
    alive_F[latent_ids] = False
    enc_norms_F = sae.W_enc.norm(dim=0)
    mean_norm = enc_norms_F[alive_F].mean() if alive_F.any() else enc_norms_F.mean()
    sae.W_dec[latent_ids] = unit_ND
    sae.W_enc[:, latent_ids] = (unit_ND * ENCODER_NORM_FRACTION * mean_norm).t()
    sae.b_enc[latent_ids] = 0.0
    reset_adam_rows(optimizer, sae, latent_ids)


class DeadResamplePolicy:
    """Classic dead-latent resampling: every dead latent gets an input the SAE reconstructs badly.

    Inputs are drawn from the buffer without replacement with probability
    proportional to their squared reconstruction error ||x - x_hat||^2 (with
    replacement if fewer inputs than dead latents have non-zero error).
    Inputs are centred by ``b_dec`` first, since the encoder sees ``x - b_dec``.
    """

    def __call__(self, ctx: ResampleContext) -> list[dict]:
        """Resample all dead latents; return one ``resample`` event per latent."""
        dead_ids = torch.nonzero(ctx.dead_mask_F).flatten()
        n = len(dead_ids)
        if n == 0 or len(ctx.buffer_ND) == 0:
            return []
        err_N = reconstruction_errors(ctx.sae, ctx.buffer_ND)
        if not torch.isfinite(err_N).all() or err_N.sum() <= 0:
            err_N = torch.ones_like(err_N)
        replacement = int((err_N > 0).sum()) < n
        pick_N = torch.multinomial(err_N.cpu(), n, replacement=replacement, generator=ctx.generator)
        pick_N = pick_N.to(ctx.buffer_ND.device)
        dirs_ND = ctx.buffer_ND[pick_N] - ctx.sae.b_dec.detach()
        resample_latents(ctx.sae, ctx.optimizer, dead_ids, dirs_ND)
        if ctx.tracker is not None:
            ctx.tracker.reset(dead_ids)
        log.debug("step %d: resampled %d dead latents", ctx.step, n)
        return [{"step": ctx.step, "kind": "resample", "latent": int(i), "partner": None,
                 "score": float(err_N[p]), "group_sizes": None} for i, p in zip(dead_ids.tolist(), pick_N.tolist())]


def make_policy(split_cfg: SplitConfig, tracker_cfg: TrackerConfig) -> Policy | None:
    """The policy for ``split_cfg.criterion``: None, the dead-latent baseline, or a ``SplitPolicy``."""
    if split_cfg.criterion == "none":
        return None
    if split_cfg.criterion == "dead":
        return DeadResamplePolicy()
    from fcsae.split import SplitPolicy  # lazy: the split module is optional for plain training

    return SplitPolicy(split_cfg)
