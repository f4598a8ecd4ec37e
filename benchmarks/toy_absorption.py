"""Planted-absorption toy: does splitting by frequency/consistency reduce ground-truth absorption?

Trains TopK SAEs on ``fcsae.toy`` data with every split criterion (none, dead,
fc, frequency, inconsistency), the same seeds and the same budget, and prints
per criterion (mean +- std over seeds): ground-truth absorption, parent
recall, number of absorber latents, fraction of variance explained (held-out
samples) and L0, plus the AUROC of the absorption score s_i (and of f_i and
1 - c_i) for telling absorber latents from clean ones, from each run's own
tracker at the end of training.

Headline: ``toy_absorption: ratio=X.XX`` = mean absorption with ``fc`` /
mean absorption with ``none`` (target < 1: the method reduces absorption).
Usage: ``python benchmarks/toy_absorption.py [--seeds 3] [--steps 1500]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import torch
from sklearn.metrics import roc_auc_score

from fcsae.config import CRITERIA, SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.sae import SparseAutoencoder
from fcsae.toy import ToyConfig, make_toy, measure_absorption, toy_batches
from fcsae.trainer import Trainer


def auroc(score_L: torch.Tensor, positive_L: torch.Tensor, mask_L: torch.Tensor) -> float:
    """AUROC of ``score`` for positives vs the rest among ``mask``; nan when a class is empty."""
    y, s = positive_L[mask_L].numpy(), score_L[mask_L].numpy()
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else math.nan


def run(criterion: str, seed: int, args, toy_train, toy_test) -> dict:
    """Train one SAE and measure it."""
    d = toy_train.x_ND.shape[1]
    tcfg = TrainerConfig(lr=args.lr, batch_size=args.batch_size, total_tokens=args.steps * args.batch_size,
                         warmup_steps=50, resample_every=args.resample_every, resample_until=0.7,
                         buffer_tokens=8 * args.batch_size, dead_tokens=50 * args.batch_size, seed=seed,
                         log_every=args.steps)
    sae = SparseAutoencoder(SAEConfig(d_in=d, dict_size=args.dict_size, activation="topk", k=args.k), seed=seed)
    split = SplitConfig(criterion=criterion, rule=args.rule, z=args.z, top_fraction=args.top_fraction)
    tracker = TrackerConfig(enabled=True, consistency=args.consistency, weighting=args.weighting)
    trainer = Trainer(sae, tcfg, split, tracker)
    events = trainer.fit(toy_batches(toy_train.x_ND, args.batch_size, seed))
    sae.eval()
    x = toy_test.x_ND
    with torch.no_grad():
        out = sae(x)
    fve = 1.0 - float((out.recon_BD - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((out.acts_BK > 0).sum(1).float().mean())
    res = measure_absorption(sae, toy_test)
    sc = trainer.tracker.scores()
    alive = sc.count_F > 0
    return {**res.summary, "fve": fve, "l0": l0, "events": len(events),
            "auroc_s": auroc(sc.score_F, res.absorber_L, alive),
            "auroc_f": auroc(sc.freq_F, res.absorber_L, alive),
            "auroc_1mc": auroc(1 - sc.consistency_F, res.absorber_L, alive)}


def fmt(vals: list[float]) -> str:
    """mean +- std, ignoring nans (with the count of finite values when some are nan)."""
    ok = [v for v in vals if not math.isnan(v)]
    if not ok:
        return "n/a"
    sd = statistics.stdev(ok) if len(ok) > 1 else 0.0
    tail = f" (n={len(ok)})" if len(ok) < len(vals) else ""
    return f"{statistics.mean(ok):.3f} +- {sd:.3f}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dict-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--resample-every", type=int, default=250)
    ap.add_argument("--rule", choices=("zscore", "top_fraction"), default="zscore", help="SplitConfig.rule (default its default)")
    ap.add_argument("--z", type=float, default=3.0, help="SplitConfig.z (default its default)")
    ap.add_argument("--top-fraction", type=float, default=0.01, help="SplitConfig.top_fraction (default its default)")
    ap.add_argument("--consistency", choices=("normalized", "seed"), default="normalized", help="TrackerConfig.consistency")
    ap.add_argument("--weighting", choices=("count", "activation"), default="count", help="TrackerConfig.weighting")
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="comma-separated subset of criteria to run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # One thread: these matrices are tiny, and on a shared 2-core machine multi-threaded small ops
    # ran ~17x slower under load (measured: 300 steps took 74 s with 2 threads, 4.3 s with 1).
    torch.set_num_threads(1)
    criteria = [c for c in args.criteria.split(",") if c]

    cfg = ToyConfig()
    print(f"toy: {cfg}")
    print(f"SAE: TopK dict {args.dict_size}, k {args.k}; {args.steps} steps x {args.batch_size}; lr {args.lr}; "
          f"split/resample every {args.resample_every} steps until 70%; rule {args.rule}, z {args.z}, "
          f"top_fraction {args.top_fraction}; tracker consistency {args.consistency}, weighting {args.weighting}; "
          f"seeds 0..{args.seeds - 1}")
    rows: dict[str, list[dict]] = {c: [] for c in criteria}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        toy_train = make_toy(cfg, seed=1000 + seed)
        # Held-out samples of the same planted features: same direction seed, fresh sample seed.
        toy_test = make_toy(ToyConfig(**{**cfg.__dict__, "n_samples": 16_384}), seed=1000 + seed,
                            sample_seed=2000 + seed)
        for c in criteria:
            rows[c].append(run(c, seed, args, toy_train, toy_test))
    elapsed = time.perf_counter() - t0

    cols = ("absorption", "parent_recall", "n_absorbers", "fve", "l0", "events", "auroc_s", "auroc_f", "auroc_1mc")
    print(f"\n{'criterion':<14}" + "".join(f"{c:>24}" for c in cols))
    for c in criteria:
        print(f"{c:<14}" + "".join(f"{fmt([r[k] for r in rows[c]]):>24}" for k in cols))
    print(f"\n({args.seeds} seeds x {len(criteria)} criteria in {elapsed:.0f} s)")
    ratio = math.nan
    if rows.get("none") and rows.get("fc"):
        base = statistics.mean(r["absorption"] for r in rows["none"])
        ratio = statistics.mean(r["absorption"] for r in rows["fc"]) / base if base > 0 else math.nan
    print(f"toy_absorption: ratio={ratio:.2f} (target < 1: fc absorption / none absorption)")


if __name__ == "__main__":
    main()
