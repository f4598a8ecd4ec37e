"""One Ray Tune trial: params -> runner (train + evals) -> one result row -> final report.

The trial's work is done by a *runner* module (``spec.runner``; the real one is
``orchestrator.fcsae_runner``) with two functions:

- ``prepare(spec) -> dict``: runs once in the driver before any trial (harvest
  the activation cache, warm the eval caches); returns JSON-able shared info.
- ``run(ctx: TrialContext) -> TrialOutcome``: trains and evaluates one trial,
  calling ``ctx.report`` with interim metrics; must resume from
  ``ctx.trial_dir`` when a checkpoint is there.

This module wraps a runner for Tune: it writes the trial's row *before* the
final ``tune.report`` (code after the last report may never run under a
scheduler), turns exceptions into ``failed`` rows, and makes a re-run of a
trial that already has a row a no-op (so a resumed sweep never runs a finished
trial twice nor duplicates its row).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import math
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

import polars as pl

import fcsae
from fcsae import storage
from orchestrator.space import SweepSpec, section_configs
from results_schema import reader, store
from results_schema.schema import TRIAL_SCHEMA

log = logging.getLogger(__name__)


KEEP_CHECKPOINTS = "keep_checkpoints"
"""Key of the shared dict: true keeps each finished trial's training checkpoint (``fcsae-sweep --keep-checkpoints``)."""


class ExperimentPaths(NamedTuple):
    """Absolute locations of one experiment's parts (a local ``Path`` or an ``fcsae.storage.RemotePath``)."""

    root: "Path | storage.RemotePath"

    @property
    def remote(self) -> bool:
        """True when the experiment lives on an object store (trials then work in a node-local scratch dir)."""
        return isinstance(self.root, storage.RemotePath)

    def work_dir(self, trial_id: str) -> Path:
        """Where a trial runs: ``trials/<id>``, or this node's scratch dir when the experiment is remote."""
        return (storage.local_cache(self.root, "scratch") if self.remote else self.root / "trials") / trial_id

    @property
    def results(self) -> Path:
        """One Parquet row per trial (``results_schema.store`` layout)."""
        return self.root / "results"

    @property
    def trials(self) -> Path:
        """Per-trial artefacts: ``trials/<trial_id>/``."""
        return self.root / "trials"

    @property
    def ray(self) -> Path:
        """Ray Tune's experiment state (``storage_path=root``, ``name='ray'``)."""
        return self.root / "ray"

    @property
    def sweep_file(self) -> Path:
        """sweep.json: sweep id, space and creation time."""
        return self.root / "sweep.json"


class TrialContext(NamedTuple):
    """Everything a runner's ``run`` gets."""

    spec: SweepSpec
    shared: dict[str, Any]
    trial_id: str
    params: dict[str, Any]
    trial_dir: Path
    report: Callable[[dict[str, float], bool], None]
    """``report(metrics, checkpoint)``: interim training metrics (keys without prefix); checkpoint=True after the
    runner saved a resumable checkpoint in ``trial_dir``."""


class TrialOutcome(NamedTuple):
    """What a runner's ``run`` returns."""

    metrics: dict[str, float]
    """Eval metrics by column name (``core.<name>``, ``absorption.<name>``)."""
    per_letter: pl.DataFrame | None
    configs: dict[str, Any]
    """Section -> the config dataclass actually used (fills the ``section.field`` columns)."""
    tokens_trained: int
    train_seconds: float
    eval_seconds: float
    n_split_events: int
    n_resample_events: int
    final_loss: float | None = None
    sae_path: str | None = None
    events_path: str | None = None


class TrialFailed(RuntimeError):
    """With ``--fail-fast``: raised after a failed trial's row is written, so Tune stops the sweep."""


