"""The experiment directory: its marker, its lock, what ``--restart`` may delete, what an abandoned trial left.

An fcsae experiment is a directory whose ``sweep.json`` carries
``"format": "fcsae-experiment/1"`` (written when the experiment is created).
Only such a directory is ever continued or wiped, and a wipe removes only the
entries fcsae writes (``FCSAE_ENTRIES``); anything else in it is left alone.

One driver per experiment: ``ExperimentLock`` holds an exclusive
``fcntl.flock`` on ``<exp>/.fcsae.lock`` for the driver's lifetime, taken
before any other work; the file holds the driver's pid. The driver's watchdog
(``orchestrator.ray_procs``) shares the lock, so after a SIGKILL it stays held
until the old Ray processes are stopped; then the kernel drops it: a stale
lock never blocks a resume and a resume never overlaps the old trials.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

from fcsae import storage
from fcsae.errors import FcsaeInputError

log = logging.getLogger(__name__)

Location = Path | storage.RemotePath

FORMAT = "fcsae-experiment/1"
"""Marker value of ``sweep.json``'s ``format`` key."""
LOCK_NAME = ".fcsae.lock"
FCSAE_ENTRIES = ("sweep.json", "prepared.json", "results", "trials", "ray", "ray_pids.json")
"""Top-level entries of an experiment that fcsae writes (and ``--restart`` deletes)."""
_LEGACY_KEYS = {"sweep_id", "name", "space", "created", "fcsae_version"}


def read_marker(root: Location) -> dict:
    """sweep.json of the experiment at ``root``; FcsaeInputError if it is not an fcsae experiment's."""
    path = root / "sweep.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FcsaeInputError(f"{root}: no sweep.json; not an fcsae experiment") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FcsaeInputError(f"{path}: unreadable or truncated ({type(e).__name__}); not a usable fcsae "
                              "experiment; fcsae will not resume or delete it") from None
    if not isinstance(meta, dict) or not (meta.get("format") == FORMAT or _LEGACY_KEYS <= set(meta)):
        raise FcsaeInputError(f"{path}: not written by fcsae (no format {FORMAT!r}); fcsae will not resume or "
                              "delete this directory; choose another --experiment-dir")
    if not isinstance(meta.get("sweep_id"), str) or not isinstance(meta.get("space"), dict):
        raise FcsaeInputError(f"{path}: sweep_id or space missing; not a usable fcsae experiment")
    return meta


def is_experiment(root: Location) -> bool:
    """True if ``root`` holds a valid fcsae experiment marker."""
    try:
        read_marker(root)
        return True
    except FcsaeInputError:
        return False


def list_experiments(parent: Location) -> list[str]:
    """Names of the fcsae experiments directly under ``parent`` (sorted)."""
    try:
        return sorted(p.name for p in parent.iterdir() if p.is_dir() and is_experiment(p))
    except OSError:
        return []


def foreign_entries(root: Location) -> list[str]:
    """Top-level entries of ``root`` that fcsae did not write."""
    return sorted(p.name for p in root.iterdir() if p.name not in FCSAE_ENTRIES and p.name != LOCK_NAME)


def wipe(root: Location) -> None:
    """Delete what fcsae wrote in the experiment at ``root`` (its marker must be valid); leave the rest."""
    read_marker(root)
    for name in FCSAE_ENTRIES[1:] + FCSAE_ENTRIES[:1]:  # the marker last: a crash mid-wipe stays restartable
        path = root / name
        if path.is_dir() and not path.is_symlink():
            storage.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if isinstance(root, storage.RemotePath):
        storage.rmtree(storage.local_cache(root, "scratch"))
    kept = foreign_entries(root)
    if kept:
        log.warning("%s: --restart kept entries fcsae did not write: %s", root, ", ".join(kept))


def check_writable(root: Location) -> None:
    """Refuse (one line) an experiment dir, or its results/trials dirs, that cannot be written."""
    for d in (root, root / "results", root / "trials"):
        if not d.exists():
            continue
        if not d.is_dir():
            raise FcsaeInputError(f"{d}: exists and is not a directory")
        probe = d / f".fcsae-write-test-{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise FcsaeInputError(f"{d}: not writable ({e.strerror}); fix its permissions or choose another "
                                  "--experiment-dir / --storage") from None


