"""Ray Tune's overhead in a sweep: sum of trial time vs the sweep's wall time, at concurrency 1 and 2.

N trials of a fixed length run through the real driver (``run_sweep``: Ray
start, Optuna, per-trial Parquet rows, shutdown) with the stand-in runner of
the tests, whose trials wait ``--trial-seconds`` in steps (so the trials do
not compete for this machine's 2 cores and what is left is orchestration).
Trial time is what each trial measured itself (the ``train_seconds`` +
``eval_seconds`` columns of its row).

    ideal wall  = sum(trial seconds) / concurrency
    overhead    = (sweep wall - ideal wall) / ideal wall

The headline is the larger overhead of the two concurrencies. Target: under
0.10 for trials of a minute or more. The default run is 8 trials of 20 s (about
5 minutes in all), so its headline carries the one-time start-up over shorter
trials than the target's; the table splits the one-time start and teardown
from the overhead during trials, and a last line projects the same overhead
onto 60-s trials (fixed parts unchanged, per-trial part scaled), labelled as such.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 8] [--trial-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from orchestrator import driver, space  # noqa: E402
from results_schema import reader  # noqa: E402

STEPS = 20


def _spec(trials: int, concurrency: int):
    return space.parse_space({
        "name": f"overhead_c{concurrency}",
        "runner": "tests.orchestrator.fake_runner",
        "fixed": {"sae": {"activation": "topk", "k": 4, "dict_size": 32},
                  "trainer": {"total_tokens": STEPS * 256, "batch_size": 256}},
        "search": {"tracker.ema_alpha": {"type": "float", "low": 0.9, "high": 0.999}},
        "objectives": [{"metric": "absorption.mean_absorption_fraction", "mode": "min"}],
        "num_samples": trials, "max_concurrent": concurrency, "resources": {"cpu": 1},
    })


class Measured(NamedTuple):
    """One sweep's timings (seconds)."""

    wall: float
    trial_sum: float
    startup: float
    """From calling run_sweep to the first trial's start (validation, prepare, ray.init, first worker)."""
    teardown: float
    """From the last row written to run_sweep returning (ray.shutdown, counting rows)."""


def measure(trials: int, trial_seconds: float, concurrency: int, workdir: Path) -> Measured:
    """Timings of one sweep through the real driver."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fake.json").write_text(json.dumps({"step_s": trial_seconds / STEPS}))
    exp = workdir / f"exp_c{concurrency}"
    t0, start_clock = time.perf_counter(), time.time()
    outcome = driver.run_sweep(_spec(trials, concurrency), exp, mode="new", num_cpus=2, live=False)
    wall, end_clock = time.perf_counter() - t0, time.time()
    if not outcome.complete or outcome.counts["ok"] != trials:
        raise SystemExit(f"sweep at concurrency {concurrency} did not finish: {outcome.counts}")
    rows = reader.scan_results(exp / "results").collect()
    first_start = rows["started_at"].min().timestamp()
    last_row = rows["finished_at"].max().timestamp()
    return Measured(wall, float((rows["train_seconds"] + rows["eval_seconds"]).sum()),
                    first_start - start_clock, end_clock - last_row)


def main() -> None:
    """Run both sweeps and print the side-by-side table and the headline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--trial-seconds", type=float, default=20.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    ratios, projected = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for conc in (1, 2):
            m = measure(args.trials, args.trial_seconds, conc, Path(tmp) / f"c{conc}")
            ideal = m.trial_sum / conc
            ratios[conc] = (m.wall - ideal) / ideal
            between = m.wall - m.startup - m.teardown - ideal  # scheduling, trial start-up, reports, checkpoints
            ideal60 = ideal * 60.0 / args.trial_seconds
            projected[conc] = (m.startup + m.teardown + between * 60.0 / args.trial_seconds) / ideal60
            print(f"concurrency {conc}: {args.trials} trials, sum of trial time {m.trial_sum:7.1f} s, "
                  f"ideal wall {ideal:7.1f} s, sweep wall {m.wall:7.1f} s, overhead {ratios[conc]:.3f} "
                  f"(one-time start {m.startup:.1f} s, teardown {m.teardown:.1f} s, "
                  f"during trials {between:.1f} s = {between / ideal:.3f} of trial time)", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print(f"projected onto {args.trials} trials of 60 s (measured fixed parts, per-trial part scaled; not measured): "
          + ", ".join(f"concurrency {c} {r:.3f}" for c, r in projected.items()))
    worst = max(ratios.values())
    print(f"sweep_overhead: ratio={worst:.2f} (target < 0.10 for trials of >= 60 s; "
          f"{args.trials} trials of {args.trial_seconds:.0f} s, worst of concurrency 1 and 2)")


if __name__ == "__main__":
    main()
