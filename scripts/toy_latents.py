"""What each latent of one toy SAE learned: firing frequency and the planted features its decoder row is closest to.

Trains one SAE on the planted-absorption toy exactly as ``benchmarks/toy_absorption.py``
does for split criterion ``none`` (same toy, seed, trainer settings), then prints per
latent its firing frequency on held-out samples (inference code), its three largest
decoder cosines with the planted features (``iN`` independent, ``Pg`` parent of group
g, ``Cg.j`` its children) and ``ABS`` for an absorber.
Usage: ``python scripts/toy_latents.py --activation matryoshka --k 2 [--steps 800] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import toy_absorption  # noqa: E402
from fcsae.toy import ToyConfig, make_toy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--activation", default="matryoshka")
    ap.add_argument("--k", type=float, default=2)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matryoshka-groups", default="")
    ap.add_argument("--matryoshka-weights", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    args = types.SimpleNamespace(lr=2e-3, batch_size=512, steps=a.steps, resample_every=250, threshold_decay=0.99,
                                 dict_size=64, matryoshka_groups=a.matryoshka_groups, matryoshka_weights=a.matryoshka_weights,
                                 rule="zscore", z=3.0, top_fraction=0.01, consistency="normalized", weighting="count")
    cfg = ToyConfig()
    train = make_toy(cfg, seed=1000 + a.seed)
    test = make_toy(ToyConfig(**{**cfg.__dict__, "n_samples": 16_384}), seed=1000 + a.seed, sample_seed=2000 + a.seed)
    k = int(a.k) if a.k.is_integer() else a.k
    res = toy_absorption.run("none", a.seed, args, train, test, a.activation, k, keep_sae=True)
    sae, absorber_L = res["sae"], res["absorber_L"]
    with torch.no_grad():
        freq_L = (sae.encode(test.x_ND) > 0).float().mean(0)
    cos_LG = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ test.features_GD.T
    names = {i: f"i{i}" for i in range(cfg.n_independent)}
    for g, (p, kids) in enumerate(zip(test.parents, test.children)):
        names[p] = f"P{g}"
        names.update({c: f"C{g}.{j}" for j, c in enumerate(kids)})
    print(f"{a.activation} k={k}: absorption {res['absorption']:.3f}, parent latents {res['parent_latents']}")
    for lat in range(len(cos_LG)):
        top = cos_LG[lat].abs().topk(3).indices
        print(f"latent {lat:3d}  freq {freq_L[lat]:.3f}  " + "  ".join(f"{names[int(i)]} {float(cos_LG[lat, i]):+.2f}" for i in top)
              + ("  ABS" if absorber_L[lat] else ""))


if __name__ == "__main__":
    main()