def prepare_root(root: Location) -> None:
    """Create ``root`` (and parents) or refuse with one line: a file in the way, a read-only parent or bucket."""
    if root.exists() and not root.is_dir():
        raise FcsaeInputError(f"{root}: exists and is not a directory; --experiment-dir must be a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if isinstance(root, storage.RemotePath):  # credentials and bucket are only tested by a write
            probe = root / f".fcsae-write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise FcsaeInputError(f"{root}: a parent of the experiment directory is a file") from None
    except OSError as e:
        raise FcsaeInputError(f"{root}: cannot create the experiment directory ({e.strerror}); "
                              "choose a writable --experiment-dir / --storage") from None


def control_dir(root: Location) -> Path:
    """This machine's directory for the lock and the Ray pid record: the experiment itself when it is local.

    An object store has no locks: for remote storage the lock lives under ``$FCSAE_HOME/experiments/`` and
    guards against a second driver on the same machine only.
    """
    local = storage.local_cache(root, "experiments")
    local.mkdir(parents=True, exist_ok=True)
    return local


def _alive(pid_text: str) -> bool:
    """True if the pid runs and is not a zombie (a dead driver's lock may still be held by its watchdog)."""
    import psutil

    try:
        return psutil.Process(int(pid_text)).status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.Error):
        return False


class ExperimentLock:
    """An exclusive OS lock on one experiment, held until ``release`` (or the process's death)."""

    def __init__(self, root: Location):
        self.path = control_dir(root) / LOCK_NAME
        self.experiment = root
        self._fd: int | None = None

    def acquire(self, wait_s: float = 60.0) -> "ExperimentLock":
        """Take the lock or raise FcsaeInputError naming the holder's pid.

        A live holder is refused at once. A lock whose recorded driver is dead is held by that driver's
        watchdog while it stops the old Ray processes: wait up to ``wait_s`` for it.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FcsaeInputError(f"{self.experiment}: cannot create its lock file ({e.strerror}); "
                                  "choose a writable --experiment-dir / --storage") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                if _alive(holder) or time.monotonic() > deadline:
                    os.close(fd)
                    raise FcsaeInputError(f"{self.experiment}: another fcsae-sweep (pid {holder}) is running this "
                                          "experiment; wait for it or stop it first") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def fileno(self) -> int:
        """The locked descriptor (a child given a copy keeps the lock held until it exits too)."""
        assert self._fd is not None, "lock not held"
        return self._fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a waiting driver)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ExperimentLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def trial_dirs(root: Location) -> list[Location]:
    """Where trials keep their working dirs: ``trials/`` (and, for remote storage, this node's scratch dir)."""
    dirs = [root / "trials"]
    if isinstance(root, storage.RemotePath):
        dirs.append(storage.local_cache(root, "scratch"))
    return dirs


def abandoned_trials(root: Location, known: set[str], with_rows: set[str]) -> list[Location]:
    """Trial dirs that Ray does not know (``known``) and that have no row: left by a killed driver."""
    out = []
    for d in trial_dirs(root):
        if d.is_dir():
            out += [p for p in d.iterdir() if p.is_dir() and p.name not in known and p.name not in with_rows]
    return sorted(out, key=str)


def remove_abandoned(root: Location, known: set[str], with_rows: set[str]) -> list[str]:
    """Delete the trial dirs and stray per-letter files of trials no one will finish; returns their ids."""
    gone = []
    for d in abandoned_trials(root, known, with_rows):
        storage.rmtree(d)
        gone.append(d.name)
    per_letter = root / "results" / "per_letter"
    if per_letter.is_dir():
        for f in per_letter.glob("*.parquet"):
            if f.stem not in with_rows and f.stem not in known:
                f.unlink(missing_ok=True)
                gone.append(f.stem)
    if gone:
        log.info("removed what %d abandoned trial(s) left: %s", len(set(gone)), ", ".join(sorted(set(gone))))
    return sorted(set(gone))
