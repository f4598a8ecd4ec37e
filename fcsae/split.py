"""Absorption-guided latent splitting (docs/design.md, "The method").

At each resampling event ``SplitPolicy`` reads the tracker's scores, ranks
latents by the criterion's score (``fcsae.policy.CRITERIA``), selects them by
the configured rule, and applies ``split.operation``
(``fcsae.policy.OPERATIONS``) to each; the ``split`` operation
(``split_latent``) divides a selected latent i in two:

1. its activating inputs in the recent buffer (found by running the SAE on the
   buffer) are taken relative to ``b_dec`` -- the origin the SAE's encoder and
   decoder work from, as the dead-latent baseline does -- and divided by
   2-means (k-means++ seeding from ``ctx.generator``, then Lloyd iterations);
2. latent i takes the centroid closer in direction to its current decoder row,
   a recycled latent j (dead first, else the least frequent one, never a latent
   selected in this event) takes the other;
3. decoder rows = unit centroid directions; encoder columns and biases from
   ``split_encoders``: each half fires on its own group's side of the other
   centroid, with its own centroid's projection as activation. Plain centroid
   directions as encoders (the first version, like classic resampling but at
   latent i's norm) fired both halves on shared components and raised a small
   toy run's FVU from 0.64 to ~1.3; the classic 0.2 x mean norm makes an alive
   latent's halves too weak to enter a TopK SAE's top k;
4. both are written through ``fcsae.resample.reinit_latents``, which resets
   their Adam moments, tracker statistics and dead counters.

Latents with fewer than ``min_inputs`` activating inputs in the buffer, or
whose inputs do not separate into two non-empty groups, are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import torch

from fcsae import policy
from fcsae.config import SplitConfig
from fcsae.errors import FcsaeInputError
from fcsae.resample import LatentEvent, ResampleContext, reinit_latents

log = logging.getLogger(__name__)

ENCODE_CHUNK = 2048
"""Buffer rows encoded at once when looking for activating inputs (bounds the dense [chunk, F] memory)."""


class TwoMeans(NamedTuple):
    """Result of ``two_means``."""

    centroids_2D: torch.Tensor
    """The two centroids."""
    assign_N: torch.Tensor
    """Group (0 or 1) of each input."""
    sizes: tuple[int, int]
    """Inputs per group."""


def criterion_scores(criterion: str, scores, ctx=None, sibling_cos: float = 0.25) -> torch.Tensor:
    """The per-latent quantity a criterion ranks by: its ``score`` of the tracker's scores, or its ``detector``
    (``fcsae.detectors``) on ``ctx``'s SAE, tracker and buffer (``fcsae.policy.CRITERIA``)."""
    if criterion not in policy.CRITERIA or not policy.scored(criterion):
        raise ValueError(f"criterion {criterion!r} is not a scored criterion ({', '.join(_scored_names())})")
    row = policy.CRITERIA[criterion]
    if row.detector is None:
        return row.score(scores)
    from fcsae.detectors import detector_panel

    tau = getattr(getattr(ctx.tracker, "cfg", None), "tau_act", 0.0)
    return detector_panel(ctx.sae, ctx.tracker, ctx.buffer_ND, [row.detector], sibling_cos, tau)[row.detector]


def _scored_names() -> list[str]:
    return [n for n in policy.CRITERIA if policy.scored(n)]


def select_latents(score_F: torch.Tensor, eligible_F: torch.Tensor, cfg: SplitConfig) -> torch.Tensor:
    """Latents selected by ``cfg.rule``, highest score first (not yet capped by ``max_splits``).

    The population is the eligible latents with a positive score. ``zscore``:
    score > mean + z * std over the population (population std). ``top_fraction``:
    the ``max(1, floor(top_fraction * population))`` highest scores, ties to the
    lower index.
    """
    pop_F = eligible_F & (score_F > 0)
    ids = pop_F.nonzero().flatten()
    if ids.numel() == 0:
        return ids
    vals = score_F[ids].double()
    if cfg.rule == "zscore":
        thresh = vals.mean() + cfg.z * vals.std(unbiased=False)
        keep = vals > thresh
        ids, vals = ids[keep], vals[keep]
    else:
        n = max(1, int(cfg.top_fraction * ids.numel()))
        order = torch.sort(-vals, stable=True).indices[:n]
        ids, vals = ids[order], vals[order]
    order = torch.sort(-vals, stable=True).indices
    return ids[order]


