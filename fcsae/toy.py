"""Planted feature absorption: synthetic activations with ground truth, and the true absorption of an SAE.

The generator plants ``n_independent`` sparse features that fire independently
and ``n_groups`` hierarchies: a parent feature and ``n_children`` mutually
exclusive children, where the parent fires whenever any child fires (and
sometimes alone). This is the setting in which "A is for Absorption" shows a
sparse dictionary can lower its L0 by folding the parent into child latents.

``measure_absorption`` reads a trained SAE against the planted directions:
for each parent, the fraction of parent-true samples on which the parent's
latent stays silent while a latent aligned with the active child fires and
carries the parent direction; and per latent, whether it is such an absorber.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fcsae.errors import require


@dataclass(frozen=True)
class ToyConfig:
    """Shape, frequencies, magnitudes and noise of the planted-absorption data."""

    d: int = 64
    """Dimension of the activations."""
    n_independent: int = 32
    """Sparse features that fire independently of everything else."""
    p_independent: float = 0.03
    """Firing probability of each independent feature."""
    n_groups: int = 4
    """Parent/children hierarchies."""
    n_children: int = 4
    """Children per parent; at most one child of a group fires per sample (uniformly chosen)."""
    p_group: float = 0.2
    """Probability that one child of a group fires (and with it the parent)."""
    p_parent_alone: float = 0.05
    """Probability that a parent fires without any child (on samples where no child fired)."""
    magnitude_std: float = 0.2
    """Relative spread of feature magnitudes: magnitude = |1 + magnitude_std * N(0, 1)|."""
    noise: float = 0.05
    """Isotropic Gaussian noise: per-dimension std of the noise, relative to a unit feature."""
    offset: float = 0.0
    """Norm of a constant offset added to every sample (a data mean, as residual streams have)."""
    orthogonal: bool = True
    """Orthonormal feature directions when there are at most ``d`` features (else random unit vectors)."""
    n_samples: int = 65_536
    """Samples generated."""

    def __post_init__(self):
        require(isinstance(self.d, int) and self.d >= 2, f"d: must be an integer >= 2, got {self.d!r}")
        for name in ("n_independent", "n_groups"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, f"{name}: must be an integer >= 0, got {v!r}")
        require(isinstance(self.n_children, int) and self.n_children >= 1, f"n_children: must be an integer >= 1, got {self.n_children!r}")
        for name in ("p_independent", "p_group", "p_parent_alone"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, f"{name}: must be a probability in [0, 1], got {v!r}")
        for name in ("magnitude_std", "noise", "offset"):
            v = getattr(self, name)
            require(v >= 0.0, f"{name}: must be >= 0, got {v!r}")
        require(isinstance(self.n_samples, int) and self.n_samples >= 1, f"n_samples: must be an integer >= 1, got {self.n_samples!r}")

    @property
    def n_features(self) -> int:
        """Planted features: independents, then per group its parent followed by its children."""
        return self.n_independent + self.n_groups * (1 + self.n_children)


class ToyData(NamedTuple):
    """Planted-absorption samples with their ground truth."""

    x_ND: torch.Tensor
    """Samples, scaled by ``norm_scale`` so that E||x|| = sqrt(d) (like the activation cache)."""
    labels_NG: torch.Tensor
    """Bool: which ground-truth features are on in each sample."""
    features_GD: torch.Tensor
    """Unit ground-truth feature directions."""
    parent_of_G: torch.Tensor
    """Index of each feature's parent, -1 for independents and parents."""
    parents: list[int]
    """Feature index of each group's parent."""
    children: list[list[int]]
    """Feature indices of each group's children."""
    norm_scale: float
    """The factor applied to the raw samples."""


def feature_layout(cfg: ToyConfig) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """Parent index of every feature, the parents, and the children of each group."""
    parent_of_G = torch.full((cfg.n_features,), -1, dtype=torch.int64)
    parents, children = [], []
    g = cfg.n_independent
    for _ in range(cfg.n_groups):
        parents.append(g)
        kids = list(range(g + 1, g + 1 + cfg.n_children))
        children.append(kids)
        parent_of_G[kids] = g
        g += 1 + cfg.n_children
    return parent_of_G, parents, children


def make_toy(cfg: ToyConfig, seed: int = 0, sample_seed: int | None = None) -> ToyData:
    """Generate ``cfg.n_samples`` samples; deterministic given the seeds.

    ``seed`` draws the feature directions (and the offset); ``sample_seed``
    (default: ``seed``) draws the samples, so a held-out set of the same
    features is ``make_toy(cfg, seed, sample_seed=other)``.
    """
    gen = torch.Generator().manual_seed(seed)
    N, G, D = cfg.n_samples, cfg.n_features, cfg.d
    parent_of_G, parents, children = feature_layout(cfg)
    dirs_GD = torch.randn(G, D, generator=gen)
    if cfg.orthogonal and G <= D:
        dirs_GD = torch.linalg.qr(dirs_GD.T).Q.T.contiguous()
    dirs_GD = dirs_GD / dirs_GD.norm(dim=1, keepdim=True)
    off_D = torch.randn(D, generator=gen)
    if sample_seed is not None and sample_seed != seed:
        gen = torch.Generator().manual_seed(sample_seed)

    labels_NG = torch.zeros(N, G, dtype=torch.bool)
    labels_NG[:, :cfg.n_independent] = torch.rand(N, cfg.n_independent, generator=gen) < cfg.p_independent
    for p, kids in zip(parents, children):
        child_on_N = torch.rand(N, generator=gen) < cfg.p_group
        which_N = torch.randint(len(kids), (N,), generator=gen)
        kids_T = torch.tensor(kids)
        labels_NG[child_on_N, kids_T[which_N[child_on_N]]] = True
        alone_N = ~child_on_N & (torch.rand(N, generator=gen) < cfg.p_parent_alone)
        labels_NG[:, p] = child_on_N | alone_N

    mags_NG = (1.0 + cfg.magnitude_std * torch.randn(N, G, generator=gen)).abs()
    x_ND = (labels_NG * mags_NG) @ dirs_GD
    x_ND += cfg.noise * torch.randn(N, D, generator=gen)
    if cfg.offset > 0:
        x_ND += cfg.offset * off_D / off_D.norm()
    # Scale from the expected norm of this configuration would be seed-free; the sample estimate is within
    # ~1/sqrt(N) of it, close enough that train and held-out sets look alike to the SAE.
    scale = float(D ** 0.5 / x_ND.norm(dim=1).mean().clamp_min(1e-12))
    return ToyData(x_ND * scale, labels_NG, dirs_GD, parent_of_G, parents, children, scale)


