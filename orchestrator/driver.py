"""Run or resume a sweep: Ray Tune ``Tuner`` + seeded ``OptunaSearch`` behind a ``ConcurrencyLimiter``.

Order of work: validate (``orchestrator.space``) -> refuse an unusable
experiment dir or cluster address (nothing written yet) -> take the
experiment's lock -> set up or check the experiment directory -> one warning
line when the trials left are not a multiple of ``max_concurrent`` (the last
round leaves slots idle) -> the runner's
``prepare`` once, in a thread of this process (activation cache, eval caches),
while Ray starts or is joined (+ the watchdog that stops a local Ray if this
driver is killed) ->
``Tuner.fit`` (or ``Tuner.restore(...).fit``) -> remove what abandoned trials
left -> count the finished trials from the Parquet rows -> ``ray.shutdown``.

Experiment layout (all absolute; ``root`` may be a pyarrow filesystem URI, see
``fcsae.storage`` and ``orchestrator.experiment``)::

    <exp>/sweep.json       marker: format, sweep id, the space as given, its grid's fields, creation time
    <exp>/.fcsae.lock      the driver's flock (its pid inside)
    <exp>/prepared.json    what the runner's prepare returned (cache path, d_in, norm scale)
    <exp>/results/         one Parquet row per trial (+ per_letter/)
    <exp>/trials/<id>/     SAE, event log, checkpoint of each trial
    <exp>/ray/             Ray Tune's experiment state (searcher and trial states) + fcsae's copy (ray_state)
    <exp>/ray_pids.json    processes of the local Ray cluster this driver started
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from ray.tune.search.optuna import OptunaSearch

import fcsae
from fcsae import storage
from fcsae.errors import FcsaeInputError
from orchestrator import experiment, ray_procs
from orchestrator.ray_state import StateSnapshot, mend as mend_ray_state, trial_states as ray_trial_states
from orchestrator.ray_procs import stop_recorded as stop_recorded_ray
from orchestrator.space import SweepSpec, suggest
from orchestrator.trainable import KEEP_CHECKPOINTS, ExperimentPaths, load_runner, record_missing_row, run_trial
from results_schema import reader

log = logging.getLogger(__name__)

MODES = ("new", "resume", "restart")


class SweepOutcome(NamedTuple):
    """What a driver run ended with (counted from the Parquet rows, not from Ray)."""

    experiment: Path
    sweep_id: str
    counts: dict[str, int]
    """Rows per status (``ok``, ``failed``, ``pruned``) and ``total`` trials the space asks for."""
    complete: bool
    """Every requested trial has a row."""


def default_experiment_dir(spec: SweepSpec, where: str | None = None):
    """``<storage>/<name>`` (storage default ``./experiments``): an absolute Path, or a RemotePath for a URI."""
    return storage.location(where or "experiments") / spec.name


def _comparable_space(raw: dict) -> str:
    """The space without keys that may change on resume (free text, concurrency)."""
    return json.dumps({k: v for k, v in raw.items() if k not in ("description", "max_concurrent")}, sort_keys=True, default=str)


def check_dir(root: Path, mode: str) -> dict | None:
    """Refuse a directory ``mode`` may not use (one line each); returns the experiment's sweep.json, if any.

    Never writes: a foreign or truncated sweep.json, a file in the way, a
    non-empty directory that is no experiment, ``resume`` of a missing one
    (naming the experiments that do exist next to it).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if root.exists() and not root.is_dir():
        raise FcsaeInputError(f"{root}: exists and is not a directory; --experiment-dir must be a directory")
    if ExperimentPaths(root).sweep_file.exists():
        meta = experiment.read_marker(root)
        if mode == "new":
            raise FcsaeInputError(f"{root}: experiment exists; pass --resume to continue it or --restart to start over")
        return meta
    if mode == "resume":
        names = experiment.list_experiments(root.parent)
        raise FcsaeInputError(f"{root}: no experiment to resume; experiments in {root.parent}: "
                              f"{', '.join(names) if names else 'none'}")
    if root.exists() and experiment.foreign_entries(root):
        raise FcsaeInputError(f"{root}: exists, is not empty and holds no sweep.json; choose another --experiment-dir")
    return None