def two_means(x_ND: torch.Tensor, iters: int, generator: torch.Generator) -> TwoMeans | None:
    """2-means of the rows of ``x_ND``: k-means++ seeding, then ``iters`` Lloyd steps.

    Deterministic given the generator's state. None when the rows do not
    separate (all identical, or a group runs empty).
    """
    n = x_ND.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    d2_N = (x_ND - x_ND[first]).pow(2).sum(1)
    if not bool((d2_N > 0).any()):
        return None
    second = int(torch.multinomial(d2_N.double().cpu(), 1, generator=generator))
    cent_2D = torch.stack([x_ND[first], x_ND[second]])
    assign_N = None
    for _ in range(iters):
        new_assign_N = torch.cdist(x_ND, cent_2D).argmin(1)
        if assign_N is not None and torch.equal(new_assign_N, assign_N):
            break
        assign_N = new_assign_N
        n1 = int(assign_N.sum())
        if n1 == 0 or n1 == n:
            return None
        cent_2D = torch.stack([x_ND[assign_N == 0].mean(0), x_ND[assign_N == 1].mean(0)])
    n1 = int(assign_N.sum())
    return TwoMeans(cent_2D, assign_N, (n - n1, n1))


@torch.no_grad()
def activating_rows(sae, x_ND: torch.Tensor, latent_ids: torch.Tensor, tau_act: float) -> list[torch.Tensor]:
    """For each latent in ``latent_ids``, the buffer rows where ``|a| > tau_act`` (chunked forward, no [N, F] tensor)."""
    F = sae.cfg.dict_size
    pos_F = torch.full((F,), -1, dtype=torch.int64, device=x_ND.device)
    pos_F[latent_ids] = torch.arange(latent_ids.numel(), device=x_ND.device)
    pairs_rows, pairs_pos = [], []
    for start in range(0, x_ND.shape[0], ENCODE_CHUNK):
        out = sae(x_ND[start:start + ENCODE_CHUNK])
        if getattr(out, "idx_BK", None) is not None:
            p_BK = pos_F[out.idx_BK]
            hit_BK = (p_BK >= 0) & (out.acts_BK.abs() > tau_act)
            rows, cols = hit_BK.nonzero(as_tuple=True)
            p = p_BK[rows, cols]
        else:
            rows, p = (out.latents_BF[:, latent_ids].abs() > tau_act).nonzero(as_tuple=True)
        pairs_rows.append(rows + start)
        pairs_pos.append(p)
    rows_N = torch.cat(pairs_rows) if pairs_rows else torch.zeros(0, dtype=torch.int64, device=x_ND.device)
    pos_N = torch.cat(pairs_pos) if pairs_pos else rows_N
    return [rows_N[pos_N == j] for j in range(latent_ids.numel())]


