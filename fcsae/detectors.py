"""Absorption detectors: per-latent scores from SAE weights, tracker statistics and a buffer of recent inputs.

Each detector returns one score per latent (shape [F], higher = more suspect)
and stays within O(F x D) memory: F x F quantities (decoder cosines between
all latents) are computed in row blocks of ``chunk`` latents and reduced at
once to per-latent numbers or to each latent's ``partners`` best partners.

- ``fc_normalized`` / ``fc_seed``: the seed's s_i = f_i (1 - c_i) with either
  consistency definition (``FrequencyConsistencyTracker.scores``).
- ``siblings``: decoder-sibling sharing. Absorbers share the parent direction
  with their siblings, so their decoder rows have a sizeable cosine with
  several other rows; the score is the sum of the cosines above
  ``sibling_cos`` (the count of such siblings, weighted by how much they share).
- ``encdec``: encoder/decoder disagreement, 1 - cos(W_enc[:, i], W_dec[i]).
  An absorbed parent's encoder learns to switch off on the children (negative
  child components) while its decoder stays on the parent; an absorber's
  encoder detects the child while its decoder writes parent + child.
- ``coact``: co-activation structure, from the buffer. For latent p and its
  ``partners`` decoder neighbours j (cosine >= ``sibling_cos``), accumulate
  over inputs where j fires and p is silent the *missing* activation of p,
  relu((x - b_dec) . d_p), relative to p's mean activation when it fires. An
  absorbed parent is silent exactly when one of its children fires although
  its direction is in the input, so its missing activation there is ~1 (its
  full magnitude); a clean latent's neighbours (if any) carry little of its
  direction. ``coact`` of p is the union-weighted mean over its partners;
  ``coact_member`` of j is the largest such ratio over the latents p it
  silences (the absorber side of the same pairs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fcsae.errors import FcsaeInputError

DETECTORS = ("fc_normalized", "fc_seed", "siblings", "encdec", "coact", "coact_member")
"""Per-latent detector scores the panel reports (criteria names add the ``det_`` prefix nowhere: these are the names)."""

SIBLING_COS = 0.25
"""Decoder cosine above which two latents count as sharing a component (the issue's planted-setup threshold)."""
PARTNERS = 8
"""Decoder neighbours kept per latent for the co-activation detector."""
CHUNK = 1024
"""Latents (rows of the F x F cosine matrix) or buffer rows handled at once."""


def unit_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    W_FD = W_FD.detach().float()
    return W_FD / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Neighbours(NamedTuple):
    """Each latent's best decoder partners (chunked top-k over the F x F cosines, diagonal excluded)."""

    idx_FM: torch.Tensor
    """Partner latent ids, highest cosine first."""
    cos_FM: torch.Tensor
    """Their decoder cosines."""


@torch.no_grad()
def decoder_neighbours(W_dec_FD: torch.Tensor, m: int = PARTNERS, chunk: int = CHUNK) -> Neighbours:
    """The ``m`` other latents with the highest decoder cosine, per latent; memory O(chunk x F)."""
    U_FD = unit_rows(W_dec_FD)
    F = U_FD.shape[0]
    m = min(m, F - 1)
    idx, cos = [], []
    for s in range(0, F, chunk):
        c_CF = U_FD[s:s + chunk] @ U_FD.T
        rows = torch.arange(s, min(s + chunk, F), device=c_CF.device)
        c_CF[rows - s, rows] = -2.0
        v, i = c_CF.topk(m, dim=1)
        idx.append(i)
        cos.append(v)
    return Neighbours(torch.cat(idx), torch.cat(cos))


@torch.no_grad()
def sibling_score(W_dec_FD: torch.Tensor, thresh: float = SIBLING_COS, chunk: int = CHUNK) -> torch.Tensor:
    """Sum over other latents of their decoder cosine with latent i, counting only cosines above ``thresh``."""
    U_FD = unit_rows(W_dec_FD)
    F = U_FD.shape[0]
    out = torch.zeros(F, device=U_FD.device)
    for s in range(0, F, chunk):
        c_CF = U_FD[s:s + chunk] @ U_FD.T
        rows = torch.arange(s, min(s + chunk, F), device=c_CF.device)
        c_CF[rows - s, rows] = 0.0
        out[s:s + chunk] = (c_CF * (c_CF > thresh)).sum(1)
    return out


@torch.no_grad()
def encdec_disagreement(W_enc_DF: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """1 - cos(encoder column i, decoder row i), in [0, 2]."""
    return 1.0 - (unit_rows(W_enc_DF.T) * unit_rows(W_dec_FD)).sum(1)


def _active_dense(sae, x_CD: torch.Tensor, tau_act: float) -> torch.Tensor:
    """Bool [C, F]: which latents fire on each row (the SAE's own activation rule, TopK included)."""
    return sae.encode(x_CD).abs() > tau_act


class Coactivation(NamedTuple):
    """Co-activation detector: per latent, and per (latent, partner) pair."""

    parent_F: torch.Tensor
    """``coact``: how much of latent p's activation is missing where its decoder partners fire and p is silent."""
    member_F: torch.Tensor
    """``coact_member``: the largest such ratio over the latents a latent fires without."""
    ratio_FM: torch.Tensor
    """Missing activation of p over inputs where partner j fires (0 where not a partner)."""
    partners: Neighbours
    """The pairs considered."""


@torch.no_grad()
def coactivation(sae, buffer_ND: torch.Tensor, thresh: float = SIBLING_COS, m: int = PARTNERS,
                 tau_act: float = 0.0, chunk: int = 256) -> Coactivation:
    """The co-activation detector (module docstring) on ``buffer_ND``; memory O(chunk x F x m) bools at most.

    Pairs (p, j) are each latent's ``m`` best decoder neighbours with cosine
    >= ``thresh``; the buffer is encoded ``chunk`` rows at a time.
    """
    nb = decoder_neighbours(sae.W_dec, m)
    F, M = nb.idx_FM.shape
    valid_FM = nb.cos_FM >= thresh
    U_FD = unit_rows(sae.W_dec)
    b_dec = sae.b_dec.detach().float()
    missing_FM = torch.zeros(F, M, dtype=torch.float64, device=U_FD.device)
    union_FM = torch.zeros(F, M, dtype=torch.float64, device=U_FD.device)
    act_sum_F = torch.zeros(F, dtype=torch.float64, device=U_FD.device)
    act_n_F = torch.zeros(F, dtype=torch.float64, device=U_FD.device)
    for s in range(0, buffer_ND.shape[0], chunk):
        x_CD = buffer_ND[s:s + chunk].float()
        lat_CF = sae.encode(x_CD).float()
        on_CF = lat_CF.abs() > tau_act
        act_sum_F += lat_CF.sum(0).double()
        act_n_F += on_CF.sum(0).double()
        proj_CF = ((x_CD - b_dec) @ U_FD.T).clamp_min(0.0)
        gap_CF = proj_CF * ~on_CF  # p's direction present while p is silent
        for k in range(M):
            j_F = nb.idx_FM[:, k]
            j_on_CF = on_CF[:, j_F].float()
            union_FM[:, k] += j_on_CF.sum(0).double()
            missing_FM[:, k] += (j_on_CF * gap_CF).sum(0).double()
    mean_act_F = (act_sum_F / act_n_F.clamp_min(1.0)).float()
    ratio_FM = (missing_FM / union_FM.clamp_min(1.0)).float() / mean_act_F.clamp_min(1e-6)[:, None]
    ratio_FM = torch.where(valid_FM & (act_n_F[:, None] > 0), ratio_FM, torch.zeros_like(ratio_FM))
    w_FM = union_FM.float() * valid_FM
    parent_F = (ratio_FM * w_FM).sum(1) / w_FM.sum(1).clamp_min(1.0)
    member_F = torch.zeros(F, device=U_FD.device).scatter_reduce(0, nb.idx_FM.reshape(-1), ratio_FM.reshape(-1),
                                                                  reduce="amax", include_self=True)
    return Coactivation(parent_F, member_F, ratio_FM, nb)


def tracker_fc(tracker, consistency: str) -> torch.Tensor:
    """The seed's s_i with the given consistency definition, from the tracker's statistics."""
    return tracker.scores(consistency=consistency).score_F


@torch.no_grad()
def detector_panel(sae, tracker=None, buffer_ND: torch.Tensor | None = None, names=DETECTORS,
                   thresh: float = SIBLING_COS, tau_act: float = 0.0) -> dict[str, torch.Tensor]:
    """Every requested detector's per-latent score: the fc ones need ``tracker``, ``coact*`` need ``buffer_ND``."""
    bad = [n for n in names if n not in DETECTORS]
    if bad:
        raise FcsaeInputError(f"detector {bad[0]!r}: must be one of {', '.join(DETECTORS)}")
    out: dict[str, torch.Tensor] = {}
    co = None
    for n in names:
        if n.startswith("fc_"):
            if tracker is None:
                raise FcsaeInputError(f"detector {n}: needs the frequency-consistency tracker")
            out[n] = tracker_fc(tracker, n[len("fc_"):])
        elif n == "siblings":
            out[n] = sibling_score(sae.W_dec, thresh)
        elif n == "encdec":
            out[n] = encdec_disagreement(sae.W_enc, sae.W_dec)
        else:
            if buffer_ND is None:
                raise FcsaeInputError(f"detector {n}: needs a buffer of recent inputs")
            co = co or coactivation(sae, buffer_ND, thresh, tau_act=tau_act)
            out[n] = co.parent_F if n == "coact" else co.member_F
    return out
