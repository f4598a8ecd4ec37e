"""Chaos test of sweep resume: SIGKILL the driver at random moments, resume, repeat; check the rows every time.

    .venv/bin/python scripts/chaos_resume.py --kills 10

Runs a sweep of the fast stand-in runner (``tests/orchestrator/fake_runner.py``,
so no model is needed) in a fresh temporary directory. Each round starts
``fcsae-sweep`` (``--resume`` once sweep.json exists), waits a random time (set-up,
mid-sweep, last trial: up to ``--max-wait`` seconds after the driver starts,
or, for a ``--mid-fraction`` of rounds, up to ``--mid-wait`` seconds after
that round's first trial started, so kills land mid-sweep even when start-up
is slow), SIGKILLs the
driver alone and checks, once the killed driver's processes are gone (a worker
may land a row in the moment after its driver died):

- every row file holds one row whose ``trial_id`` is its file name (no duplicates);
- no row written before an earlier kill has gone or changed;
- no trial that had a row at an earlier kill has completed again;
- the killed driver's processes (Ray, trial workers) were gone within 30 s.

When the kills are done, one last resume runs to the end; it must exit 0 with
one ``ok`` row per trial, and every trial must have completed exactly once,
plus once more for each kill that caught it after its work but before its row
(such a trial was not finished, so running it again is correct). The last
line is ``chaos_resume: ... -> PASS`` or ``-> FAIL`` (exit code 0 or 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_schema import reader  # noqa: E402

SPACE = {
    "name": "chaos",
    "runner": "tests.orchestrator.fake_runner",
    "fixed": {"sae": {"activation": "topk", "k": 4, "dict_size": 32}, "trainer": {"total_tokens": 5120, "batch_size": 256}},
    "search": {"split.criterion": {"type": "categorical", "values": ["none", "fc"], "grid": True},
               "tracker.ema_alpha": {"type": "float", "low": 0.9, "high": 0.999}},
    "objectives": [{"metric": "absorption.mean_absorption_fraction", "mode": "min"}],
    "max_concurrent": 2,
    "resources": {"cpu": 1},
}


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _rows(results: Path) -> dict[str, dict]:
    """trial_id -> (status, finished_at) of every row; raises on a duplicate or misnamed row."""
    out = {}
    for f in reader.trial_files(results):
        reader.check_file(f)
        rows = pq.read_table(f).to_pylist()
        if len(rows) != 1 or rows[0]["trial_id"] != f.stem:
            raise AssertionError(f"{f}: {len(rows)} rows, trial ids {[r['trial_id'] for r in rows]}")
        out[f.stem] = {"status": rows[0]["status"], "finished_at": str(rows[0]["finished_at"])}
    return out


def _driver(args: list[str], env: dict) -> subprocess.Popen:
    code = "import sys; from orchestrator.cli import sweep_main; sys.exit(sweep_main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _gone(procs: list[psutil.Process], timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
            return True
        time.sleep(0.5)
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs before the final resume (default 10)")
    p.add_argument("--trials", type=int, default=16, help="trials in the sweep (even; default 16)")
    p.add_argument("--step-s", type=float, default=0.3, help="seconds per fake training step (20 steps a trial)")
    p.add_argument("--max-wait", type=float, default=40.0, help="longest wait before a kill, seconds (default 40)")
    p.add_argument("--mid-fraction", type=float, default=0.6,
                   help="share of kills timed from the round's first trial start (the rest from the driver's start)")
    p.add_argument("--mid-wait", type=float, default=15.0, help="longest wait after that first start, seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--workdir", default=None, help="where to put the experiment (default: a new temp dir)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fcsae-chaos-")).resolve()
    exp = logs = work / "exp"  # the fake runner logs next to the trials
    (work / "fake.json").write_text(json.dumps({"step_s": args.step_s}))
    space_file = work / "chaos.yaml"
    space_file.write_text(yaml.safe_dump({**SPACE, "num_samples": args.trials}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "RAY_AUTH_MODE": "disabled"}
    base = ["--space", str(space_file), "--experiment-dir", str(exp), "--no-live", "--num-cpus", "2"]
    problems: list[str] = []
    kept: dict[str, dict] = {}  # rows seen at a kill: must never change or vanish
    reruns_allowed: Counter = Counter()  # completions logged without a row at a kill
    started = time.time()
    kills = rounds = 0
    while kills < args.kills and rounds < 3 * args.kills:
        rounds += 1
        i = kills
        # --resume only once the experiment exists: a kill during set-up can come before sweep.json
        proc = _driver(base + (["--resume"] if (exp / "sweep.json").exists() else []), env)
        t0 = time.time()
        starts0 = len(_lines(logs / "fake_starts.log"))
        if rng.random() < args.mid_fraction:  # mid-sweep: a random moment after this round's first trial start
            while len(_lines(logs / "fake_starts.log")) == starts0 and proc.poll() is None and time.time() - t0 < 600:
                time.sleep(0.1)
            wait = time.time() - t0 + rng.uniform(0.0, args.mid_wait)
        else:  # anywhere from set-up on
            wait = rng.uniform(0.5, args.max_wait)
        while time.time() - t0 < wait and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is not None:
            out = proc.stdout.read()
            print(f"round {rounds}: driver exited by itself ({proc.returncode}) after {time.time() - t0:.1f} s")
            if proc.returncode != 0:
                problems.append(f"round {rounds}: driver exited {proc.returncode}: {out[-500:]}")
            if (exp / "sweep.json").exists() and len(_rows(exp / "results")) >= args.trials:
                break  # the sweep finished before all kills were spent
            continue
        kills += 1
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not _gone(tree, 30):  # check once the killed sweep is quiet: a worker may land a row after its driver
            problems.append(f"kill {i + 1}: processes of the killed driver still run after 30 s")
        rows = _rows(exp / "results")
        done = Counter(_lines(logs / "fake_completions.log"))
        for tid, row in kept.items():
            if rows.get(tid) != row:
                problems.append(f"kill {i + 1}: row of {tid} changed or vanished: {row} -> {rows.get(tid)}")
            if done[tid] > 1 + reruns_allowed[tid]:
                problems.append(f"kill {i + 1}: finished trial {tid} ran again")
        for tid, n in done.items():
            if tid not in rows and tid not in kept:
                reruns_allowed[tid] = n  # finished its work, no row: not finished, may complete once more
        kept.update(rows)
        print(f"kill {i + 1}: after {wait:.1f} s; {len(rows)} rows, {sum(done.values())} completions logged")
    final = _driver(base + (["--resume"] if (exp / "sweep.json").exists() else []), env)
    out, _ = final.communicate(timeout=900)
    rows = _rows(exp / "results")
    done = Counter(_lines(logs / "fake_completions.log"))
    if final.returncode != 0:
        problems.append(f"final resume exited {final.returncode}: {out[-800:]}")
    if len(rows) != args.trials or {r["status"] for r in rows.values()} != {"ok"}:
        problems.append(f"final: {len(rows)} rows (want {args.trials}), statuses {Counter(r['status'] for r in rows.values())}")
    for tid in rows:
        if done[tid] != 1 + reruns_allowed[tid]:
            problems.append(f"final: trial {tid} completed {done[tid]} times (allowed {1 + reruns_allowed[tid]})")
    for tid, row in kept.items():
        if rows.get(tid) != row:
            problems.append(f"final: row of {tid} changed or vanished")
    for line in problems:
        print(f"PROBLEM: {line}")
    verdict = "PASS" if not problems else "FAIL"
    print(f"chaos_resume: kills={kills} rounds={rounds} rows={len(rows)}/{args.trials} unique_ids={len(set(rows))} "
          f"reruns_of_unfinished={sum(reruns_allowed.values())} problems={len(problems)} "
          f"wall={time.time() - started:.0f}s dir={work} -> {verdict}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