class SplitPolicy:
    """Apply ``split.operation`` to the latents whose criterion score passes ``split.rule`` (see the module docstring)."""

    def __init__(self, split_cfg: SplitConfig):
        """Check that the criterion ranks by a tracker score; look up the operation."""
        if split_cfg.criterion not in _scored_names():
            raise FcsaeInputError(f"criterion: SplitPolicy needs one of {', '.join(_scored_names())}, got {split_cfg.criterion!r}")
        self.cfg = split_cfg
        self.operation = policy.load(policy.OPERATIONS[split_cfg.operation].fn)

    @torch.no_grad()
    def __call__(self, ctx: ResampleContext) -> list[LatentEvent]:
        """Select, operate and recycle; return one event per operated latent."""
        if ctx.tracker is None:
            raise ValueError(f"split criterion {self.cfg.criterion!r} needs the frequency-consistency tracker")
        sae, cfg = ctx.sae, self.cfg
        scores = ctx.tracker.scores()
        score_F = criterion_scores(cfg.criterion, scores, ctx, cfg.sibling_cos)
        dead_F = ctx.dead_mask_F.to(score_F.device)
        candidates = select_latents(score_F, ~dead_F & (scores.count_F > 0), cfg)
        if candidates.numel() == 0 or ctx.buffer_ND.shape[0] == 0:
            return []
        tau = getattr(getattr(ctx.tracker, "cfg", None), "tau_act", 0.0)
        rows = activating_rows(sae, ctx.buffer_ND, candidates, tau)
        partners = recycle_order(dead_F, scores.freq_F, candidates)
        events: list[LatentEvent] = []
        taken: set[int] = set()
        for lat, rows_N in zip(candidates.tolist(), rows):
            if len(events) >= cfg.max_splits or not partners:
                break
            if lat in taken:  # re-initialised by an earlier operation of this event (an extract's sibling)
                continue
            if rows_N.numel() < cfg.min_inputs:
                log.debug("step %d: latent %d skipped: %d activating inputs < min_inputs %d",
                          ctx.step, lat, rows_N.numel(), cfg.min_inputs)
                continue
            ev = self.operation(ctx._replace(taken=frozenset(taken)), cfg, lat, ctx.buffer_ND[rows_N] - sae.b_dec,
                                partners[0])
            if ev is None:
                continue
            # Never touch a latent twice in one event (extract also re-initialises the group's siblings, and may use
            # the group's own parent latent instead of the partner).
            taken.update(ev.latents)
            partners = [j for j in partners if j not in taken]
            ev = dataclasses.replace(ev, score=float(score_F[lat]))
            log.info("step %d: %s latent %d (%s score %.4g) into %d and %d, groups %s",
                     ctx.step, ev.kind, lat, cfg.criterion, ev.score, lat, ev.partner, ev.group_sizes)
            events.append(ev)
        return events


def split_latent(ctx: ResampleContext, cfg: SplitConfig, lat: int, x_ND: torch.Tensor,
                 partner: int) -> LatentEvent | None:
    """The ``split`` operation: 2-means of ``x_ND``, then ``apply_split``; None when the inputs form no two groups."""
    km = two_means(x_ND, cfg.kmeans_iters, ctx.generator)
    if km is None:
        log.debug("step %d: latent %d not split: its inputs do not form two groups", ctx.step, lat)
        return None
    return LatentEvent(ctx.step, "split", lat, partner, group_sizes=apply_split(ctx, lat, partner, km, x_ND))


def recycle_order(dead_F: torch.Tensor, freq_F: torch.Tensor, selected: torch.Tensor) -> list[int]:
    """Latents to recycle as split partners: dead ones first, then by ascending frequency; never a selected one."""
    free_F = torch.ones_like(dead_F)
    free_F[selected] = False
    ids = free_F.nonzero().flatten()
    # Dead latents sort before every alive one whatever their (stale) frequency; ties go to the lower index.
    key = freq_F[ids].double() - 2.0 * dead_F[ids].double()
    return ids[torch.sort(key, stable=True).indices].tolist()


class SplitEncoders(NamedTuple):
    """Encoder columns and biases of the two halves of a split."""

    W_2D: torch.Tensor
    """Encoder direction of each half (rows)."""
    b_2: torch.Tensor
    """Encoder bias of each half."""


