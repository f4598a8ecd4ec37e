"""The de-absorbing ``extract`` operation: give a group's shared component back to one latent.

Absorption folds a parent direction into its children's decoder rows while the
parent's own latent goes silent on them. A 2-means split of an absorber never
recovers the parent (both halves still carry it). ``extract`` undoes the fold
for a group of latents that share a component (decoder siblings):

1. **Shared direction** ``u``: the common factor of the group's unit decoder
   rows (``shared_direction``). For children ``a_j u + b_j c_j`` with
   orthogonal ``c_j`` it is ``u`` exactly.
2. **Target**: a group member whose decoder row is already ``u`` (cosine >=
   ``target_cos``: the absorbed parent) keeps its place; else a recycled latent
   (dead first, then the least frequent) is used. Its decoder row becomes
   ``u`` and its encoder the projection on ``u`` (``W = u``, ``b = 0``), so it
   fires on the union of the group's inputs with the magnitude of ``u`` in
   them.
3. **Siblings** (the other members): decoder row ``d_j -> (d_j - (d_j . u) u) / beta_j``
   with ``beta_j = ||d_j - (d_j . u) u||``; encoder column and bias scaled by
   ``beta_j``. On an input where sibling j fired with ``a_j``, it now fires on
   the same inputs with ``beta_j a_j`` and writes ``a_j d_j - a_j (d_j . u) u``:
   the target's ``(x - b_dec) . u`` supplies the removed part.

Everything is written through ``fcsae.resample.reinit_latents``, the one
re-initialisation path: Adam moments, tracker statistics and dead counters of
every touched latent are reset, as for a split. ``extract_plan`` is the math
(pure); ``place_shared`` puts the shared latent first in a Matryoshka SAE's
nested prefixes; ``apply_extract`` writes it; ``extract_latent`` is the
operation the policy table (``fcsae.policy.OPERATIONS["extract"]``) runs for a
selected latent.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

TARGET_COS = 0.9
"""A group member whose decoder cosine with the shared direction reaches this is the group's own parent latent."""


class ExtractPlan(NamedTuple):
    """New weights for one group (see the module docstring)."""

    u_D: torch.Tensor
    """Shared direction (unit)."""
    target: int | None
    """The member that becomes the shared latent, or None when a recycled latent is needed."""
    siblings: list[int]
    """Members whose decoder rows lose the shared component."""
    sib_dec_SD: torch.Tensor
    """Their new (unit) decoder rows."""
    sib_scale_S: torch.Tensor
    """beta_j: factor on their encoder columns and biases."""
    shared_S: torch.Tensor
    """d_j . u: how much of each sibling's row was the shared component."""


