"""Ray Tune's saved experiment state in ``<exp>/ray/``: read it, keep a whole copy, mend a torn one.

Tune saves its state (``experiment_state-<session>.json`` with every trial's
status, plus the searcher's and callbacks' files) in a staging directory and
then copies it into ``<exp>/ray/`` with ``pyarrow.fs.copy_files``, which
rewrites the files in place. A driver SIGKILLed during that copy leaves a torn
(often empty) state file, and ``Tuner.restore`` cannot read it: the sweep
could not be resumed (seen once in CI, about one kill in a hundred).

``StateSnapshot`` (a Tune callback in the driver) therefore keeps, at most
once a second, one copy of all of those files taken while none of them was
being written, as a single file written to a temporary name and renamed.
``mend`` puts that copy back before a resume when the newest state file does
not parse, and keeps the torn file as ``<name>.torn``. The copy lags Ray's own
state by a second or two, which loses at most what Ray saved in that time (a
trial started then is started again). An object store needs none of this:
one PUT is atomic.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

from ray.tune import Callback

from fcsae import storage
from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path

log = logging.getLogger(__name__)

SNAPSHOT_NAME = ".fcsae-ray-state.json"
"""The copy, inside ``<exp>/ray/`` (so ``--restart`` removes it with the rest of Ray's state)."""
STATE_GLOB = "experiment_state-*.json"
"""Tune's own state file pattern (its ``TuneController.CKPT_FILE_TMPL``)."""
QUIET_S = 0.2
"""A copy is taken only when no file changed in this long (Tune's syncer copies in a background thread)."""


def state_files(ray_dir) -> list:
    """Tune's experiment state files in ``ray_dir``, oldest session first (Tune restores the last one)."""
    return sorted(storage.location(ray_dir).glob(STATE_GLOB), key=str)


def trial_states(ray_dir) -> dict[str, str]:
    """trial_id -> Ray status (TERMINATED, ERROR, RUNNING ...) in the newest saved Tune experiment state."""
    files = state_files(ray_dir)
    if not files:
        return {}
    state = json.loads(files[-1].read_text())
    out = {}
    for trial_json, _meta in state.get("trial_data", []):
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _readable(path: Path) -> bool:
    try:
        return _parses(path.read_bytes())
    except OSError:
        return False


def _top_files(ray_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (mtime_ns, size) of the regular files directly in ``ray_dir`` (the copy itself excluded)."""
    out = {}
    for p in ray_dir.iterdir():
        if p.name.startswith(".") or not p.is_file():  # hidden: the copy and its temporary files
            continue
        st = p.stat()
        out[p.name] = (st.st_mtime_ns, st.st_size)
    return out


def take_snapshot(ray_dir: Path, last: dict | None = None) -> dict | None:
    """Copy the state files into ``SNAPSHOT_NAME`` if they are complete and quiet; returns what was copied.

    ``last``: the stats returned by the previous call (nothing changed since: nothing to do). Returns None
    when no copy was taken (nothing new, a file being written, the newest state torn).
    """
    before = _top_files(ray_dir)
    states = sorted(n for n in before if Path(n).match(STATE_GLOB))
    if not states or before == last:
        return None
    newest_ns = max(ns for ns, _ in before.values())
    if time.time_ns() - newest_ns < QUIET_S * 1e9:
        return None
    data = {name: (ray_dir / name).read_bytes() for name in before}
    if _top_files(ray_dir) != before or not _parses(data[states[-1]]):  # mid-save, or torn
        return None
    blobs = {name: base64.b64encode(raw).decode() for name, raw in data.items()}
    with atomic_path(ray_dir / SNAPSHOT_NAME) as tmp:
        tmp.write_text(json.dumps({"format": "fcsae-ray-state/1", "files": blobs}))
    return before


def mend(ray_dir) -> bool:
    """Before a resume: put the copy back if the newest state file is torn; True if it did.

    FcsaeInputError (one line) when the state is torn and no usable copy exists.
    """
    ray_dir = storage.location(ray_dir)
    if isinstance(ray_dir, storage.RemotePath) or not ray_dir.is_dir():
        return False
    states = state_files(ray_dir)
    if not states or _readable(states[-1]):
        return False
    torn = states[-1]
    try:
        copy = json.loads((ray_dir / SNAPSHOT_NAME).read_text())["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        copy = {}
    if torn.name not in copy and len(states) > 1 and _readable(states[-2]):
        # killed in its first second, before any copy: the session before it saved a whole state
        torn.replace(torn.with_name(torn.name + ".torn"))
        log.warning("%s was torn (the driver was killed while Ray saved it): resuming from the session before "
                    "it (%s); the torn file is kept as %s.torn", torn, states[-2].name, torn.name)
        return True
    if torn.name not in copy:
        raise FcsaeInputError(f"{torn}: Ray's experiment state is torn (the driver was killed while saving it) "
                              "before fcsae's first copy of it; it cannot be resumed: pass --restart to start over "
                              "(that deletes its results too)")
    torn.replace(torn.with_name(torn.name + ".torn"))
    for name, blob in copy.items():
        with atomic_path(ray_dir / name) as tmp:
            tmp.write_bytes(base64.b64decode(blob))
    log.warning("%s was torn (the driver was killed while Ray saved it): restored fcsae's copy of Ray's state; "
                "the torn file is kept as %s.torn", torn, torn.name)
    return True


class StateSnapshot(Callback):
    """Tune callback (driver side): ``take_snapshot`` at most once per ``every_s`` of Tune's event loop."""

    def __init__(self, ray_dir, every_s: float = 1.0):
        loc = storage.location(ray_dir)
        self.ray_dir = None if isinstance(loc, storage.RemotePath) else loc
        self.every_s = every_s
        self._next = 0.0
        self._last: dict | None = None

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if self.ray_dir is None or now < self._next or not self.ray_dir.is_dir():
            return
        self._next = now + self.every_s
        try:
            taken = take_snapshot(self.ray_dir, self._last)
        except OSError as e:  # a missed copy only matters after a kill mid-save; the sweep goes on
            log.debug("no copy of Ray's state this time: %s", e)
            return
        if taken is not None:
            self._last = taken