class ToyAbsorption(NamedTuple):
    """Ground-truth absorption of one SAE on planted data."""

    summary: dict[str, float]
    """``absorption`` (mean over parents), ``parent_recall`` (mean fraction of parent-true samples where the
    parent latent fires), ``parent_cos`` (mean cosine of the parent latents), ``n_absorbers``."""
    per_parent: list[dict]
    """Per group: ``parent`` (feature), ``latent`` (its latent or -1), ``cos``, ``absorption``, ``recall``."""
    absorber_L: torch.Tensor
    """Bool per SAE latent: an absorber (see ``measure_absorption``)."""


@torch.no_grad()
def active_latents(sae, x_ND: torch.Tensor, tau_act: float = 0.0, chunk: int = 4096) -> torch.Tensor:
    """Bool [N, L]: which SAE latents fire (|a| > tau_act) on each sample."""
    return torch.cat([sae.encode(x_ND[i:i + chunk]).abs() > tau_act for i in range(0, len(x_ND), chunk)])


@torch.no_grad()
def measure_absorption(sae, toy: ToyData, tau_act: float = 0.0, align_cos: float = 0.3, carry_cos: float = 0.2,
                       absorber_share: float = 0.1) -> ToyAbsorption:
    """Ground-truth absorption of ``sae`` on ``toy``.

    A latent is *aligned* with a feature when the cosine of its decoder row
    and the feature's direction is >= ``align_cos``, and *carries* a parent
    when that cosine with the parent is >= ``carry_cos``. The parent latent of
    a group is the latent best aligned with the parent among those not aligned
    with any of its children (else a child absorber could pose as the parent).
    A parent-true sample is *absorbed* when the parent latent does not fire
    and some firing latent is aligned with the sample's active child and
    carries the parent. A latent is an *absorber* when it absorbs on at least
    ``absorber_share`` of the parent-true samples it fires on (partial
    absorption counts: a child latent that carries the parent while the parent
    latent still fires on some of the child's samples is an absorber).
    """
    dec_LD = sae.W_dec.detach().float()
    cos_LG = (dec_LD / dec_LD.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ toy.features_GD.T.to(dec_LD)
    act_NL = active_latents(sae, toy.x_ND.to(dec_LD.device), tau_act).cpu()
    cos_LG = cos_LG.cpu()
    L = cos_LG.shape[0]
    absorbed_by_L = torch.zeros(L)
    fires_parent_L = torch.zeros(L)
    per_parent = []
    for p, kids in zip(toy.parents, toy.children):
        child_aligned_L = (cos_LG[:, kids] >= align_cos).any(1)
        cand = torch.where(child_aligned_L, torch.full_like(cos_LG[:, p], -2.0), cos_LG[:, p])
        p_lat = int(cand.argmax()) if float(cand.max()) > -2 else -1
        p_true_N = toy.labels_NG[:, p]
        parent_on_N = act_NL[:, p_lat] if p_lat >= 0 else torch.zeros(len(act_NL), dtype=torch.bool)
        absorbed_N = torch.zeros(len(act_NL), dtype=torch.bool)
        carries_L = cos_LG[:, p] >= carry_cos
        for c in kids:
            absorbers_L = carries_L & (cos_LG[:, c] >= align_cos)
            rows_N = p_true_N & toy.labels_NG[:, c] & ~parent_on_N
            hit_NL = act_NL[rows_N][:, absorbers_L]
            absorbed_N[rows_N] = hit_NL.any(1)
            absorbed_by_L[absorbers_L] += hit_NL.float().sum(0)
        fires_parent_L += act_NL[p_true_N].float().sum(0)
        n_true = max(1, int(p_true_N.sum()))
        per_parent.append({"parent": p, "latent": p_lat, "cos": float(cos_LG[p_lat, p]) if p_lat >= 0 else 0.0,
                           "absorption": float(absorbed_N[p_true_N].sum()) / n_true,
                           "recall": float(parent_on_N[p_true_N].sum()) / n_true})
    absorber_L = (absorbed_by_L > 0) & (absorbed_by_L >= absorber_share * fires_parent_L)
    k = max(1, len(per_parent))
    summary = {"absorption": sum(r["absorption"] for r in per_parent) / k,
               "parent_recall": sum(r["recall"] for r in per_parent) / k,
               "parent_cos": sum(r["cos"] for r in per_parent) / k,
               "n_absorbers": float(absorber_L.sum())}
    return ToyAbsorption(summary, per_parent, absorber_L)


def toy_batches(x_ND: torch.Tensor, batch_size: int, seed: int):
    """Shuffled batches of the toy samples, epoch after epoch (the trainer decides when to stop)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x_ND), generator=g)
        for i in range(0, len(x_ND) - batch_size + 1, batch_size):
            yield x_ND[perm[i:i + batch_size]]
