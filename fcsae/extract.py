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

Optimizer moments and tracker statistics of every touched latent are reset,
as for a split. ``extract_plan`` is the math (pure); ``apply_extract`` writes it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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


@torch.no_grad()
def apply_extract(sae, plan: ExtractPlan, target: int, optimizer=None, tracker=None) -> list[int]:
    """Write ``plan`` into ``sae`` with ``target`` as the shared latent; reset moments and statistics; touched ids."""
    from fcsae.resample import reset_adam_rows  # the trainer's module; imported late to keep import order simple

    u = plan.u_D.to(sae.W_dec.device, sae.W_dec.dtype)
    sae.W_dec[target] = u
    sae.W_enc[:, target] = u.to(sae.W_enc.dtype)
    sae.b_enc[target] = 0.0
    for j, dec_D, beta in zip(plan.siblings, plan.sib_dec_SD, plan.sib_scale_S.tolist()):
        sae.W_dec[j] = dec_D.to(sae.W_dec.dtype)
        sae.W_enc[:, j] *= beta
        sae.b_enc[j] *= beta
    touched = [target, *plan.siblings]
    if optimizer is not None:
        reset_adam_rows(optimizer, sae, touched)
    if tracker is not None:
        tracker.reset(touched)
    return touched
