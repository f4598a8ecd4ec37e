"""How many torch threads a training or benchmark process uses, and the OpenMP wait policy.

Measured on the project's 2-core machine (docs/training.md, "Threads"): when
other jobs keep the cores busy, one thread ran the SAE step 1.5-4x faster than
two (two OpenMP threads wait for each other at every parallel region and one
of them is usually descheduled); on an idle machine two threads were 1.8x
faster. So ``auto_threads`` takes only the cores the 1-minute load average
leaves free, and respects ``OMP_NUM_THREADS`` when it is set:
Ray sets it to a trial's CPUs (1 in fcsae's sweeps), so each trial keeps one
thread and trials do not oversubscribe the cores.

The OpenMP wait policy decides what a thread does at a barrier: spin (libgomp's
default, for a while) or sleep (PASSIVE). Under load the spinning thread burns
a core another job needs: measured with 2 threads at load average 11-16, a
576 x 4096 step took 2.3-2.7 s wall and 620-730 ms CPU with the default
policy, 0.87-1.04 s and 183-200 ms with PASSIVE (1 thread: 0.97-1.0 s,
163-188 ms). The policy is read once, when torch loads its OpenMP runtime, so
``import fcsae`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set
(``default_wait_policy``); it takes effect when fcsae is imported before
torch (the ``fcsae`` commands, Ray trials started by fcsae's driver, the
benchmarks), and an explicit ``OMP_WAIT_POLICY`` always wins.
"""

from __future__ import annotations

import os

from fcsae.errors import FcsaeInputError


WAIT_POLICY = "PASSIVE"
"""fcsae's default OpenMP wait policy (see the module docstring)."""


def default_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY`` to ``WAIT_POLICY`` unless the environment sets it; returns the policy in force."""
    return os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


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
