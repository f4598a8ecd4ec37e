"""What ``fcsae eval`` needs around the evals: which model/layer/scale an SAE belongs to, one report, a table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from fcsae.config import EvalConfig, LMConfig
from fcsae.errors import FcsaeInputError

log = logging.getLogger(__name__)


class EvalTarget(NamedTuple):
    """Where a saved SAE's inputs came from."""

    model: str
    layer: int
    norm_scale: float
    context_len: int | None
    """The harvest's context length when known (the core eval packs its tokens the same way)."""


def _from_cache(cache: str | Path) -> dict[str, Any]:
    from fcsae.activations import ActivationCache

    c = ActivationCache(cache)
    m = c.manifest
    return {"model": m.get("model"), "layer": m.get("layer"), "norm_scale": c.norm_scale,
            "context_len": m.get("context_len")}


def _from_sae_dir(sae_dir: Path) -> dict[str, Any]:
    """Model/layer/norm_scale recorded next to the SAE: ``train.json`` (fcsae train) or SAELens-style cfg.json keys."""
    found: dict[str, Any] = {}
    cfg = sae_dir / "cfg.json"
    try:
        raw = json.loads(cfg.read_text())
        found.update({k: raw[s] for k, s in (("model", "model_name"), ("layer", "hook_layer"),
                                              ("norm_scale", "norm_scale")) if raw.get(s) is not None})
    except (OSError, ValueError):
        pass
    for train_json in (sae_dir / "train.json", sae_dir.parent / "train.json"):
        if train_json.is_file():
            try:
                info = json.loads(train_json.read_text())
            except ValueError as e:
                raise FcsaeInputError(f"{train_json}: not valid JSON ({e})") from None
            if info.get("cache") and Path(info["cache"]).is_dir():
                found.update(_from_cache(info["cache"]))
            if info.get("norm_scale") is not None:
                found["norm_scale"] = info["norm_scale"]
            break
    return found


def resolve_target(sae_dir: str | Path, cache=None, model=None, layer=None, norm_scale=None) -> EvalTarget:
    """Model, layer and norm_scale of a saved SAE: flags win over ``cache``, which wins over what the directory records."""
    found = _from_sae_dir(Path(sae_dir))
    if cache is not None:
        if not Path(cache).is_dir():
            raise FcsaeInputError(f"--cache: no such activation cache directory {str(cache)!r}")
        found.update(_from_cache(cache))
    found.update({k: v for k, v in (("model", model), ("layer", layer), ("norm_scale", norm_scale)) if v is not None})
    missing = [k for k in ("model", "layer", "norm_scale") if found.get(k) is None]
    if missing:
        raise FcsaeInputError(f"{sae_dir}: cannot tell the SAE's {', '.join(missing)}; pass --cache DIR (its activation "
                              f"cache) or --model/--layer/--norm-scale")
    return EvalTarget(str(found["model"]), int(found["layer"]), float(found["norm_scale"]), found.get("context_len"))


def eval_report(sae, lm_cfg: LMConfig, eval_cfg: EvalConfig, norm_scale: float, core: bool = True,
                absorption: bool = True, lm=None, strict: bool = False) -> dict[str, Any]:
    """Run the chosen evals; a JSON-ready dict with ``core``, ``absorption`` (summary + per-letter rows), timings.

    ``strict``: a model/layer SAEBench would refuse (too few letters pass the probe) raises ``AbsorptionRefused``
    before the core eval runs or anything is written.
    """
    from fcsae.evals.absorption import evaluate_absorption
    from fcsae.evals.core import load_lm, check_sae_matches, evaluate_core

    lm = load_lm(lm_cfg, lm)
    check_sae_matches(sae, lm, lm_cfg.layer)
    report: dict[str, Any] = {"model": lm_cfg.model, "layer": lm_cfg.layer, "norm_scale": norm_scale, "seconds": {}}
    if absorption and strict:  # refuse before spending the core eval's time
        from fcsae.evals.absorption import check_letters, prepare_absorption_cache

        check_letters(prepare_absorption_cache(lm_cfg, eval_cfg, lm=lm), lm_cfg, eval_cfg, strict=True)
    if core:
        t = time.perf_counter()
        report["core"] = evaluate_core(sae, lm_cfg, eval_cfg, norm_scale, lm=lm)
        report["seconds"]["core"] = round(time.perf_counter() - t, 2)
    if absorption:
        t = time.perf_counter()
        from fcsae.evals.absorption_stats import verdict

        res = evaluate_absorption(sae, lm_cfg, eval_cfg, norm_scale, lm=lm, strict=strict)
        report["absorption"] = {"summary": res.summary, "verdict": verdict(res.summary),
                                "per_letter": res.per_letter.to_dicts()}
        report["seconds"]["absorption"] = round(time.perf_counter() - t, 2)
    return report


def print_report(report: dict[str, Any]) -> None:
    """A readable summary on stdout (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{report.get('sae', 'SAE')} on {report['model']} layer {report['layer']}"
    for section in ("core", "absorption"):
        values = report.get(section)
        if values is None:
            continue
        values = values["summary"] if section == "absorption" else values
        table = Table(title=f"{section}: {title}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in values.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(table)
    if report.get("absorption"):
        table = Table(title="absorption per letter")
        cols = ("letter", "probe_f1", "sparse_f1_k1", "num_split_features", "num_probe_true_positives",
                "mean_absorption_fraction", "full_absorption_rate", "latent_share")
        for c in cols:
            table.add_column(c, justify="right")
        for row in report["absorption"]["per_letter"]:
            table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
        console.print(table)
        console.print(report["absorption"]["verdict"])
