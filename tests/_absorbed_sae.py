"""A hand-built SAE with planted absorption, for the detector and extract tests.

Orthonormal directions Q in d = 16: parent p = Q[0], children c_j = Q[1..3],
independent features Q[4..9]. Latents:

- 0: the absorbed parent: decoder p, encoder p - 1.5 sum_j c_j (silent on child inputs);
- 1..3: absorbers: decoder (p + c_j) / sqrt(2), encoder sqrt(2) c_j;
- 4..9: clean latents: decoder = encoder = Q[4 + i];
- 10, 11: unused (encoder zero, bias -1).

All encoder biases are -1e-4 (so reconstructions are exact to ~1e-4).

Inputs: a child j with the parent at one magnitude m (m (p + c_j)), or the parent
alone, or one independent feature, all of which the SAE reconstructs exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fcsae.config import SAEConfig
from fcsae.sae import SparseAutoencoder

D, F = 16, 12
BIAS = 1e-4
PARENT, ABSORBERS, CLEAN, UNUSED = 0, [1, 2, 3], list(range(4, 10)), [10, 11]


class Planted(NamedTuple):
    sae: SparseAutoencoder
    Q_DD: torch.Tensor
    x_ND: torch.Tensor
    kind_N: torch.Tensor
    """-1: no group feature; 0: parent alone; j in 1..3: child j (with the parent)."""


def absorbed_sae(activation: str = "relu", k: int = 3, n: int = 600, seed: int = 0, with_parent: bool = True,
                 threshold: float = 0.3) -> Planted:
    """The SAE and inputs of the module docstring (``with_parent=False``: latent 0 unused too).

    ``batchtopk``/``matryoshka`` get the inference ``threshold`` (every planted activation is >= 0.8, so all pass)
    and ``matryoshka`` the prefixes ``4,12`` (the parent and its absorbers in the first).
    """
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g)).Q.T.contiguous()
    W_dec = torch.zeros(F, D)
    W_enc = torch.zeros(F, D)
    # A small negative bias keeps exactly-orthogonal inputs at a negative pre-activation (not at +-1e-8).
    b_enc = torch.full((F,), -BIAS)
    p = Q[0]
    if with_parent:
        W_dec[PARENT], W_enc[PARENT] = p, p - 1.5 * Q[1:4].sum(0)
    else:
        W_dec[PARENT], b_enc[PARENT] = Q[12], -1.0
    for j in ABSORBERS:
        W_dec[j] = (p + Q[j]) / math.sqrt(2)
        W_enc[j] = math.sqrt(2) * Q[j]
    for i in CLEAN:
        W_dec[i] = W_enc[i] = Q[i]
    for i, r in zip(UNUSED, (10, 11)):
        W_dec[i], b_enc[i] = Q[r], -1.0
    groups = {"matryoshka_groups": "4,12"} if activation == "matryoshka" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=F, activation=activation, k=k, **groups))
    with torch.no_grad():
        if activation in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(threshold)
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.zero_()
    kind = torch.randint(-1, 4, (n,), generator=g)
    m = 0.8 + 0.4 * torch.rand(n, generator=g)
    x = torch.zeros(n, D)
    grp = kind >= 0
    x[grp] += m[grp, None] * p
    for j in ABSORBERS:
        x[kind == j] += m[kind == j, None] * Q[j]
    # Independent features only on inputs without the group, at most one: a TopK SAE with k >= 1 is exact too,
    # and a clean latent's inputs vary only by its own magnitude.
    ind = torch.randint(4, 12, (n,), generator=g)
    on = (ind < 10) & ~grp
    x[on] += (0.8 + 0.4 * torch.rand(int(on.sum()), generator=g))[:, None] * Q[ind[on]]
    return Planted(sae, Q, x, kind)