def setup_experiment(spec: SweepSpec, root: Path, mode: str) -> tuple[str, bool]:
    """Create, check or wipe the experiment dir; returns (sweep_id, resuming).

    The caller holds the experiment's lock. An existing experiment needs
    ``mode='resume'`` (the space must be the same) or ``mode='restart'`` (what
    fcsae wrote is deleted first); a directory that is not an fcsae experiment
    is never continued nor deleted.
    """
    meta = check_dir(root, mode)
    experiment.check_writable(root)
    if meta is not None:
        stop_recorded_ray(experiment.control_dir(root))
        if mode == "restart":
            experiment.wipe(root)
        else:
            if _comparable_space(meta["space"]) != _comparable_space(spec.raw):
                raise FcsaeInputError(f"{root}: the search space changed since this experiment began; "
                                      "resume with the same space, or pass --restart (or a new name)")
            return meta["sweep_id"], True
    experiment.prepare_root(root)
    sweep_id = f"{spec.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    storage.write_json(ExperimentPaths(root).sweep_file, {"format": experiment.FORMAT, "sweep_id": sweep_id, "name": spec.name,
                                                  "space": spec.raw, "grid_names": spec.grid_names,
                                                  "fcsae_version": fcsae.__version__,
                                                  "created": dt.datetime.now(dt.timezone.utc).isoformat()})
    return sweep_id, False


# ------------------------------------------------------------------ Ray


def start_ray(address: str | None, num_cpus: int | None, root: Path) -> bool:
    """Join a cluster (``address`` or ``RAY_ADDRESS``) or start a local one; returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    # Trials import the runner by module path: make the driver's working dir importable for them too.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token to manage
    # address="local": a plain ray.init() joins whatever cluster `ray start` (or ray.cluster_utils) last
    # advertised in /tmp/ray/ray_current_cluster, even a dead one: never someone else's cluster by accident.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False)
    ray_procs.record(experiment.control_dir(root))
    return True


def check_address(address: str | None) -> None:
    """Refuse, within seconds and before anything is written, a cluster address nothing listens on.

    ``ray.init`` would otherwise retry for minutes. ``auto`` and ``ray://`` client addresses are left to Ray.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FcsaeInputError(f"--address: expected HOST:PORT (or auto, or ray://HOST:PORT), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise FcsaeInputError(f"--address: no Ray cluster answers at {address} ({e.strerror or e}); "
                              "start one with `ray start --head` or check the address") from None


def check_cluster_resources(spec: SweepSpec) -> None:
    """Refuse per-trial resources the (joined) cluster cannot give, before any trial starts."""
    import ray

    have = ray.cluster_resources()
    problems = []
    if spec.resources.cpu > have.get("CPU", 0):
        problems.append(f"resources.cpu: {spec.resources.cpu} per trial but the cluster has {have.get('CPU', 0)} CPUs")
    if spec.resources.gpu > have.get("GPU", 0):
        problems.append(f"resources.gpu: {spec.resources.gpu} per trial but the cluster has {have.get('GPU', 0)} GPUs")
    if problems:
        raise FcsaeInputError("; ".join(problems))


# ------------------------------------------------------------------ Tune pieces


class _RowKeeper:
    """Tune callback: a trial that ended without writing its row (killed worker, scheduler stop) gets one here."""

    def __init__(self, spec: SweepSpec, root: Path, sweep_id: str):
        self.spec, self.root, self.sweep_id = spec, str(root), sweep_id

    def _record(self, trial, status: str, reason: str, detail: str | None = None) -> None:
        try:
            written = record_missing_row(self.spec, self.root, self.sweep_id, trial.trial_id, dict(trial.config),
                                         status, reason, trial.last_result, detail=detail)
        except OSError as e:  # results unwritable: the sweep goes on, the trial stays rowless and runs on resume
            log.error("trial %s: could not write its %s row (%s); it will run again on --resume", trial.trial_id,
                      status, e)
            return
        if written:
            log.warning("trial %s recorded as %s: %s", trial.trial_id, status, reason)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "pruned", "stopped early by the ASHA scheduler")
        self._drop_checkpoints(trial)

    def _drop_checkpoints(self, trial) -> None:
        """On object storage a checkpoint is a copy of the trial's working dir: drop them once the row is in.

        (A resume that still names one then fails to restore that trial, which has its row: nothing is lost.)
        Local checkpoints are small markers and stay.
        """
        root = storage.location(self.root)
        if isinstance(root, storage.RemotePath):
            for ckpt in (ExperimentPaths(root).ray / trial.trial_id).glob("checkpoint_*"):
                storage.rmtree(ckpt)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "failed", *_error_text(trial))


