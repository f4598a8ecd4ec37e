"""Planted-absorption toy: which split criterion and which architecture reduce ground-truth absorption?

Trains SAEs on ``fcsae.toy`` data for every (architecture, k, split criterion)
of ``--activation`` (topk, batchtopk, matryoshka), ``--k`` and ``--criteria``,
the same seeds and the same budget, and prints per cell (mean +- std over
seeds): ground-truth absorption, parent recall, number of absorber latents,
fraction of variance explained and L0 (both measured on held-out samples
with the inference code, so batchtopk/matryoshka use their threshold), plus
the AUROC of the absorption score s_i (and of f_i and 1 - c_i) for telling
absorber latents from clean ones, from each run's own tracker.

Headlines: ``toy_absorption: ratio=X.XX`` = mean absorption with ``fc`` /
with ``none`` (TopK, the first k; target < 1: splitting reduces absorption);
``toy_architectures: ratio=X.XX`` = mean absorption of matryoshka / topk with
criterion none at the smallest k, the one below the toy's true L0 (sparsity
pressure; target < 1, the literature's positive control). The last headline
printed is the architectures one whenever both architectures ran.
Usage: ``python benchmarks/toy_absorption.py [--seeds 3] [--steps 1500]``;
the architecture comparison of docs/method.md:
``python benchmarks/toy_absorption.py --activation topk,batchtopk,matryoshka --criteria none --k 4,2``.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time

import torch
from sklearn.metrics import roc_auc_score

from fcsae.config import CRITERIA, SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.errors import FcsaeInputError
from fcsae.sae import SparseAutoencoder
from fcsae.toy import ToyConfig, make_toy, measure_absorption, toy_batches
from fcsae.trainer import Trainer


def auroc(score_L: torch.Tensor, positive_L: torch.Tensor, mask_L: torch.Tensor) -> float:
    """AUROC of ``score`` for positives vs the rest among ``mask``; nan when a class is empty."""
    y, s = positive_L[mask_L].numpy(), score_L[mask_L].numpy()
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else math.nan


def run(criterion: str, seed: int, args, toy_train, toy_test, activation: str = "topk", k: float = 4,
        keep_sae: bool = False) -> dict:
    """Train one SAE and measure it (``keep_sae``: also return the SAE, its absorbers and parent latents)."""
    d = toy_train.x_ND.shape[1]
    tcfg = TrainerConfig(lr=args.lr, batch_size=args.batch_size, total_tokens=args.steps * args.batch_size,
                         warmup_steps=50, resample_every=args.resample_every, resample_until=0.7,
                         buffer_tokens=8 * args.batch_size, dead_tokens=50 * args.batch_size, seed=seed,
                         log_every=args.steps, threshold_decay=args.threshold_decay,
                         bf16_encoder="off")  # exact fp32 ranking: the toy is tiny, bf16 buys nothing there
    sae_cfg = SAEConfig(d_in=d, dict_size=args.dict_size, activation=activation, k=k, **matryoshka_kw(args, activation))
    sae = SparseAutoencoder(sae_cfg, seed=seed)
    split = SplitConfig(criterion=criterion, rule=args.rule, z=args.z, top_fraction=args.top_fraction)
    tracker = TrackerConfig(enabled=True, consistency=args.consistency, weighting=args.weighting)
    trainer = Trainer(sae, tcfg, split, tracker)
    events = trainer.fit(toy_batches(toy_train.x_ND, args.batch_size, seed))
    sae.eval()
    x = toy_test.x_ND
    with torch.no_grad():
        codes_NF = sae.encode(x)  # the inference code: batchtopk/matryoshka through their threshold
        recon_ND = sae.decode(codes_NF)
    fve = 1.0 - float((recon_ND - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((codes_NF > 0).sum(1).float().mean())
    res = measure_absorption(sae, toy_test)
    sc = trainer.tracker.scores()
    alive = sc.count_F > 0
    kept = {"sae": sae, "absorber_L": res.absorber_L, "parent_latents": [p["latent"] for p in res.per_parent]} if keep_sae else {}
    return {**res.summary, **kept, "fve": fve, "l0": l0, "events": len(events),
            "auroc_s": auroc(sc.score_F, res.absorber_L, alive),
            "auroc_f": auroc(sc.freq_F, res.absorber_L, alive),
            "auroc_1mc": auroc(1 - sc.consistency_F, res.absorber_L, alive)}


def matryoshka_kw(args, activation: str) -> dict:
    """The Matryoshka prefix fields of ``SAEConfig`` from the flags (none for other activations)."""
    if activation != "matryoshka":
        return {}
    return {"matryoshka_groups": args.matryoshka_groups, "matryoshka_weights": args.matryoshka_weights}


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
    ap.add_argument("--k", default="4", help="comma-separated k values (fractional for batchtopk/matryoshka only)")
    ap.add_argument("--activation", default="topk", help="comma-separated subset of topk, batchtopk, matryoshka")
    ap.add_argument("--matryoshka-groups", default="", help="SAEConfig.matryoshka_groups (default: the SAEBench fractions)")
    ap.add_argument("--matryoshka-weights", default="", help="SAEConfig.matryoshka_weights (default: equal)")
    ap.add_argument("--threshold-decay", type=float, default=0.99, help="TrainerConfig.threshold_decay")
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
    activations = [a for a in args.activation.split(",") if a]
    ks = [int(float(v)) if float(v).is_integer() else float(v) for v in args.k.split(",") if v]
    cells = [(a, k, c) for a in activations for k in ks for c in criteria]
    for a, k, _ in cells:  # refuse a bad architecture/k before training anything
        try:
            SAEConfig(d_in=2, dict_size=args.dict_size, activation=a, k=k, **matryoshka_kw(args, a))
        except FcsaeInputError as e:
            print(f"toy_absorption: error: {e}", file=sys.stderr)
            sys.exit(2)

    cfg = ToyConfig()
    print(f"toy: {cfg}")
    print(f"SAE: {', '.join(activations)}, dict {args.dict_size}, k {ks}; {args.steps} steps x {args.batch_size}; lr {args.lr}; "
          f"split/resample every {args.resample_every} steps until 70%; rule {args.rule}, z {args.z}, "
          f"top_fraction {args.top_fraction}; tracker consistency {args.consistency}, weighting {args.weighting}; "
          f"threshold_decay {args.threshold_decay}; seeds 0..{args.seeds - 1}")
    if "matryoshka" in activations:
        mcfg = SAEConfig(d_in=2, dict_size=args.dict_size, activation="matryoshka", k=ks[0], **matryoshka_kw(args, "matryoshka"))
        print(f"matryoshka prefixes: {mcfg.matryoshka_widths}, weights {tuple(round(w, 3) for w in mcfg.matryoshka_level_weights)}")
    rows: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    true_l0 = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        toy_train = make_toy(cfg, seed=1000 + seed)
        # Held-out samples of the same planted features: same direction seed, fresh sample seed.
        toy_test = make_toy(ToyConfig(**{**cfg.__dict__, "n_samples": 16_384}), seed=1000 + seed,
                            sample_seed=2000 + seed)
        true_l0.append(float(toy_test.labels_NG.sum(1).float().mean()))
        for a, k, c in cells:
            rows[(a, k, c)].append(run(c, seed, args, toy_train, toy_test, a, k))
            r = rows[(a, k, c)][-1]
            print(f"  seed {seed} {a} k={k} {c}: absorption {r['absorption']:.3f}, fve {r['fve']:.3f}, l0 {r['l0']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0

    print(f"\ntrue L0 of the toy (planted features on per sample): {statistics.mean(true_l0):.2f}")
    cols = ("absorption", "parent_recall", "n_absorbers", "fve", "l0", "events", "auroc_s", "auroc_f", "auroc_1mc")
    print(f"\n{'activation':<11}{'k':>5} {'criterion':<14}" + "".join(f"{c:>24}" for c in cols))
    for a, k, c in cells:
        print(f"{a:<11}{k:>5} {c:<14}" + "".join(f"{fmt([r[m] for r in rows[(a, k, c)]]):>24}" for m in cols))
    print(f"\n({args.seeds} seeds x {len(cells)} cells in {elapsed:.0f} s)")

    def mean_absorption(a, k, c):
        return statistics.mean(r["absorption"] for r in rows[(a, k, c)]) if rows.get((a, k, c)) else math.nan

    def ratio(num, den):
        return num / den if den > 0 else math.nan

    base_a = "topk" if "topk" in activations else activations[0]
    if "fc" in criteria and "none" in criteria:
        r = ratio(mean_absorption(base_a, ks[0], "fc"), mean_absorption(base_a, ks[0], "none"))
        print(f"toy_absorption: ratio={r:.2f} (target < 1: fc absorption / none absorption, {base_a} k={ks[0]})")
    if "topk" in activations and "matryoshka" in activations:
        k_p, c = min(ks), ("none" if "none" in criteria else criteria[0])
        r = ratio(mean_absorption("matryoshka", k_p, c), mean_absorption("topk", k_p, c))
        pressured = "below" if k_p < statistics.mean(true_l0) else "NOT below"
        print(f"toy_architectures: ratio={r:.2f} (target < 1: matryoshka / topk true absorption at k={k_p}, "
              f"{pressured} the true L0 {statistics.mean(true_l0):.2f}; criterion {c}; mean over {args.seeds} seeds)")


if __name__ == "__main__":
    main()