def load_runner(name: str):
    """Import a runner module (has ``prepare`` and ``run``)."""
    return importlib.import_module(name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def config_row(configs: dict[str, Any]) -> dict[str, Any]:
    """``section.field`` -> value for every scalar config field that has a column."""
    names = set(TRIAL_SCHEMA.names)
    row = {}
    for section, cfg in configs.items():
        for key, value in vars(cfg).items():
            col = f"{section}.{key}"
            if col in names:
                row[col] = value
    return row


def base_row(spec: SweepSpec, sweep_id: str, trial_id: str, params: dict, trial_dir: Path, started: dt.datetime) -> dict:
    """The bookkeeping and config columns every row has, whatever the outcome."""
    row = {"fcsae_version": fcsae.__version__, "sweep_id": sweep_id, "sweep_name": spec.name, "trial_id": trial_id,
           "searched_params": spec.searched_names, "trial_dir": str(trial_dir), "hostname": socket.gethostname(),
           "started_at": started, "finished_at": _now()}
    try:  # configs as the trial would have built them (d_in unknown here: keep the cache's if given)
        row.update(config_row(section_configs(spec.fixed, params, d_in=1)))
        row.pop("sae.d_in", None)
    except Exception:  # a failed trial's row must still be written
        log.debug("could not rebuild configs for %s", trial_id, exc_info=True)
    return row


def _cast(value: Any, pa_type) -> Any:
    """A metric value as its column's Python type (floats for float64, as before; absorption's typed columns)."""
    import pyarrow as pa

    if value is None:
        return None
    for test, cast in ((pa.types.is_boolean, bool), (pa.types.is_integer, int), (pa.types.is_string, str)):
        if test(pa_type):
            return cast(value)
    return float(value)


def outcome_row(spec: SweepSpec, outcome: TrialOutcome) -> dict[str, Any]:
    """Columns filled from a successful runner outcome; unknown metrics go to ``extra_metrics_json``."""
    names = set(TRIAL_SCHEMA.names)
    row = config_row(outcome.configs)
    extra = {}
    for key, value in outcome.metrics.items():
        if key in names:
            row[key] = _cast(value, TRIAL_SCHEMA.field(key).type)
        else:
            extra[key] = value
    obj = spec.objectives[0].metric
    row.update(status="ok", objective=row.get(obj), tokens_trained=int(outcome.tokens_trained),
               train_seconds=float(outcome.train_seconds), eval_seconds=float(outcome.eval_seconds),
               n_split_events=int(outcome.n_split_events), n_resample_events=int(outcome.n_resample_events),
               final_loss=outcome.final_loss, sae_path=outcome.sae_path, events_path=outcome.events_path,
               extra_metrics_json=json.dumps(extra, sort_keys=True, default=float) if extra else None)
    return row


def final_report(row: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """The last metrics sent to Tune: the objectives (Optuna reads them) and the status."""
    out = {"fcsae_status": row["status"]}
    for o in spec.objectives:
        value = row.get(o.metric)
        if value is not None and math.isfinite(value):
            out[o.metric] = value
    return out


DETAIL_CHARS = 20_000
"""Longest ``failure_detail`` kept (the end of a traceback is the informative part)."""


def failure_reason(exc: BaseException) -> str:
    """One line naming the exception type and its first message line."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()[:500]


def failure_detail(exc: BaseException) -> str:
    """The exception's full traceback (its last ``DETAIL_CHARS`` characters)."""
    return "".join(traceback.format_exception(exc))[-DETAIL_CHARS:]


_MARKER = "fcsae_checkpoint.json"


def _reporter(tune, trial_dir: Path, pack: bool) -> Callable[[dict[str, float], bool], None]:
    """Interim reports to Tune with checkpoints.

    Local storage: a checkpoint is a small marker, the real state lives in ``trial_dir`` (every node sees it).
    Remote storage (``pack``): the checkpoint carries a copy of ``trial_dir``, so Ray stores it next to its own
    state and a retry on another node starts from it (``_unpack``).
    """
    def report(metrics: dict[str, float], checkpoint: bool = False) -> None:
        out = {f"train.{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if not checkpoint:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if pack:
                shutil.copytree(trial_dir, tmp, dirs_exist_ok=True)
            (Path(tmp) / _MARKER).write_text(json.dumps({"trial_dir": str(trial_dir), **out}))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(tmp))
    return report


def _unpack(tune, trial_dir: Path) -> None:
    """Remote storage: a trial starting on a node without its working dir gets it from its last Tune checkpoint."""
    ckpt = tune.get_checkpoint()
    if ckpt is None or (trial_dir.is_dir() and any(trial_dir.iterdir())):
        return
    ckpt.to_directory(str(trial_dir))
    (trial_dir / _MARKER).unlink(missing_ok=True)
    log.info("trial %s: working dir restored from its last checkpoint", trial_dir.name)


def _publish(trial_dir: Path, dest, row: dict[str, Any]) -> None:
    """Remote storage: upload the trial's outputs (not its checkpoint) and point the row's paths at them."""
    outputs = [p for p in trial_dir.iterdir() if p.name != "checkpoint"]
    with tempfile.TemporaryDirectory() as tmp:
        for p in outputs:
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, Path(tmp) / p.name)
        storage.upload_dir(Path(tmp), dest)
    row["trial_dir"] = str(dest)
    for key in ("sae_path", "events_path"):
        if row.get(key) and Path(row[key]).is_relative_to(trial_dir):
            row[key] = str(dest / str(Path(row[key]).relative_to(trial_dir)))


def run_trial(config: dict[str, Any], spec: SweepSpec, shared: dict[str, Any], root: str, sweep_id: str,
              raise_failed: bool = False) -> None:
    """The Tune function trainable: run one trial and write its row, then report the objectives.

    A trial that fails records a ``failed`` row and ends normally with ``fcsae_status='failed'`` (Ray retries
    only trials whose worker died); ``raise_failed`` (``--fail-fast``) raises instead, so Tune stops the sweep.
    """
    from ray import tune

    paths = ExperimentPaths(storage.location(root))
    trial_id = tune.get_context().get_trial_id()
    params = dict(config)
    existing = reader.read_trial(paths.results, trial_id)
    if existing is not None:
        # Finished before an interruption: never train it twice; tell Tune the recorded outcome.
        log.info("trial %s already has a %s row; not re-running", trial_id, existing["status"])
        _end(tune, final_report(existing, spec), raise_failed, existing.get("failure_reason"))
        return
    trial_dir = paths.work_dir(trial_id)
    if paths.remote:
        _unpack(tune, trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True, default=str))
    started = _now()
    row = base_row(spec, sweep_id, trial_id, params, trial_dir, started)
    ctx = TrialContext(spec, shared, trial_id, params, trial_dir, _reporter(tune, trial_dir, pack=paths.remote))
    per_letter = None
    try:
        outcome = load_runner(spec.runner).run(ctx)
        row.update(outcome_row(spec, outcome))
        per_letter = outcome.per_letter
    except Exception as e:  # failure isolation: record and let the sweep go on
        log.exception("trial %s failed", trial_id)
        row.update(status="failed", failure_reason=failure_reason(e), failure_detail=failure_detail(e))
    if paths.remote:
        _publish(trial_dir, paths.trials / trial_id, row)
    row["finished_at"] = _now()
    store.write_trial(paths.results, row, per_letter=per_letter)
    if paths.remote:
        shutil.rmtree(trial_dir, ignore_errors=True)  # its outputs are uploaded; its checkpoint is Ray's
    elif row.get("status") == "ok" and not shared.get(KEEP_CHECKPOINTS):
        from fcsae.trainer import remove_checkpoint

        # The row is written, so the trial never trains again: its resume state is dead weight (most of the disk).
        freed = remove_checkpoint(trial_dir)
        if freed:
            log.info("trial %s: removed its training checkpoint (%.1f MB); the SAE stays", trial_id, freed / 1e6)
    _end(tune, final_report(row, spec), raise_failed, row.get("failure_reason"))


def _end(tune, report: dict[str, Any], raise_failed: bool, reason: str | None) -> None:
    if report["fcsae_status"] == "failed" and raise_failed:
        raise TrialFailed(reason or "trial failed")
    tune.report(report)


def record_missing_row(spec: SweepSpec, root: str, sweep_id: str, trial_id: str, params: dict, status: str, reason: str,
                       last_result: dict | None = None, detail: str | None = None) -> bool:
    """Driver side: write a ``failed``/``pruned`` row for a trial that ended without writing one (killed, stopped).

    Returns True if a row was written (False when the trial already has one).
    """
    paths = ExperimentPaths(storage.location(root))
    if reader.read_trial(paths.results, trial_id) is not None:
        return False
    row = base_row(spec, sweep_id, trial_id, params, paths.trials / trial_id, _now())
    row.update(status=status, failure_reason=reason[:500], failure_detail=detail[:DETAIL_CHARS] if detail else None)
    if last_result:
        loss = last_result.get("train.loss")
        row["final_loss"] = float(loss) if isinstance(loss, (int, float)) else None
    store.write_trial(paths.results, row)
    return True


def now_seconds() -> float:
    """Monotonic seconds (runners time their phases with this)."""
    return time.perf_counter()