def shared_direction(dec_GD: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """The one direction all rows share: the common factor of their Gram matrix.

    Rows ``d_j = s_j u + r_j`` with residuals ``r_j`` orthogonal to ``u`` and to
    each other have Gram matrix ``d_j . d_k = s_j s_k`` off the diagonal: a
    one-factor model. ``s`` is fitted by principal-axis factoring (the top
    eigenpair of the Gram matrix with its diagonal replaced by ``s_j^2``,
    iterated), then ``u`` is the row-space vector with ``D u = s``
    (``D^T G^+ s``). The top singular vector of ``D`` is not it: the cross terms
    ``s_j (u r_j^T + r_j u^T)`` tilt it towards the residuals (measured on the
    toy: cosine 0.91 with the planted parent where this gives 0.99). Two rows
    cannot tell their shares apart; they get equal ones.
    """
    U_GD = dec_GD.float() / dec_GD.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    G_GG = (U_GD @ U_GD.T).double()
    n = G_GG.shape[0]
    off_GG = G_GG - torch.diag(torch.diagonal(G_GG))
    s_G = off_GG.abs().max(1).values.sqrt()
    for _ in range(iters):
        evals, evecs = torch.linalg.eigh(off_GG + torch.diag(s_G.pow(2)))
        new_G = evecs[:, -1] * evals[-1].clamp_min(0.0).sqrt()
        new_G = new_G if float(new_G.sum()) >= 0 else -new_G
        if float((new_G - s_G).abs().max()) < 1e-7:
            s_G = new_G
            break
        s_G = new_G.clamp(-1.0, 1.0)
    u_D = (U_GD.double().T @ (torch.linalg.pinv(G_GG) @ s_G)).float() if n > 1 else U_GD[0]
    u_D = u_D / u_D.norm().clamp_min(1e-12)
    return u_D if float(U_GD.sum(0) @ u_D) >= 0 else -u_D


def extract_plan(W_dec_FD: torch.Tensor, group: list[int], target_cos: float = TARGET_COS) -> ExtractPlan:
    """The new rows for ``group`` (at least two latents); pure, reads only ``W_dec_FD``."""
    if len(group) < 2:
        raise ValueError(f"extract needs a group of at least two latents, got {group}")
    dec_GD = W_dec_FD[group].detach().float()
    dec_GD = dec_GD / dec_GD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u_D = shared_direction(dec_GD)
    cos_G = dec_GD @ u_D
    best = int(cos_G.argmax())
    target = group[best] if float(cos_G[best]) >= target_cos else None
    # Other members aligned with u are duplicates of the parent: leave them to training, do not strip them.
    sib_pos = [g for g in range(len(group)) if float(cos_G[g]) < target_cos]
    siblings = [group[g] for g in sib_pos]
    shared_S = cos_G[sib_pos]
    rest_SD = dec_GD[sib_pos] - shared_S[:, None] * u_D
    beta_S = rest_SD.norm(dim=1)
    return ExtractPlan(u_D, target, siblings, rest_SD / beta_S.clamp_min(1e-12)[:, None], beta_S, shared_S)


def place_shared(sae, target: int, siblings: list[int]) -> tuple[int, list[int]]:
    """The slots of the shared latent and of the siblings (in ``siblings``' order).

    Unchanged (``target``, ``siblings``) except for nested-prefix SAEs
    (``matryoshka``): there latent i is in every prefix wider than i, so the
    shared direction takes the earliest index among the touched latents, and
    the sibling that held it moves to ``target``'s slot. Every prefix that held
    a group member then holds the shared direction; left at a recycled
    (typically late, rarely used) slot, the early prefixes' losses, which no
    longer get the shared component from the stripped siblings, would push
    them to absorb it again. The move costs nothing extra: every touched
    latent's optimiser moments, tracker statistics and dead counter are reset.
    """
    first = min([target, *siblings])
    if getattr(sae, "widths", None) is None or first == target:
        return target, list(siblings)
    return first, [target if j == first else j for j in siblings]


@torch.no_grad()
def apply_extract(ctx, plan: ExtractPlan, target: int) -> list[int]:
    """Write ``plan`` into ``ctx.sae`` with ``target`` as the shared latent (at the slot ``place_shared`` gives),
    through ``reinit_latents`` (which also resets their Adam moments, tracker statistics and dead counters).

    Returns the touched ids: the shared latent's slot first, then the siblings' slots in ``plan.siblings``' order.
    """
    from fcsae.resample import reinit_latents  # the trainer's module; imported late to keep import order simple

    sae = ctx.sae
    u_D = plan.u_D.to(sae.W_dec.device, torch.float32)
    beta_S = plan.sib_scale_S.to(u_D.device)
    shared, sib_slots = place_shared(sae, target, plan.siblings)
    ids = [shared, *sib_slots]
    W_dec_ND = torch.cat([u_D[None], plan.sib_dec_SD.to(u_D.device)])
    W_enc_ND = torch.cat([u_D[None], sae.W_enc[:, plan.siblings].t().float() * beta_S[:, None]])
    b_enc_N = torch.cat([u_D.new_zeros(1), sae.b_enc[plan.siblings].float() * beta_S])
    reinit_latents(ctx, ids, W_dec_ND, W_enc_ND, b_enc_N)
    return ids


def sibling_group(W_dec_FD: torch.Tensor, latent: int, thresh: float, max_size: int = 16,
                  exclude=()) -> list[int]:
    """``latent`` and the (at most ``max_size - 1``) latents whose decoder cosine with it is >= ``thresh``, none of
    ``exclude``."""
    W_FD = W_dec_FD.detach().float()
    U_FD = W_FD / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_F = U_FD @ U_FD[latent]
    cos_F[latent] = -2.0
    if exclude:
        cos_F[torch.as_tensor(sorted(exclude), dtype=torch.long, device=cos_F.device)] = -2.0
    order = torch.sort(-cos_F, stable=True).indices[:max_size - 1]
    return [latent] + [int(j) for j in order if float(cos_F[j]) >= thresh]


@torch.no_grad()
def extract_latent(ctx, cfg, lat: int, x_ND: torch.Tensor, partner: int):
    """The ``extract`` operation of ``fcsae.policy.OPERATIONS``: de-absorb the group of ``lat``'s decoder siblings.

    The group is ``lat`` and the latents whose decoder cosine with it is >=
    ``cfg.sibling_cos``, none re-initialised earlier in this event
    (``ctx.taken``). Returns None (nothing done) for a group of one, a group
    with nothing to strip, or when it would need ``partner`` but ``partner``
    is in it. ``x_ND`` (``lat``'s activating inputs) is not used:
    the plan reads decoder rows. The event's ``partner`` is the shared latent's
    slot, ``siblings`` the stripped latents' slots (``place_shared``),
    ``group_sizes`` (siblings stripped, ``lat``'s activating inputs).
    """
    from fcsae.resample import LatentEvent

    group = sibling_group(ctx.sae.W_dec, lat, cfg.sibling_cos, exclude=getattr(ctx, "taken", ()))
    if len(group) < 2:
        return None
    plan = extract_plan(ctx.sae.W_dec, group)
    target = plan.target if plan.target is not None else partner
    if not plan.siblings or target in plan.siblings:
        return None
    shared, *sib_slots = apply_extract(ctx, plan, target)
    log.info("step %d: extract: siblings %s of latent %d give their shared component to latent %d (%s%s)", ctx.step,
             plan.siblings, lat, shared, "their parent" if plan.target is not None else "recycled",
             "" if shared == target else f", moved from {target}; siblings now at {sib_slots}")
    return LatentEvent(ctx.step, "extract", lat, shared, group_sizes=(len(plan.siblings), int(x_ND.shape[0])),
                       siblings=tuple(sib_slots))