def _error_text(trial) -> tuple[str, str | None]:
    """(one-line reason, full text) of Tune's record of a trial's error."""
    texts = []
    try:
        err = trial.get_error()
        texts.append(str(err) if err else "")
        if trial.error_file and Path(trial.error_file).exists():
            texts.append(Path(trial.error_file).read_text())
    except Exception:  # the reason is best effort; the row must be written regardless
        log.debug("no error details for %s", trial.trial_id, exc_info=True)
    full = "\n".join(t for t in texts if t.strip()) or None
    for text in texts:
        lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
        if lines:
            return one_line(lines[-1]), full
    return "trial errored (worker died or was killed)", full


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(text: str, limit: int = 160) -> str:
    """The leading sentences of ``text`` that fit in ``limit`` characters (at least the first, cut)."""
    out = ""
    for sentence in re.split(r"(?<=\.)\s+", " ".join(text.split())):
        if out and len(out) + 1 + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _tune_callback(obj):
    """Wrap a plain object with on_trial_* methods as a Tune Callback."""
    from ray.tune import Callback

    class _Wrapped(Callback):
        def on_trial_complete(self, *a, **k):
            obj.on_trial_complete(*a, **k)

        def on_trial_error(self, *a, **k):
            obj.on_trial_error(*a, **k)

    return _Wrapped()


class FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that skips interim results lacking the objective (ours carry only training metrics)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(m in result for m in metrics):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # A trial that recorded a failed row ends normally (so Ray does not retry it) but is a failure to Optuna.
        failed = error or (result or {}).get("fcsae_status") == "failed"
        super().on_trial_complete(trial_id, result, error=failed)


def _searcher(spec: SweepSpec):
    import optuna
    from ray.tune.search import ConcurrencyLimiter


    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    single = len(metrics) == 1
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = FinalOnlyOptunaSearch(space=functools.partial(suggest, spec=spec), metric=metrics[0] if single else metrics,
                          mode=modes[0] if single else modes, sampler=sampler, seed=spec.seed)
    return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent)


def _scheduler(spec: SweepSpec):
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.space import section_configs

    trainer = section_configs(spec.fixed)["trainer"]
    max_t = max(1, trainer.total_steps // trainer.log_every + 1)  # interim reports per trial (upper bound)
    s = spec.scheduler
    return ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=max_t,
                         grace_period=min(s.grace_period, max_t), reduction_factor=s.reduction_factor)


def _trainable(spec: SweepSpec, shared: dict, root: Path, sweep_id: str, fail_fast: bool):
    from ray import tune

    fn = tune.with_parameters(run_trial, spec=spec, shared=shared, root=str(root), sweep_id=sweep_id,
                              raise_failed=fail_fast)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _resume_config(paths: ExperimentPaths):
    """Resume unfinished and errored trials; also finished ones when some lack a row (deleted or never written).

    Ray never re-runs a trial it saved as TERMINATED; a trial without a row must run again (``run_trial`` makes
    the re-scheduled trials that do have a row a no-op).
    """
    from ray.tune import ResumeConfig

    rows = set(reader.finished_trials(paths.results))
    rowless = [t for t, status in ray_trial_states(paths.ray).items() if status == "TERMINATED" and t not in rows]
    if rowless:
        log.info("re-running %d finished trial(s) whose row is missing: %s", len(rowless), ", ".join(sorted(rowless)))
    resume = ResumeConfig.ResumeType.RESUME
    return ResumeConfig(finished=resume if rowless else ResumeConfig.ResumeType.SKIP, unfinished=resume,
                        errored=resume)


def _ray_storage(ray_dir) -> tuple[str, object]:
    """Ray Tune's (path, pyarrow filesystem) for the experiment's ``ray/`` dir (filesystem None when local)."""
    if isinstance(ray_dir, storage.RemotePath):
        return ray_dir.path, ray_dir.fs
    return str(ray_dir), None


