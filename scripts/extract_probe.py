"""One extract event on a planted-toy SAE of any architecture: what it does at the moment, and after more training.

Trains ``none`` for ``--steps`` steps (toy and SAE as ``benchmarks/toy_absorption.py``: 64 latents, k 4), runs one
``split.operation: extract`` event by ``--criterion`` on the top ``--top-fraction``, and prints true absorption, FVU,
L0 and (Matryoshka) each prefix's FVU on held-out samples, the events, and per sibling how many of its held-out
firings it kept. ``--after N`` continues training N steps from the same state twice: with the Matryoshka placement of
the shared latent (``fcsae.extract.place_shared``) and without it. docs/method.md ("On BatchTopK and Matryoshka")
quotes its output:

    python scripts/extract_probe.py --activation batchtopk
    python scripts/extract_probe.py --activation matryoshka --top-fraction 0.1 --seeds 0,1 --after 500
"""

from __future__ import annotations

import argparse
import copy

import torch

import fcsae.extract as fx
from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.policy import make_policy
from fcsae.resample import ResampleContext
from fcsae.sae import SparseAutoencoder
from fcsae.toy import ToyConfig, make_toy, measure_absorption, toy_batches
from fcsae.trainer import Trainer


def show(sae, test, tag: str) -> torch.Tensor:
    """Print absorption, FVU (inference code), L0 and prefix FVUs; return the held-out firing mask [N, F]."""
    sae.eval()
    with torch.no_grad():
        var = (test.x_ND - test.x_ND.mean(0)).pow(2).sum()
        codes_NF = sae.encode(test.x_ND)
        fvu = float((sae.decode(codes_NF) - test.x_ND).pow(2).sum() / var)
        pre_NLD = sae(test.x_ND).prefix_recons_BLD
        prefixes = "" if pre_NLD is None else " prefix fvu " + " ".join(
            f"{float((pre_NLD[:, lv] - test.x_ND).pow(2).sum() / var):.3f}" for lv in range(pre_NLD.shape[1]))
    res = measure_absorption(sae, test).summary
    sae.train()
    print(f"  {tag:<24} absorption {res['absorption']:.3f} parent recall {res['parent_recall']:.3f} fvu {fvu:.4f} "
          f"l0 {float((codes_NF > 0).sum(1).float().mean()):.2f}{prefixes}", flush=True)
    return codes_NF > 0


def group_of(sae, i: int):
    """Matryoshka group index of latent i (None for other architectures)."""
    return None if sae.widths is None else int(torch.bucketize(torch.tensor(i), torch.tensor(sae.widths[:-1]), right=True))


def extract_once(tr: Trainer, args, test, tag: str):
    """One extract event on ``tr``'s SAE; print the events and what each sibling kept."""
    before_NF = show(tr.sae, test, f"{tag} before")
    old_FD = tr.sae.W_dec.detach().clone()
    ctx = ResampleContext(tr.sae, tr.optimizer, tr.buffer_ND[:tr.buffer_fill], tr.dead_mask_F, tr.tracker, tr.step,
                          tr.generator, tr.tokens_since_fired_F)
    split = SplitConfig(criterion=args.criterion, operation="extract", rule="top_fraction", top_fraction=args.top_fraction)
    events = make_policy(split)(ctx)
    after_NF = show(tr.sae, test, f"{tag} +0")
    for e in events:
        slots = [e.partner, *e.siblings]
        kept = []
        for j in e.siblings:  # a moved sibling's old slot: the touched row its new (stripped) row is closest to
            old = slots[int((old_FD[slots] @ tr.sae.W_dec[j].detach()).argmax())]
            kept.append(f"{old}->{j}: {int(before_NF[:, old].sum())}->{int((before_NF[:, old] & after_NF[:, j]).sum())}")
        print(f"    shared {e.partner} (group {group_of(tr.sae, e.partner)}), siblings "
              f"{[(j, group_of(tr.sae, j)) for j in e.siblings]}; held-out firings (old->new slot: before->kept) "
              f"{', '.join(kept)}")
    return events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--activation", default="topk", choices=("topk", "batchtopk", "matryoshka"))
    ap.add_argument("--criterion", default="fc")
    ap.add_argument("--top-fraction", type=float, default=0.0625)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--after", type=int, default=0, help="continue N steps, with and without the placement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    original = fx.place_shared
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = ToyConfig()
        toy = make_toy(cfg, seed=1000 + seed)
        test = make_toy(ToyConfig(**{**cfg.__dict__, "n_samples": 16_384}), seed=1000 + seed, sample_seed=2000 + seed)
        tcfg = TrainerConfig(lr=2e-3, batch_size=512, total_tokens=(args.steps + args.after + 1) * 512, warmup_steps=50,
                             buffer_tokens=8 * 512, dead_tokens=50 * 512, seed=seed, log_every=10**9,
                             bf16_encoder="off")
        sae = SparseAutoencoder(SAEConfig(d_in=cfg.d, dict_size=64, activation=args.activation, k=4), seed=seed)
        tr0 = Trainer(sae, tcfg, SplitConfig(), TrackerConfig(enabled=True))
        batches = toy_batches(toy.x_ND, 512, seed)
        for _ in range(args.steps):
            tr0.train_step(next(batches))
        print(f"seed {seed}: {args.activation}, {args.steps} steps, threshold {float(sae.threshold):.4f}, "
              f"prefixes {sae.widths}")
        variants = ("placed", "not placed") if args.after and sae.widths is not None else ("placed",)
        for variant in variants:
            fx.place_shared = original if variant == "placed" else (lambda sae_, t, sib: (t, list(sib)))
            tr = copy.deepcopy(tr0)
            extract_once(tr, args, test, variant)
            more = toy_batches(toy.x_ND, 512, seed + 100)
            for i in range(args.after):
                tr.train_step(next(more))
                if i + 1 in (50, args.after):
                    show(tr.sae, test, f"{variant} +{i + 1}")
        fx.place_shared = original


if __name__ == "__main__":
    main()