def split_encoders(cent_2D: torch.Tensor, max_norm: float | None = None,
                   act_2: torch.Tensor | None = None) -> SplitEncoders:
    """Encoders that fire each half on its own group only, at the magnitude its unit decoder row needs
    (or at ``act_2``: the parent's own activation).

    With ``p_g`` the part of centroid ``c_g`` orthogonal to the other centroid,
    scaled so that ``p_g . c_g = ||c_g||``, half g gets ``W = 2 p_g`` and
    ``b = -||c_g||``: its pre-activation is ``||c_g||`` on its own centroid
    (the projection a unit decoder row needs), ``-||c_g||`` on the other
    centroid and on the SAE's origin, so it is off there. (Plain centroid
    directions with zero bias fired both halves on shared components, e.g. a
    parent direction, and on unrelated inputs, and over-reconstructed.)
    Falls back to the centroid direction when the two centroids are parallel.

    When the centroids are nearly parallel (real activations share a large
    common component) ``p_g`` is short and ``W`` long: such a latent then wins
    the top k on unrelated inputs and wrecks reconstruction (explained variance
    fell to -107 on SmolLM2 L8). With ``max_norm`` set, ``W`` and ``b`` are
    scaled down together so that ``||W|| <= max_norm``: the same decision
    boundary, a smaller activation that training then adjusts.

    ``act_2`` (what ``apply_split`` passes: the split latent's mean activation
    on each group) scales half g so that its pre-activation on its centroid is
    ``act_2[g]`` instead of ``||c_g||``: the half then adds to each input about
    what the latent added before, not the whole centroid on top of the other
    active latents' share. With ``||c_g||`` the halves over-reconstructed: on
    SmolLM2 L8 (4,096 latents, k 32, fc, step 25) one event of 32 splits took
    the FVU of the batch from 0.68 to 2.32 (the halves firing at ~100 where the
    largest activation was 21), and training never recovered (26 after the
    next event); at the parent's magnitude the same event takes it to 0.56.
    """
    rows, biases = [], []
    for g in (0, 1):
        c, o = cent_2D[g], cent_2D[1 - g]
        perp = c - (c @ o) / (o @ o).clamp_min(1e-12) * o
        if perp.norm() < 1e-3 * c.norm():
            perp = c
        w = 2.0 * perp * c.norm() / (perp @ c).clamp_min(1e-12)
        b = -c.norm()
        if act_2 is not None:  # same boundary, the parent's magnitude on the centroid
            shrink = float(act_2[g]) / float(c.norm().clamp_min(1e-12))
            w, b = w * shrink, b * shrink
        if max_norm is not None and float(w.norm()) > max_norm:
            shrink = max_norm / float(w.norm())
            w, b = w * shrink, b * shrink
        rows.append(w)
        biases.append(b)
    return SplitEncoders(torch.stack(rows), torch.stack(biases))


@torch.no_grad()
def apply_split(ctx: ResampleContext, lat: int, partner: int, km: TwoMeans, x_ND: torch.Tensor) -> tuple[int, int]:
    """Point ``lat`` and ``partner`` at the two centroids of ``x_ND`` (its activating inputs, centred by ``b_dec``)
    through ``reinit_latents``.

    Decoder rows are the unit centroid directions, encoder columns and biases
    come from ``split_encoders``, each half at the latent's mean activation on
    its group. Returns the group sizes as (``lat``'s group, ``partner``'s group).
    """
    sae = ctx.sae
    cent_2D = km.centroids_2D.float()
    unit_2D = cent_2D / cent_2D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    act_N = (x_ND.float() @ sae.W_enc[:, lat].float() + sae.b_enc[lat].float()).clamp_min(0)
    act_2 = torch.stack([act_N[km.assign_N == g].mean() for g in (0, 1)])
    # Bound the new encoders by the split latent's own encoder norm, which was
    # a working alive latent's scale (see ``split_encoders``).
    enc = split_encoders(cent_2D, max_norm=float(sae.W_enc[:, lat].norm()), act_2=act_2)
    own = sae.W_dec[lat] / sae.W_dec[lat].norm().clamp_min(1e-12)
    mine = int((unit_2D @ own.float()).argmax())  # keep the half closest to what the latent already is
    order = [mine, 1 - mine]
    reinit_latents(ctx, [lat, partner], unit_2D[order], enc.W_2D[order], enc.b_2[order])
    return km.sizes[mine], km.sizes[1 - mine]
