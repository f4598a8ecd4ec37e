"""How many torch threads a training or benchmark process uses, and the OpenMP wait policy.

Measured on the project's 2-core machine (docs/training.md, "Threads"): when
other jobs keep the cores busy, one thread ran the SAE step 1.5-4x faster than
two (two OpenMP threads wait for each other at every parallel region and one
of them is usually descheduled); on an idle machine two threads were 1.8x
faster. So ``auto_threads`` takes only the cores the 1-minute load average
leaves free, and respects ``OMP_NUM_THREADS`` when it is set:
Ray sets it to a trial's CPUs (1 in fcsae's sweeps), so each trial keeps one
thread and trials do not oversubscribe the cores.

The OpenMP wait policy decides what a thread does at a barrier: spin (ACTIVE,
libgomp's default for a while) or sleep (PASSIVE). It is read once when the
OpenMP runtime starts, i.e. when torch is imported, so it can only be chosen
for a new process: ``fcsae train`` re-executes nothing and leaves it to the
environment; set ``OMP_WAIT_POLICY=PASSIVE`` on a shared machine
(``benchmarks/train_step.py --wait-policy`` measures both).
"""

from __future__ import annotations

import os

from fcsae.errors import FcsaeInputError


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads(load: float | None = None) -> int:
    """Threads to use: ``OMP_NUM_THREADS`` if set, else the cores that ``load`` (default: the 1-minute
    load average of the other jobs) leaves free, rounded, at least 1 (2 cores: load < 0.5 gives 2, else 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise FcsaeInputError(f"OMP_NUM_THREADS: must be an integer >= 1, got {env!r}")
        return n
    n = cores()
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(n, int(n - load + 0.5)))


def set_threads(n: int = 0) -> int:
    """Set torch's intra-op threads to ``n`` (0: ``auto_threads()``); returns the number set."""
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FcsaeInputError(f"threads: must be an integer >= 0 (0 = automatic), got {n!r}")
    n = n or auto_threads()
    torch.set_num_threads(n)
    return n
