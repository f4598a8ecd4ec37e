"""Frequency-consistency tracker overhead: TopK training step with and without the tracker, side by side.

Two ``Trainer``s with identical SAEs and batches, one with the tracker enabled
(``TrackerConfig(enabled=True)``, criterion ``none`` so only the per-step
update is timed), one without; rounds interleave the two and the median step
time is reported, because the 2-core machine is shared. Also timed in the same
run: ``tracker.update`` alone on a real forward output, and the naive
``index_add_`` over the B*k gathered inputs it replaces. Peak memory: the
tracker's state, and the growth of the process's peak RSS when the tracker
starts updating after the untracked steps have reached their own peak.

Usage: ``python benchmarks/tracker_overhead.py [--rounds 5] [--threads 2] [--quick]``.
Last line: ``tracker_overhead: ratio=X.XX (target <= 1.05)`` at the large size.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig  # noqa: E402
from fcsae.sae import SparseAutoencoder  # noqa: E402
from fcsae.trainer import Trainer  # noqa: E402

SIZES = {  # name: (d_in, dict_size, k, batch)
    "small": (640, 4096, 32, 1024),
    "large": (640, 16384, 64, 4096),
}


def make_trainer(d: int, F: int, k: int, B: int, tracked: bool) -> Trainer:
    """A TopK trainer as ``fcsae train`` builds it; dead latents never trigger AuxK here (fresh SAE)."""
    cfg = TrainerConfig(batch_size=B, total_tokens=B * 10_000, warmup_steps=0, log_every=10_000, buffer_tokens=0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, dict_size=F, activation="topk", k=k), seed=0)
    return Trainer(sae, cfg, SplitConfig(criterion="none"), TrackerConfig(enabled=tracked))


def timed(fn) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def naive_index_add(out, x_BD: torch.Tensor, F: int) -> torch.Tensor:
    """The baseline: gather the input of every (latent, input) pair, then index_add_ into [F, D]."""
    k = out.idx_BK.shape[1]
    acc_FD = torch.zeros(F, x_BD.shape[1])
    acc_FD.index_add_(0, out.idx_BK.reshape(-1), x_BD.repeat_interleave(k, 0))
    return acc_FD


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, rounds: int) -> float:
    """Print one size's numbers; return the step-time ratio tracked / untracked."""
    d, F, k, B = SIZES[name]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(B, d, generator=gen) for _ in range(4)]
    plain, tracked = make_trainer(d, F, k, B, False), make_trainer(d, F, k, B, True)
    plain.train_step(data[0])  # warm-up (b_dec init, allocator)
    rss_before = peak_rss_mib()
    tracked.train_step(data[0])
    rss_growth = peak_rss_mib() - rss_before
    t_plain, t_tracked, t_update, t_naive = [], [], [], []
    with torch.no_grad():
        out = tracked.sae(data[1])
    for r in range(rounds):
        x = data[r % len(data)]
        t_plain.append(timed(lambda: plain.train_step(x)))
        t_tracked.append(timed(lambda: tracked.train_step(x)))
        t_update.append(timed(lambda: tracked.tracker.update(out, data[1])))
        t_naive.append(timed(lambda: naive_index_add(out, data[1], F)))
    med = {n: statistics.median(v) for n, v in
           (("plain", t_plain), ("tracked", t_tracked), ("update", t_update), ("naive", t_naive))}
    state_mib = sum(t.numel() * t.element_size() for t in tracked.tracker.state_dict().values()) / 2 ** 20
    ratio = med["tracked"] / med["plain"]
    print(f"[{name}] d_in {d}, dict {F}, k {k}, batch {B}; {rounds} interleaved rounds, medians:")
    print(f"  step without tracker  {med['plain'] * 1e3:9.1f} ms  ({B / med['plain']:,.0f} tok/s)")
    print(f"  step with tracker     {med['tracked'] * 1e3:9.1f} ms  ({B / med['tracked']:,.0f} tok/s)  "
          f"ratio {ratio:.3f}")
    print(f"  tracker.update alone  {med['update'] * 1e3:9.1f} ms  = {med['update'] / med['plain']:.1%} of a step")
    print(f"  naive index_add_      {med['naive'] * 1e3:9.1f} ms  = {med['naive'] / med['plain']:.1%} of a step "
          f"(update is {med['naive'] / med['update']:.1f}x faster)")
    print(f"  tracker state {state_mib:.1f} MiB; peak RSS grew {rss_growth:.1f} MiB when tracking started "
          f"(process peak {peak_rss_mib():.0f} MiB)")
    del plain, tracked
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="small size only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    ratio = bench("small", args.rounds)
    if not args.quick:
        ratio = bench("large", args.rounds)
    size = "small" if args.quick else "large"
    print(f"tracker_overhead: ratio={ratio:.2f} (target <= 1.05, step with / without tracker, {size} size)")


if __name__ == "__main__":
    main()
