"""Frequency-consistency tracker overhead: TopK training step with and without the tracker, side by side.

Three ``Trainer``s with identical SAEs and batches: without the tracker, with
the exact tracker (``TrackerConfig(enabled=True)``), and with the sums taken
every ``--stats-every`` steps; criterion ``none`` so only the per-step update is
timed. Rounds interleave them and the median step time is reported, because
the 2-core machine is shared. The effect of ``stats_every`` on the scores is
measured on a planted-toy training run (rank correlation with the exact scores). Also timed in the same
run: ``tracker.update`` alone on a real forward output, and the naive
``index_add_`` over the B*k gathered inputs it replaces. Peak memory: the
tracker's state, and the growth of the process's peak RSS when the tracker
starts updating after the untracked steps have reached their own peak.

The headline is in process CPU time (all threads), which other jobs on a
shared machine disturb far less than wall time; wall-time ratios are printed too.

Usage: ``python benchmarks/tracker_overhead.py [--rounds 5] [--threads N] [--quick]``
(``--threads 0``, the default: ``fcsae.threads.auto_threads``).
Last line: ``tracker_overhead: ratio=X.XX (target <= 1.05)``: CPU time of a step
with / without the exact tracker, the larger of the two sizes' ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fcsae  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads OpenMP)
import torch  # noqa: E402

from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig  # noqa: E402
from fcsae.sae import SparseAutoencoder  # noqa: E402
from fcsae.threads import set_threads  # noqa: E402
from fcsae.trainer import Trainer  # noqa: E402

SIZES = {  # name: (d_in, dict_size, k, batch)
    "small": (640, 4096, 32, 1024),
    "large": (640, 16384, 64, 4096),
}


def make_trainer(d: int, F: int, k: int, B: int, tracker: TrackerConfig | None) -> Trainer:
    """A TopK trainer as ``fcsae train`` builds it; dead latents never trigger AuxK here (fresh SAE)."""
    cfg = TrainerConfig(batch_size=B, total_tokens=B * 10_000, warmup_steps=0, log_every=10_000, buffer_tokens=0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, dict_size=F, activation="topk", k=k), seed=0)
    return Trainer(sae, cfg, SplitConfig(criterion="none"), tracker or TrackerConfig(enabled=False))


CPU: dict[str, list[float]] = {}
"""Process CPU seconds per timed call, by label (less sensitive than wall time to other jobs on a shared machine)."""


def timed(fn, label: str = "") -> float:
    """Wall seconds of one call (its CPU seconds go to ``CPU[label]``)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    CPU.setdefault(label, []).append(time.process_time() - c0)
    return wall


def naive_index_add(out, x_BD: torch.Tensor, F: int) -> torch.Tensor:
    """The baseline: gather the input of every (latent, input) pair, then index_add_ into [F, D]."""
    k = out.idx_BK.shape[1]
    acc_FD = torch.zeros(F, x_BD.shape[1])
    acc_FD.index_add_(0, out.idx_BK.reshape(-1), x_BD.repeat_interleave(k, 0))
    return acc_FD


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, rounds: int, every: int) -> float:
    """Print one size's numbers; return the CPU-time ratio of a step with the exact tracker / without."""
    d, F, k, B = SIZES[name]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(B, d, generator=gen) for _ in range(4)]
    plain = make_trainer(d, F, k, B, None)
    plain.train_step(data[0])  # warm-up (b_dec init, allocator)
    rss_before = peak_rss_mib()
    exact = make_trainer(d, F, k, B, TrackerConfig(enabled=True))
    exact.train_step(data[0])
    rss_growth = peak_rss_mib() - rss_before
    sparse = make_trainer(d, F, k, B, TrackerConfig(enabled=True, stats_every=every))
    sparse.train_step(data[0])
    times: dict[str, list[float]] = {n: [] for n in ("plain", "exact", "sparse", "update", "naive")}
    with torch.no_grad():
        out = exact.sae(data[1])
    for r in range(rounds):
        x = data[r % len(data)]
        times["plain"].append(timed(lambda: plain.train_step(x), f"{name}.plain"))
        times["exact"].append(timed(lambda: exact.train_step(x), f"{name}.exact"))
        # stats_every steps of the sparse tracker, so the average includes exactly one sums update.
        times["sparse"].append(sum(timed(lambda: sparse.train_step(x), f"{name}.sparse") for _ in range(every)) / every)
        times["update"].append(timed(lambda: exact.tracker.update(out, data[1]), f"{name}.update"))
        times["naive"].append(timed(lambda: naive_index_add(out, data[1], F), f"{name}.naive"))
    med = {n: statistics.median(v) for n, v in times.items()}
    cpu = {n: statistics.median(CPU[f"{name}.{n}"]) for n in times}
    state_mib = sum(t.numel() * t.element_size() for t in exact.tracker.state_dict().values()) / 2 ** 20
    ratio = med["exact"] / med["plain"]
    print(f"[{name}] (load average {os.getloadavg()[0]:.1f}) d_in {d}, dict {F}, k {k}, batch {B}; {rounds} interleaved rounds, medians:")
    print(f"  step without tracker       {med['plain'] * 1e3:9.1f} ms  ({B / med['plain']:,.0f} tok/s)")
    print(f"  step with tracker (exact)  {med['exact'] * 1e3:9.1f} ms  ({B / med['exact']:,.0f} tok/s)  ratio {ratio:.3f}")
    print(f"  step with stats_every={every}   {med['sparse'] * 1e3:9.1f} ms  ({B / med['sparse']:,.0f} tok/s)  "
          f"ratio {med['sparse'] / med['plain']:.3f}")
    print(f"  tracker.update alone       {med['update'] * 1e3:9.1f} ms  = {med['update'] / med['plain']:.1%} of a step")
    print(f"  naive index_add_           {med['naive'] * 1e3:9.1f} ms  = {med['naive'] / med['plain']:.1%} of a step "
          f"(update is {med['naive'] / med['update']:.1f}x faster)")
    print(f"  CPU time (process, medians): without {cpu['plain'] * 1e3:.0f} ms, exact {cpu['exact'] * 1e3:.0f} ms "
          f"(ratio {cpu['exact'] / cpu['plain']:.3f}), stats_every={every} {cpu['sparse'] * 1e3:.0f} ms "
          f"(ratio {cpu['sparse'] / cpu['plain']:.3f}), update {cpu['update'] * 1e3:.0f} ms, naive {cpu['naive'] * 1e3:.0f} ms")
    print(f"  tracker state {state_mib:.1f} MiB; peak RSS grew {rss_growth:.1f} MiB when the tracked trainer started "
          f"(its SAE + Adam + tracker; process peak {peak_rss_mib():.0f} MiB)")
    return cpu["exact"] / cpu["plain"]