def build_tuner(spec: SweepSpec, root: Path, sweep_id: str, shared: dict, resuming: bool, fail_fast: bool,
                max_failures: int, callbacks: list):
    """A new ``Tuner``, or ``Tuner.restore`` of the experiment's Ray state when resuming.

    ``max_failures``: times Ray retries a trial whose worker or node died, from its last checkpoint (a trial
    that fails by itself records a ``failed`` row and is not retried).
    """
    from ray import tune

    from orchestrator.live_callbacks import LiveCallbacks, set_live

    paths = ExperimentPaths(root)
    trainable = _trainable(spec, shared, root, sweep_id, fail_fast)
    set_live(callbacks)  # a restored tuner's unpickled LiveCallbacks forward to these too
    # Read by Tune in this (driver) process: interim reports carry no objective yet, only the final one does.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Checkpoints are never deleted by Ray (num_to_keep=None): Ray deletes an old checkpoint when it registers a
    # new one, before it saves the experiment state that names the new one, so a SIGKILL in between left a state
    # naming a deleted checkpoint and the trial failed on resume ("does not exist on storage anymore"). Instead
    # the state is saved at least every second, so it names a recent checkpoint and knows every started trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Our own live view replaces Tune's; the legacy output path honours verbose=0 completely.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray_path, ray_fs = _ray_storage(paths.ray)
    if resuming:
        mend_ray_state(paths.ray)
    if resuming and tune.Tuner.can_restore(ray_path, storage_filesystem=ray_fs):
        log.info("restoring Ray Tune state from %s", paths.ray)
        return tune.Tuner.restore(ray_path, trainable=trainable, _resume_config=_resume_config(paths),
                                  storage_filesystem=ray_fs)
    if resuming and reader.trial_files(paths.results):
        raise FcsaeInputError(f"{root}: results exist but Ray's experiment state is missing; pass --restart")
    tune_cfg = tune.TuneConfig(search_alg=_searcher(spec), scheduler=_scheduler(spec), num_samples=spec.num_samples,
                               reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id)
    run_cfg = tune.RunConfig(
        name=paths.ray.name, storage_path=str(Path(ray_path).parent), storage_filesystem=ray_fs,
        callbacks=[LiveCallbacks()], verbose=0,
        failure_config=tune.FailureConfig(max_failures=0 if fail_fast else max_failures, fail_fast=fail_fast),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    return tune.Tuner(trainable, tune_config=tune_cfg, run_config=run_cfg)


def prepare_shared(spec: SweepSpec, root: Path) -> dict:
    """The runner's ``prepare`` (cache harvest, eval caches), once, in the driver; saved to prepared.json."""
    shared = load_runner(spec.runner).prepare(spec)
    storage.write_json(root / "prepared.json", shared)
    return shared


def idle_tail(n_trials: int, concurrency: int) -> str | None:
    """One line saying how much slot time the last round of equal-length trials leaves idle, or None when none."""
    if n_trials <= 0 or n_trials % concurrency == 0:
        return None
    rounds = -(-n_trials // concurrency)
    idle = rounds * concurrency - n_trials
    return (f"{n_trials} trials at max_concurrent {concurrency}: the last round runs {n_trials % concurrency} "
            f"with {idle} slot(s) idle, ~{idle / (rounds * concurrency):.0%} of the slot time for equal-length "
            f"trials; num_samples a multiple of {concurrency} uses every slot")


def count_rows(root: Path, num_samples: int) -> dict[str, int]:
    """Rows per status in the experiment's results, and the ``total`` trials asked for."""
    done = reader.finished_trials(ExperimentPaths(root).results)
    counts = {s: 0 for s in ("ok", "failed", "pruned")}
    for status in done.values():
        counts[status] = counts.get(status, 0) + 1
    counts["total"] = num_samples
    return counts


def run_sweep(spec: SweepSpec, root: Path, mode: str = "new", address: str | None = None, num_cpus: int | None = None,
              fail_fast: bool = False, live: bool | None = None, max_failures: int = 2,
              keep_checkpoints: bool = False) -> SweepOutcome:
    """Run (or resume) the sweep ``spec`` in experiment dir ``root``; returns the counts from the result rows.

    The experiment's lock is taken before any other work and held until the end.
    """
    root = storage.location(root)
    check_address(address)
    check_dir(root, mode)  # read-only, before the lock file is created
    created = not root.exists()
    experiment.prepare_root(root)
    with experiment.ExperimentLock(root) as lock:
        sweep_id, resuming = setup_experiment(spec, root, mode)
        before = count_rows(root, spec.num_samples)
        n_before = sum(before[s] for s in ("ok", "failed", "pruned"))
        if resuming and n_before >= spec.num_samples:  # a rerun of a finished sweep (make demo twice): no Ray
            log.info("%s is complete (%d of %d trials have rows): nothing to run", root, n_before, spec.num_samples)
            return SweepOutcome(root, sweep_id, before, True)
        tail = idle_tail(spec.num_samples - n_before, spec.max_concurrent)
        if tail:
            log.warning(tail)
        def prepare():
            return {**prepare_shared(spec, root), KEEP_CHECKPOINTS: keep_checkpoints}

        try:
            _fit(spec, root, sweep_id, prepare, resuming, address, num_cpus, fail_fast, live, max_failures, lock)
        except PrepareFailed as e:
            if not resuming:  # a new experiment that could not even prepare: leave nothing behind
                experiment.wipe(root)
                if created:
                    storage.rmtree(root)
                    storage.rmtree(experiment.control_dir(root))
            raise e.error from None
    counts = count_rows(root, spec.num_samples)
    n_rows = counts["ok"] + counts["failed"] + counts["pruned"]
    return SweepOutcome(root, sweep_id, counts, n_rows >= spec.num_samples)


def _fit(spec, root, sweep_id, prepare, resuming, address, num_cpus, fail_fast, live, max_failures, lock) -> None:
    """Prepare while Ray starts, run the Tuner, then remove what abandoned trials left; Ray is stopped whatever happens."""
    import ray

    from orchestrator.progress import SweepProgress

    paths = ExperimentPaths(root)
    before = reader.finished_trials(paths.results)
    if resuming:
        log.info("resuming %s: %d of %d trials already have rows", root, len(before), spec.num_samples)
    control = experiment.control_dir(root)
    # The watchdog starts before ray.init: a driver killed in the middle of it must not leak a half-started Ray.
    local = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    watchdog = ray_procs.Watchdog(control, lock.fileno()) if local else None
    progress = None
    try:
        shared = prepare_while_ray_starts(prepare, address, num_cpus, root)
        progress = SweepProgress(spec, before, live=live)
        check_cluster_resources(spec)
        tuner = build_tuner(spec, root, sweep_id, shared, resuming, fail_fast, max_failures,
                            callbacks=[_tune_callback(_RowKeeper(spec, root, sweep_id)), progress,
                                       StateSnapshot(paths.ray)])
        tuner.fit()
        rows = set(reader.finished_trials(paths.results))
        experiment.remove_abandoned(root, known=set(ray_trial_states(paths.ray)), with_rows=rows)
    finally:
        if progress is not None:
            progress.stop()
        if watchdog is not None:
            watchdog.done()
        if local and ray.is_initialized():  # the local Ray this driver started (also if prepare failed)
            ray.shutdown()
            (control / ray_procs.PIDS_FILE).unlink(missing_ok=True)


class _RayAdvice(logging.Filter):
    """Drops Ray Tune's lines that tell an fcsae user the wrong thing: ``Tuner.restore(...)`` as the way to resume
    (the driver prints its own ``--resume`` command) and metrics it could not fetch for trials that had not
    reported yet (the driver counts trials from their rows, not from Tune's analysis)."""

    DROP = ("Experiment has been interrupted", "Failed to fetch metrics for")
    LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.DROP)


_RAY_ADVICE = _RayAdvice()
for _name in _RayAdvice.LOGGERS:
    logging.getLogger(_name).addFilter(_RAY_ADVICE)


class PrepareFailed(Exception):
    """The runner's ``prepare`` refused its input (``error``, an FcsaeInputError); Ray has been stopped."""

    def __init__(self, error: FcsaeInputError):
        super().__init__(str(error))
        self.error = error


def prepare_while_ray_starts(prepare, address, num_cpus, root) -> dict:
    """``prepare()`` in a thread while Ray starts (or is joined) here; returns what prepare returned.

    Ray's start (9-25 s on 2 cores) and prepare (loading the model, harvesting on a cold cache) do not depend
    on each other. ``ray.init`` stays in the main thread, where it installs its SIGTERM handler; the thread
    is a daemon, so a Ctrl-C here does not wait for a harvest (which writes to temporary names). Raises
    ``PrepareFailed`` for an FcsaeInputError from prepare, anything else prepare raised as it is.
    """
    box: dict = {}

    def work():
        t0 = time.perf_counter()
        try:
            box["shared"] = prepare()
        except BaseException as e:  # handed to the main thread
            box["error"] = e
        box["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=work, name="fcsae-prepare", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    start_ray(address, num_cpus, root)
    ray_s = time.perf_counter() - t0
    while thread.is_alive():
        thread.join(0.2)  # a timed join: Ctrl-C still reaches this thread
    if "error" in box:
        if isinstance(box["error"], FcsaeInputError):
            raise PrepareFailed(box["error"])
        raise box["error"]
    log.info("prepare %.1f s and Ray's start %.1f s ran together: %.1f s in all", box["seconds"], ray_s,
             time.perf_counter() - t0)
    return box["shared"]


def resume_command(space_path: str, root: Path) -> str:
    """The command that continues this experiment."""
    return f"{Path(sys.argv[0]).name or 'fcsae-sweep'} --space {space_path} --experiment-dir {root} --resume"
