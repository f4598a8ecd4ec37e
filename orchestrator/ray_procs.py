"""The local Ray cluster's processes: recorded, watched, and stopped when their driver dies.

A driver that starts its own Ray records the cluster's processes in
``<exp>/ray_pids.json`` and starts a *watchdog* (``python -m
orchestrator.ray_procs``) in its own session. The watchdog re-records the
driver's process tree every ``SNAPSHOT_S`` seconds (trial workers appear
later than ``ray.init``) and, when the pipe from the driver closes without a
``done`` line (the driver was SIGKILLed or crashed), stops every recorded
process and every process carrying the driver's token in its environment
(``TOKEN_VAR``, set before ``ray.init``: it catches a kill in the middle of
``ray.init`` and processes started since the last snapshot). A process is matched by pid *and* creation time, so a recycled pid is
never touched. A later ``--resume``/``--restart`` repeats the stop for
whatever is still recorded (the watchdog itself may have been killed).

No Ray import here: the watchdog must start fast and work after Ray is gone.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

from fcsae.io import write_json

log = logging.getLogger(__name__)

PIDS_FILE = "ray_pids.json"
SNAPSHOT_S = 0.5
"""Seconds between the watchdog's snapshots of the driver's process tree."""


def _tree(pid: int, exclude: set[int]) -> list[dict]:
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            if p.pid not in exclude:
                out.append({"pid": p.pid, "create_time": p.create_time()})
        except psutil.Error:
            continue
    return out


TOKEN_VAR = "FCSAE_DRIVER_TOKEN"
"""Environment variable a driver sets before starting Ray: every process Ray starts for it inherits it."""


def carrying(token: str, exclude: set[int] = frozenset()) -> list[dict]:
    """Running processes whose environment carries ``TOKEN_VAR=token`` (this user's, other than ``exclude``).

    Catches what a tree snapshot misses: processes started just before the driver died, and ones already
    re-parented to init when they are looked for.
    """
    out = []
    for p in psutil.process_iter(["pid", "create_time"]):
        if p.pid in exclude:
            continue
        try:
            if p.environ().get(TOKEN_VAR) == token:
                out.append({"pid": p.pid, "create_time": p.info["create_time"]})
        except psutil.Error:
            continue
    return out


def record(root: Path, driver_pid: int | None = None, exclude: set[int] = frozenset()) -> list[dict]:
    """Write the driver's current process tree (and its token) to ``ray_pids.json``; returns the tree."""
    driver_pid = driver_pid or os.getpid()
    procs = _tree(driver_pid, set(exclude))
    write_json(root / PIDS_FILE, {"driver": driver_pid, "token": os.environ.get(TOKEN_VAR), "processes": procs})
    return procs


def _same_process(pid: int, create_time: float | None) -> bool:
    """True if ``pid`` runs and is the process recorded (same start time), not a recycled pid."""
    try:
        return create_time is not None and abs(psutil.Process(pid).create_time() - create_time) < 1e-3
    except psutil.Error:
        return False


def stop_processes(records: list[dict], timeout: float = 5.0) -> int:
    """Terminate (then kill) the recorded processes that still run; returns how many were stopped."""
    stopped = []
    for rec in records:
        if _same_process(rec["pid"], rec.get("create_time")):
            try:
                p = psutil.Process(rec["pid"])
                p.terminate()
                stopped.append(p)
            except psutil.Error:
                continue
    _, alive = psutil.wait_procs(stopped, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(stopped)


def stop_recorded(root: Path) -> int:
    """Stop processes a previous (killed) driver of this experiment left; returns how many were stopped.

    The caller holds the experiment lock, so the driver that wrote the record is gone.
    """
    path = root / PIDS_FILE
    if not path.exists():
        return 0
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        info = {}
    records = info.get("processes", [])
    if info.get("token"):
        records += carrying(info["token"], exclude={os.getpid()})
    n = stop_processes(records)
    if n:
        log.info("stopped %d leftover Ray processes of an earlier driver", n)
    path.unlink(missing_ok=True)
    return n


class Watchdog:
    """The driver's handle on its watchdog process."""

    def __init__(self, root: Path, lock_fd: int):
        """Start before ``ray.init``: it marks this process's environment with a token Ray's processes inherit."""
        os.environ[TOKEN_VAR] = uuid.uuid4().hex
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.ray_procs", str(root), str(os.getpid())],
                                     stdin=subprocess.PIPE, env=env, start_new_session=True,
                                     pass_fds=(lock_fd,))  # the experiment lock stays held until it exits

    def done(self) -> None:
        """A clean end: the watchdog exits without stopping anything."""
        try:
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def watch(root: Path, driver_pid: int) -> None:
    """Watchdog loop: snapshot the driver's tree until stdin closes; stop everything unless told ``done``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the driver
    me = {os.getpid()}
    seen: dict[tuple, dict] = {}  # every process ever seen in the tree: ones that exited are skipped when stopping
    buf = b""
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], SNAPSHOT_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 64)
            if chunk:
                buf += chunk
                if b"done" in buf:
                    return
                continue
            break  # EOF without "done": the driver died
        new = {(r["pid"], r["create_time"]): r for r in _tree(driver_pid, me)}
        if set(new) - set(seen):
            seen.update(new)
            write_json(root / PIDS_FILE, {"driver": driver_pid, "token": os.environ.get(TOKEN_VAR),
                                          "processes": list(seen.values())})
    token = os.environ.get(TOKEN_VAR)
    stop_processes(list(seen.values()) + (carrying(token, exclude=me) if token else []))
    (root / PIDS_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    watch(Path(sys.argv[1]), int(sys.argv[2]))