def score_effect(every: int, steps: int = 1000) -> None:
    """Effect of ``stats_every`` on the scores: two trackers fed the same forward outputs of one toy training run."""
    from scipy.stats import spearmanr

    from fcsae.toy import ToyConfig, make_toy
    from fcsae.tracker import FrequencyConsistencyTracker

    toy = make_toy(ToyConfig(), seed=0)
    d, F, B = toy.x_ND.shape[1], 64, 512
    trainer = Trainer(SparseAutoencoder(SAEConfig(d_in=d, dict_size=F, activation="topk", k=4), seed=0),
                      TrainerConfig(lr=2e-3, batch_size=B, total_tokens=steps * B, warmup_steps=50, log_every=steps,
                                    buffer_tokens=0), SplitConfig(criterion="none"), TrackerConfig(enabled=False))
    trackers = [FrequencyConsistencyTracker(TrackerConfig(stats_every=n), F, d) for n in (1, every)]
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = toy.x_ND[torch.randint(len(toy.x_ND), (B,), generator=g)]
        trainer.train_step(x)
        with torch.no_grad():
            out = trainer.sae(x)
        for tr in trackers:
            tr.update(out, x)
    a, b = (tr.scores() for tr in trackers)
    alive = (a.count_F > 0) & (b.count_F > 0)
    rho_s = spearmanr(a.score_F[alive].numpy(), b.score_F[alive].numpy()).statistic
    rho_c = spearmanr(a.consistency_F[alive].numpy(), b.consistency_F[alive].numpy()).statistic
    dc = (a.consistency_F - b.consistency_F)[alive].abs()
    print(f"[score effect] planted toy, TopK dict {F}, k 4, {steps} steps: stats_every={every} vs exact, "
          f"{int(alive.sum())} latents: Spearman s {rho_s:.3f}, c {rho_c:.3f}; |delta c| mean {float(dc.mean()):.4f}, "
          f"max {float(dc.max()):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: automatic, see fcsae.threads)")
    ap.add_argument("--quick", action="store_true", help="small size only")
    ap.add_argument("--stats-every", type=int, default=4, help="the subsampled tracker's TrackerConfig.stats_every")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads, load average {os.getloadavg()[0]:.1f}")
    ratios = {"small": bench("small", args.rounds, args.stats_every)}
    if not args.quick:
        ratios["large"] = bench("large", args.rounds, args.stats_every)
    score_effect(args.stats_every)
    worst = max(ratios, key=ratios.get)
    print(f"tracker_overhead: ratio={ratios[worst]:.2f} (target <= 1.05, CPU time of a step with / without the "
          f"exact tracker, at {worst}; " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()) + ")")


if __name__ == "__main__":
    main()
