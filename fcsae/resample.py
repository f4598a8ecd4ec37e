"""Latent re-initialisation: the context a policy gets, its typed events, the one re-init path, the dead baseline.

The trainer calls ``policy(ctx)`` every ``resample_every`` steps until
``resample_until`` of training, where ``policy = fcsae.policy.make_policy(split_cfg)``
(the criterion table lives in ``fcsae.policy``). A policy returns one
``LatentEvent`` per touched latent (per pair for a split) and changes latents
only through ``reinit_latents``, which writes the SAE's encoder column,
encoder bias and decoder row and resets, for exactly those latents, Adam's
moments, the tracker's statistics and the dead counters.

``DeadResamplePolicy`` (criterion ``dead``) is classic dead-latent
resampling, as in Anthropic's "Towards Monosemanticity".
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

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
    tokens_since_fired_F: torch.Tensor | None = None
    """The trainer's dead counters (modified in place: a re-initialised latent starts alive); None outside a trainer."""
    taken: frozenset = frozenset()
    """Latents already re-initialised at this event (``fcsae.split.SplitPolicy`` fills it between operations): an
    operation neither selects nor groups them again."""


@dataclass(frozen=True)
class LatentEvent:
    """One resampled latent or one split pair, as logged in ``events.jsonl`` and the checkpoint."""

    step: int
    """Optimiser step of the event."""
    kind: str
    """``resample`` (a dead latent re-pointed) or the operation's name (``split``, ``extract``)."""
    latent: int
    """The latent touched (for a split: the one that was selected)."""
    partner: int | None = None
    """The recycled latent that took the other half of a split; for ``extract`` the latent that took the shared
    component (the group's parent, or a recycled one); None for a resample."""
    score: float | None = None
    """The criterion's score of ``latent`` (resample: the chosen input's squared reconstruction error)."""
    group_sizes: tuple[int, int] | None = None
    """Activating inputs of each half (``latent``'s first) for a split; for ``extract`` (siblings stripped,
    ``latent``'s activating inputs); None for a resample."""
    siblings: tuple[int, ...] | None = None
    """``extract``: the latents stripped of the shared component, at their slots after the event (a Matryoshka
    extract may move one, see ``fcsae.extract.place_shared``); None otherwise."""

    def to_dict(self) -> dict:
        """Plain JSON-ready mapping (lists, not tuples)."""
        d = dataclasses.asdict(self)
        for key in ("group_sizes", "siblings"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LatentEvent":
        """Inverse of ``to_dict``."""
        tuples = {key: tuple(d[key]) if d.get(key) is not None else None for key in ("group_sizes", "siblings")}
        return cls(**{**d, **tuples})

    @property
    def latents(self) -> list[int]:
        """Every latent the event re-initialised (the selected one, the partner, an extract's siblings), once each."""
        ids = [self.latent] + ([] if self.partner is None else [self.partner]) + list(self.siblings or ())
        return list(dict.fromkeys(ids))


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
def reinit_latents(ctx: ResampleContext, latent_ids, W_dec_ND: torch.Tensor, W_enc_ND: torch.Tensor,
                   b_enc_N: torch.Tensor) -> None:
    """The one way a latent is re-initialised: new decoder rows, encoder columns (given as rows) and encoder biases.

    Also resets, for exactly these latents, Adam's moments (``reset_adam_rows``),
    the tracker's statistics and the dead counters, so nothing of the old
    latent survives anywhere in the training state.
    """
    sae = ctx.sae
    ids = torch.as_tensor(latent_ids, dtype=torch.long, device=sae.W_dec.device).reshape(-1)
    sae.W_dec[ids] = W_dec_ND.to(sae.W_dec.dtype)
    sae.W_enc[:, ids] = W_enc_ND.t().to(sae.W_enc.dtype)
    sae.b_enc[ids] = torch.as_tensor(b_enc_N, device=sae.b_enc.device).to(sae.b_enc.dtype)
    reset_adam_rows(ctx.optimizer, sae, ids)
    if ctx.tracker is not None:
        ctx.tracker.reset(ids)
    if ctx.tokens_since_fired_F is not None:
        ctx.tokens_since_fired_F[ids.to(ctx.tokens_since_fired_F.device)] = 0


@torch.no_grad()
def resample_latents(ctx: ResampleContext, latent_ids: torch.Tensor, dirs_ND: torch.Tensor) -> None:
    """Point the given latents at the given input directions (classic resampling).

    Decoder row = unit direction; encoder column = the same direction scaled
    to ``ENCODER_NORM_FRACTION`` of the mean encoder norm of the other
    latents; encoder bias 0.
    """
    sae = ctx.sae
    unit_ND = dirs_ND / dirs_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive_F = torch.ones(sae.cfg.dict_size, dtype=torch.bool, device=unit_ND.device)
    alive_F[latent_ids] = False
    enc_norms_F = sae.W_enc.norm(dim=0)
    mean_norm = enc_norms_F[alive_F].mean() if alive_F.any() else enc_norms_F.mean()
    reinit_latents(ctx, latent_ids, unit_ND, unit_ND * ENCODER_NORM_FRACTION * mean_norm,
                   torch.zeros(len(latent_ids)))


class DeadResamplePolicy:
    """Classic dead-latent resampling: every dead latent gets an input the SAE reconstructs badly.

    Inputs are drawn from the buffer without replacement with probability
    proportional to their squared reconstruction error ||x - x_hat||^2 (with
    replacement if fewer inputs than dead latents have non-zero error).
    Inputs are centred by ``b_dec`` first, since the encoder sees ``x - b_dec``.
    """

    def __init__(self, split_cfg=None):
        """No settings: every dead latent is resampled (``split_cfg`` is accepted like every policy's)."""

    def __call__(self, ctx: ResampleContext) -> list[LatentEvent]:
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
        resample_latents(ctx, dead_ids, dirs_ND)
        log.debug("step %d: resampled %d dead latents", ctx.step, n)
        return [LatentEvent(ctx.step, "resample", int(i), score=float(err_N[p]))
                for i, p in zip(dead_ids.tolist(), pick_N.tolist())]
