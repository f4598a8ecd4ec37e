"""Synthetic sweep results for the report, query and analysis tests, written through results_schema's writer.

Metrics are a known function of the parameters plus seeded noise, so tests
can check that the report and the queries find what was planted (e.g. the
``fc`` criterion lowers absorption by ``FC_EFFECT``).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl

from results_schema.store import write_trial

CRITERIA = ("none", "dead", "fc")
FC_EFFECT = 0.05
"""Absorption reduction planted for the ``fc`` criterion."""
LETTERS = ("a", "b", "c", "d")
SEARCHED = ["split.criterion", "tracker.ema_alpha", "sae.dict_size", "trainer.seed"]


def trial_row(i: int, criterion: str, seed: int, rng: np.random.Generator, exp: Path, status: str = "ok") -> dict:
    """One trial's row: absorption falls with dict_size and for fc; EV rises with dict_size."""
    dict_size = int(rng.choice([512, 1024, 2048, 4096]))
    alpha = float(rng.uniform(0.9, 0.999))
    absorption = 0.3 - 0.02 * np.log2(dict_size / 512) - (FC_EFFECT if criterion == "fc" else 0.0) + rng.normal(0, 0.005)
    ev = 0.7 + 0.03 * np.log2(dict_size / 512) + rng.normal(0, 0.005)
    tid = f"t{i:03d}"
    row = {
        "sweep_id": "synthetic-1", "sweep_name": "synthetic", "trial_id": tid, "status": status,
        "searched_params": SEARCHED, "split.criterion": criterion, "trainer.seed": seed, "tracker.ema_alpha": alpha,
        "sae.dict_size": dict_size, "sae.k": 32, "trainer.batch_size": 256, "tokens_trained": 256 * 40,
        "trial_dir": str(exp / "trials" / tid), "finished_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=i),
    }
    if status != "ok":
        row["failure_reason"] = "FloatingPointError: loss diverged at step 7"
        return row
    n_split = 6 if criterion == "fc" else 0
    n_res = 3 if criterion == "dead" else 0
    row.update({
        "objective": absorption, "absorption.mean_absorption_fraction": absorption,
        "absorption.mean_full_absorption": absorption / 3, "core.explained_variance": ev,
        "core.l0": 32.0 - abs(rng.normal(0, 0.3)), "core.mse": 1 - ev, "n_split_events": n_split, "n_resample_events": n_res,
        "events_path": str(exp / "trials" / tid / "events.jsonl"), "sae_path": str(exp / "trials" / tid / "sae"),
    })
    return row


def letters_frame(absorption: float, rng: np.random.Generator) -> pl.DataFrame:
    """Per-letter rows around the trial's absorption."""
    vals = [max(0.0, absorption + rng.normal(0, 0.02)) for _ in LETTERS]
    return pl.DataFrame({
        "letter": list(LETTERS), "probe_f1": [0.9, 0.85, 0.8, 0.75], "sparse_f1_k1": [0.5] * 4, "sparse_f1_main": [0.7] * 4,
        "num_split_features": [1, 2, 1, 1], "main_latents": [[3], [5, 9], [11], [20]], "num_probe_true_positives": [40, 30, 20, 10],
        "mean_absorption_fraction": vals, "full_absorption_rate": [v / 3 for v in vals], "num_full_absorption": [1, 1, 0, 0],
    })


def write_events(row: dict) -> None:
    """An events.jsonl for the trial, with as many events as its counts say, spread over training."""
    d = Path(row["trial_dir"])
    d.mkdir(parents=True, exist_ok=True)
    events = [{"step": 5 * (j + 1), "kind": "split", "latent": j, "partner": 100 + j, "score": 0.1, "group_sizes": [10, 12]}
              for j in range(row.get("n_split_events") or 0)]
    events += [{"step": 7 * (j + 1), "kind": "resample", "latent": j, "partner": None, "score": None, "group_sizes": None}
               for j in range(row.get("n_resample_events") or 0)]
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def write_sweep(exp: Path, seeds=(0, 1, 2), per_cell: int = 1, n_failed: int = 1, events: bool = True,
                num_samples: int | None = None, seed: int = 0) -> Path:
    """A finished synthetic experiment dir (sweep.json, results/, trials/); returns the results dir."""
    rng = np.random.default_rng(seed)
    exp.mkdir(parents=True, exist_ok=True)
    results = exp / "results"
    i = 0
    for crit in CRITERIA:
        for s in seeds:
            for _ in range(per_cell):
                row = trial_row(i, crit, s, rng, exp)
                write_trial(results, row, letters_frame(row["absorption.mean_absorption_fraction"], rng))
                if events:
                    write_events(row)
                i += 1
    for _ in range(n_failed):
        write_trial(results, trial_row(i, "fc", 0, rng, exp, status="failed"))
        i += 1
    total = num_samples if num_samples is not None else i
    space = {"name": "synthetic", "num_samples": total,
             "objectives": [{"metric": "absorption.mean_absorption_fraction", "mode": "min"},
                            {"metric": "core.explained_variance", "mode": "max"}]}
    (exp / "sweep.json").write_text(json.dumps({"sweep_id": "synthetic-1", "name": "synthetic", "space": space}))
    return results
