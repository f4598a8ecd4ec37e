"""Progress of a sweep: a live rich table while it runs (the final summary is ``fcsae.report.summary``).

``SweepProgress`` is a Ray Tune callback (it runs in the driver). On a
terminal it keeps a rich ``Live`` table (running / done / failed / pruned,
best objective so far, the latest interim metrics of running trials); without
a terminal it logs one line per finished trial instead.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from ray.tune import Callback

from orchestrator.space import SweepSpec

log = logging.getLogger(__name__)


class SweepProgress(Callback):
    """Counts trials by state, tracks the best first objective, renders a live view."""

    def __init__(self, spec: SweepSpec, already_done: dict[str, str], live: bool | None = None):
        self.spec = spec
        self.status: dict[str, str] = dict(already_done)  # trial_id -> running/ok/failed/pruned
        self.latest: dict[str, dict] = {}
        self.params: dict[str, dict] = {}
        self.best: tuple[float, str] | None = None
        self.live_enabled = sys.stdout.isatty() if live is None else live
        self._live = None

    # ---------------------------------------------------------------- counts
    def counts(self) -> dict[str, int]:
        """Number of trials per state (``running``, ``ok``, ``failed``, ``pruned``) plus ``total`` expected."""
        out = {k: 0 for k in ("running", "ok", "failed", "pruned")}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        out["total"] = self.spec.num_samples
        return out

    def _update_best(self, trial_id: str, result: dict) -> None:
        obj = self.spec.objectives[0]
        value = result.get(obj.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        better = self.best is None or (value < self.best[0] if obj.mode == "min" else value > self.best[0])
        if better:
            self.best = (float(value), trial_id)

    # ------------------------------------------------------------- callbacks
    def on_trial_start(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "running"
        self.params[trial.trial_id] = dict(trial.config)
        self._render()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.latest[trial.trial_id] = {k: v for k, v in result.items() if k.startswith("train.")}
        self._render()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = result.get("fcsae_status") or "pruned"
        self.status[trial.trial_id] = status
        self._update_best(trial.trial_id, result)
        self._finished_line(trial.trial_id, status)
        self._render()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "failed"
        self._finished_line(trial.trial_id, "failed")
        self._render()

    def on_experiment_end(self, trials, **info):
        self.stop()

    # ------------------------------------------------------------- rendering
    def _finished_line(self, trial_id: str, status: str) -> None:
        if self.live_enabled:
            return
        c = self.counts()
        best = f"; best {self.spec.objectives[0].metric}={self.best[0]:.4g} ({self.best[1]})" if self.best else ""
        log.info("trial %s %s: %d ok, %d failed, %d pruned, %d running of %d%s", trial_id, status,
                 c["ok"], c["failed"], c["pruned"], c["running"], c["total"], best)

    def table(self):
        """The live view as a rich Table."""
        from rich.table import Table

        c = self.counts()
        best = f"{self.best[0]:.4g} ({self.best[1]})" if self.best else "-"
        t = Table(title=f"sweep {self.spec.name}: {c['ok']} ok, {c['failed']} failed, {c['pruned']} pruned, "
                        f"{c['running']} running of {c['total']}; best {self.spec.objectives[0].metric}: {best}")
        for col in ("trial", "state", *(n for n in self.spec.searched_names), "step", "fvu", "l0"):
            t.add_column(col)
        for tid, state in sorted(self.status.items()):
            if state != "running" and tid not in self.params:
                continue  # finished before this run of the driver: counted, not listed
            p, m = self.params.get(tid, {}), self.latest.get(tid, {})
            t.add_row(tid, state, *(_fmt(p.get(n)) for n in self.spec.searched_names),
                      _fmt(m.get("train.step")), _fmt(m.get("train.fvu")), _fmt(m.get("train.l0")))
        return t

    def _render(self) -> None:
        if not self.live_enabled:
            return
        from rich.live import Live

        if self._live is None:
            self._live = Live(self.table(), refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._live.update(self.table())

    def stop(self) -> None:
        """Stop the live display (idempotent)."""
        if self._live is not None:
            self._live.stop()
            self._live = None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
