"""Search-space YAML -> a validated ``SweepSpec`` -> Optuna suggestions.

The format (every key; see docs/sweeps.md for a worked example)::

    name: quickstart            # required; experiment dir experiments/<name>/
    description: "..."          # optional free text
    seed: 0                     # seeds the Optuna sampler (default 0)
    runner: orchestrator.fcsae_runner   # optional: module with prepare(spec) and run(ctx)
    fixed:                      # config sections of fcsae.config, fixed for all trials
      lm: {model: smollm2-135m, layer: 8}
      harvest: {tokens: 200000}          # the activation cache (lm comes from fixed.lm)
      sae: {activation: topk, k: 32, dict_size: 1024}   # d_in comes from the cache
      trainer: {total_tokens: 500000, resample_every: 50}
      tracker: {}
      split: {}
      eval: {core_tokens: 4096, absorption_words: 2000}
    evals: {core: true, absorption: true}
    search:                     # dotted config field -> distribution
      split.criterion: {type: categorical, values: [none, dead, fc], grid: true}
      tracker.ema_alpha: {type: float, low: 0.9, high: 0.999, log: true}
      sae.dict_size: {type: int, low: 512, high: 2048, log: true}     # optional step
    arms:                       # optional: named combinations (a grid axis whose cells set several fields)
      topk-fc: {sae.activation: topk, split.criterion: fc}
      matryoshka: {sae.activation: matryoshka, split.criterion: none}
    seeds: [0, 1]               # optional: grid over trainer.seed
    objectives:                 # one (single) or more (multi-objective) metrics
      - {metric: absorption.mean_absorption_fraction, mode: min}
    num_samples: 6              # total trials; a multiple of the grid cells
    max_concurrent: 2           # trials at once
    resources: {cpu: 1, gpu: 0} # per trial; gpu may be a fraction
    scheduler: {type: asha, metric: train.mse, mode: min, grace_period: 2, reduction_factor: 2}

Grid axes (``arms``, categoricals with ``grid: true`` and ``seeds``) are not
sampled: trial number n gets grid cell ``n mod cells``, so every arm x
criterion x seed combination gets the same number of trials; Optuna samples
the rest. ``arms`` compares chosen combinations (an architecture with its own
criterion) without the full cross product; every arm sets the same fields.

Validation collects every problem (unknown keys, wrong types, empty or
inverted ranges, values a config refuses, unknown metrics, resources beyond
this machine) and raises one ``SpaceError`` listing them all.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import yaml

from fcsae.config import field_type_problem, section_configs  # noqa: F401  (re-exported: the one assembly)
from fcsae.errors import FcsaeInputError
from results_schema.schema import ABSORPTION_METRICS, CONFIG_SECTIONS, CORE_METRICS

DEFAULT_RUNNER = "orchestrator.fcsae_runner"
"""Module that runs a real fcsae trial (harvested cache -> train -> evals)."""
SEARCHABLE_SECTIONS = ("sae", "trainer", "tracker", "split")
"""Sections a sweep may vary per trial; lm/harvest/eval are fixed because their caches are built once."""
TOP_KEYS = {"name", "description", "seed", "runner", "fixed", "evals", "search", "arms", "seeds", "objectives",
            "num_samples", "max_concurrent", "resources", "scheduler"}
PARAM_TYPES = ("float", "int", "categorical")
SCHEDULER_TYPES = ("asha",)
MODES = ("min", "max")


class SpaceError(FcsaeInputError):
    """A search space with one or more problems; ``problems`` lists them all."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        n = len(problems)
        head = f"{source}: {problems[0]}" if n == 1 else f"{source}: {problems[0]} (1 of {n} problems in the search space)"
        super().__init__(head + ("".join(f"\n  - {p}" for p in problems) if n > 1 else ""))


class ParamSpec(NamedTuple):
    """One searched parameter: a dotted config field and its distribution."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    values: tuple = ()


class Objective(NamedTuple):
    """A metric column to optimise and its direction."""

    metric: str
    mode: str


class Resources(NamedTuple):
    """Resources one trial reserves."""

    cpu: float = 1.0
    gpu: float = 0.0


class SchedulerSpec(NamedTuple):
    """ASHA early stopping on an interim training metric (reported every ``trainer.log_every`` steps)."""

    type: str
    metric: str
    mode: str
    grace_period: int
    reduction_factor: float


class SweepSpec(NamedTuple):
    """A fully validated sweep: everything the driver and the trials need."""

    name: str
    description: str
    seed: int
    runner: str
    fixed: dict[str, dict[str, Any]]
    evals: dict[str, bool]
    params: tuple[ParamSpec, ...]
    grid: tuple[tuple[str, tuple], ...]
    arms: tuple[tuple[str, dict[str, Any]], ...]
    """Named combinations ``(name, {dotted field: value})``, each a cell of one more grid axis; () when none."""
    objectives: tuple[Objective, ...]
    num_samples: int
    max_concurrent: int
    resources: Resources
    scheduler: SchedulerSpec | None
    raw: dict[str, Any]

    @property
    def grid_cells(self) -> list[dict[str, Any]]:
        """Every combination of grid values (one empty dict when there is no grid)."""
        names = [n for n, _ in self.grid]
        combos = [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in self.grid))]
        # Arms vary fastest: a study stopped early has every arm at its first seeds, not some arms at all seeds.
        return [{**arm, **combo} for combo in combos for _, arm in (self.arms or (("", {}),))]

    @property
    def grid_names(self) -> list[str]:
        """Dotted names of the fields the grid sets (the arms' fields first, then the grid axes)."""
        return [*self.arms[0][1]] + [n for n, _ in self.grid] if self.arms else [n for n, _ in self.grid]

    @property
    def searched_names(self) -> list[str]:
        """Dotted names of all searched and gridded parameters."""
        return [p.name for p in self.params] + self.grid_names


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _field_names(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CONFIG_SECTIONS[section])}


def _check_keys(where: str, data: Mapping, allowed: set[str], problems: list[str]) -> None:
    for key in sorted(set(data) - allowed, key=str):
        problems.append(f"{where}{key}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _parse_fixed(raw, problems) -> dict[str, dict]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"fixed: must be a mapping of config sections, got {type(raw).__name__}")
        return {}
    _check_keys("fixed.", raw, set(CONFIG_SECTIONS), problems)
    fixed = {}
    for section in CONFIG_SECTIONS:
        data = raw.get(section) or {}
        if not isinstance(data, Mapping):
            problems.append(f"fixed.{section}: must be a mapping, got {type(data).__name__}")
            continue
        allowed = _field_names(section) - {"lm"} - ({"d_in"} if section == "sae" else set())
        _check_keys(f"fixed.{section}.", data, allowed, problems)
        fixed[section] = {}
        for k, v in data.items():
            msg = field_type_problem(section, k, v) if k in allowed else None
            if msg:
                problems.append(f"fixed.{msg}")
            elif k in allowed:
                fixed[section][k] = v
    try:
        section_configs(fixed)
    except FcsaeInputError as e:
        problems.append(f"fixed.{e}")
    return fixed


def _parse_param(name: str, raw, problems) -> ParamSpec | None:
    where = f"search.{name}"
    section, _, field = name.partition(".")
    if section not in CONFIG_SECTIONS or field not in _field_names(section):
        problems.append(f"{where}: unknown parameter; use section.field with section in {', '.join(SEARCHABLE_SECTIONS)}")
        return None
    if section not in SEARCHABLE_SECTIONS or (section, field) == ("sae", "d_in"):
        problems.append(f"{where}: cannot be searched (lm, harvest and eval share one cache per sweep; sae.d_in comes from the cache)")
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping with a 'type' ({', '.join(PARAM_TYPES)})")
        return None
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        problems.append(f"{where}.type: must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        return None
    if kind == "categorical":
        _check_keys(f"{where}.", raw, {"type", "values", "grid"}, problems)
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.values: must be a non-empty list")
            return None
        if len(set(map(repr, values))) != len(values):
            problems.append(f"{where}.values: has duplicates")
        if not isinstance(raw.get("grid", False), bool):
            problems.append(f"{where}.grid: must be true or false")
        return ParamSpec(name, "categorical", values=tuple(values), step=1 if raw.get("grid") is True else None)
    _check_keys(f"{where}.", raw, {"type", "low", "high", "log"} | ({"step"} if kind == "int" else set()), problems)
    low, high, log, step = raw.get("low"), raw.get("high"), raw.get("log", False), raw.get("step")
    ok_type = _is_int if kind == "int" else _is_num
    bad = False
    for key, v in (("low", low), ("high", high)):
        if not ok_type(v):
            problems.append(f"{where}.{key}: must be {'an integer' if kind == 'int' else 'a finite number'}, got {v!r}")
            bad = True
    if not isinstance(log, bool):
        problems.append(f"{where}.log: must be true or false, got {log!r}")
        bad = True
    if step is not None and (not _is_int(step) or step < 1):
        problems.append(f"{where}.step: must be an integer >= 1, got {step!r}")
        bad = True
    if bad:
        return None
    if low >= high:
        problems.append(f"{where}: empty or inverted range low={low} >= high={high}")
        return None
    if log and low <= 0:
        problems.append(f"{where}: log scale needs low > 0, got {low}")
        return None
    if log and step not in (None, 1):
        problems.append(f"{where}: step and log cannot be combined")
        return None
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step)


def _fixed_error(fixed) -> str | None:
    """The error ``fixed`` alone raises, if any: it is reported under ``fixed.``, so checks of values on top of it skip it."""
    try:
        section_configs(fixed)
    except FcsaeInputError as e:
        return str(e)
    return None


def _parse_arms(raw, fixed, searched: list[str], problems) -> tuple[tuple[str, dict], ...]:
    """``arms: {name: {dotted field: value}}``: every arm sets the same searchable fields, to values the configs accept."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Mapping) and v for v in raw.values()):
        problems.append("arms: must be a mapping of arm names to non-empty mappings {section.field: value}")
        return ()
    fields = list(next(iter(raw.values())))
    fixed_error = _fixed_error(fixed)
    arms = []
    for name, arm in raw.items():
        where = f"arms.{name}"
        if sorted(arm) != sorted(fields):
            problems.append(f"{where}: sets {', '.join(sorted(arm))}; every arm must set the same fields ({', '.join(fields)})")
            continue
        for key in arm:
            section, _, field = str(key).partition(".")
            if section not in SEARCHABLE_SECTIONS or field not in _field_names(section) or key == "sae.d_in":
                problems.append(f"{where}.{key}: not a field a sweep may vary; use section.field with section in "
                                f"{', '.join(SEARCHABLE_SECTIONS)}")
            elif key in searched or key == "trainer.seed":
                problems.append(f"{where}.{key}: also under search/seeds; set it in one place")
            elif msg := field_type_problem(section, field, arm[key]):
                problems.append(f"{where}.{key}: value {arm[key]!r} refused: {msg}")
        try:
            section_configs(fixed, dict(arm))
        except FcsaeInputError as e:
            if str(e) != fixed_error:
                problems.append(f"{where}: refused: {e}")
        arms.append((str(name), {k: arm[k] for k in fields}))
    if len({repr(sorted(a.items())) for _, a in arms}) != len(arms):
        problems.append("arms: two arms set the same values")
    return tuple(arms)


def _check_param_values(fixed, p: ParamSpec, problems) -> None:
    """Every categorical value and both range ends must be accepted by the config class."""
    values = p.values if p.kind == "categorical" else (p.low, p.high)
    section, field = p.name.split(".", 1)
    fixed_error = _fixed_error(fixed)
    for v in values:
        msg = field_type_problem(section, field, float(v) if p.kind == "float" else v)
        if msg:
            problems.append(f"search.{p.name}: value {v!r} refused: {msg}")
            continue
        try:
            section_configs(fixed, {p.name: float(v) if p.kind == "float" else v})
        except FcsaeInputError as e:
            if str(e) != fixed_error:
                problems.append(f"search.{p.name}: value {v!r} refused: {e}")


def _parse_objectives(raw, evals, problems) -> tuple[Objective, ...]:
    if raw is None:
        problems.append("objectives: required: a list of {metric, mode}")
        return ()
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        problems.append("objectives: must be a non-empty list of {metric, mode}")
        return ()
    available = [f"core.{k}" for k in CORE_METRICS if evals["core"]] + [f"absorption.{k}" for k in ABSORPTION_METRICS if evals["absorption"]]
    out = []
    for i, obj in enumerate(raw):
        if not isinstance(obj, Mapping):
            problems.append(f"objectives[{i}]: must be a mapping with metric and mode")
            continue
        _check_keys(f"objectives[{i}].", obj, {"metric", "mode"}, problems)
        metric, mode = obj.get("metric"), obj.get("mode")
        if metric not in available:
            problems.append(f"objectives[{i}].metric: {metric!r} is not a metric of the enabled evals; allowed: {', '.join(available)}")
        if mode not in MODES:
            problems.append(f"objectives[{i}].mode: must be min or max, got {mode!r}")
        out.append(Objective(str(metric), str(mode)))
    if len({o.metric for o in out}) != len(out):
        problems.append("objectives: a metric is listed twice")
    return tuple(out)


def _machine_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no usable torch build: no GPUs
        return 0


def _parse_resources(raw, max_concurrent, check_machine, problems) -> Resources:
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        problems.append("resources: must be a mapping {cpu, gpu}")
        return Resources()
    _check_keys("resources.", raw, {"cpu", "gpu"}, problems)
    cpu, gpu = raw.get("cpu", 1), raw.get("gpu", 0)
    if not _is_num(cpu) or cpu <= 0:
        problems.append(f"resources.cpu: must be a number > 0, got {cpu!r}")
        cpu = 1
    if not _is_num(gpu) or gpu < 0:
        problems.append(f"resources.gpu: must be a number >= 0, got {gpu!r}")
        gpu = 0
    if gpu > 1 and not float(gpu).is_integer():
        problems.append(f"resources.gpu: above 1 must be a whole number of GPUs, got {gpu}")
    if check_machine:
        cpus, gpus = os.cpu_count() or 1, _machine_gpus()
        if cpu > cpus:
            problems.append(f"resources.cpu: {cpu} per trial but this machine has {cpus} CPUs")
        if gpu > gpus:
            problems.append(f"resources.gpu: {gpu} per trial but this machine has {gpus} GPUs")
    return Resources(float(cpu), float(gpu))


def _check_devices(fixed, resources: Resources, check_machine: bool, problems) -> None:
    """A CUDA device needs a GPU on this machine and a GPU share per trial, or every trial fails after training."""
    for section in ("lm", "trainer"):
        device = str((fixed.get(section) or {}).get("device", "cpu"))
        if not device.startswith("cuda"):
            continue
        if check_machine and _machine_gpus() == 0:
            problems.append(f"fixed.{section}.device: {device!r} but this machine has no CUDA GPU; use cpu")
        elif resources.gpu <= 0:
            problems.append(f"fixed.{section}.device: {device!r} needs resources.gpu > 0 (a trial without a GPU "
                            "share sees none)")


def _parse_scheduler(raw, problems) -> SchedulerSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append("scheduler: must be a mapping with type: asha")
        return None
    _check_keys("scheduler.", raw, {"type", "metric", "mode", "grace_period", "reduction_factor"}, problems)
    kind, metric, mode = raw.get("type"), raw.get("metric"), raw.get("mode", "min")
    grace, factor = raw.get("grace_period", 1), raw.get("reduction_factor", 2)
    n = len(problems)
    if kind not in SCHEDULER_TYPES:
        problems.append(f"scheduler.type: must be one of {', '.join(SCHEDULER_TYPES)}, got {kind!r}")
    from fcsae.trainer import LOGGED_METRICS

    if not isinstance(metric, str) or metric.removeprefix("train.") not in LOGGED_METRICS or not metric.startswith("train."):
        problems.append(f"scheduler.metric: must be an interim training metric the trainer logs "
                        f"({', '.join('train.' + m for m in LOGGED_METRICS)}), got {metric!r}")
    if mode not in MODES:
        problems.append(f"scheduler.mode: must be min or max, got {mode!r}")
    if not _is_int(grace) or grace < 1:
        problems.append(f"scheduler.grace_period: must be an integer >= 1 (interim reports), got {grace!r}")
    if not _is_num(factor) or factor <= 1:
        problems.append(f"scheduler.reduction_factor: must be a number > 1, got {factor!r}")
    return None if len(problems) > n else SchedulerSpec(kind, metric, mode, grace, float(factor))


def _positive_int(raw, key, default, problems) -> int:
    v = raw.get(key, default)
    if not _is_int(v) or v < 1:
        problems.append(f"{key}: must be an integer >= 1, got {v!r}")
        return default
    return v


def _check_runner(runner, problems) -> None:
    if not isinstance(runner, str) or not runner:
        problems.append(f"runner: must be a module path, got {runner!r}")
        return
    try:
        mod = importlib.import_module(runner)
    except Exception as e:  # any import failure is the user's runner path
        problems.append(f"runner: cannot import {runner!r} ({type(e).__name__}: {e})")
        return
    for fn in ("prepare", "run"):
        if not callable(getattr(mod, fn, None)):
            problems.append(f"runner: module {runner!r} has no function {fn}()")


def parse_space(raw: Any, source: str = "<space>", check_machine: bool = True) -> SweepSpec:
    """Validate a loaded YAML mapping completely; raise ``SpaceError`` listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise SpaceError(source, [f"top level: must be a mapping, got {type(raw).__name__}"])
    _check_keys("", raw, TOP_KEYS, problems)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        problems.append(f"name: required, letters/digits/_.- only, got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append("description: must be a string")
    seed = raw.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        problems.append(f"seed: must be an integer >= 0, got {seed!r}")
    runner = raw.get("runner", DEFAULT_RUNNER)
    _check_runner(runner, problems)
    fixed = _parse_fixed(raw.get("fixed"), problems)

    evals_raw = raw.get("evals") or {}
    evals = {"core": True, "absorption": True}
    if not isinstance(evals_raw, Mapping):
        problems.append("evals: must be a mapping {core: bool, absorption: bool}")
    else:
        _check_keys("evals.", evals_raw, set(evals), problems)
        for k in evals:
            v = evals_raw.get(k, True)
            if not isinstance(v, bool):
                problems.append(f"evals.{k}: must be true or false, got {v!r}")
            else:
                evals[k] = v

    search_raw = raw.get("search") or {}
    params, grid = [], []
    if not isinstance(search_raw, Mapping):
        problems.append("search: must be a mapping of dotted config fields to distributions")
        search_raw = {}
    for pname, praw in search_raw.items():
        p = _parse_param(str(pname), praw, problems)
        if p is None:
            continue
        _check_param_values(fixed, p, problems)
        if p.kind == "categorical" and p.step == 1:
            grid.append((p.name, p.values))
        else:
            params.append(p)
    arms = _parse_arms(raw.get("arms"), fixed, [*search_raw], problems)
    seeds = raw.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
            problems.append(f"seeds: must be a non-empty list of distinct integers >= 0, got {seeds!r}")
        elif "trainer.seed" in search_raw:
            problems.append("seeds: conflicts with search.trainer.seed; use one of them")
        else:
            grid.append(("trainer.seed", tuple(seeds)))

    objectives = _parse_objectives(raw.get("objectives"), evals, problems)
    n_problems = len(problems)
    num_samples = _positive_int(raw, "num_samples", 1, problems)
    cells = math.prod(len(v) for _, v in grid) * max(len(arms), 1)
    if len(problems) == n_problems and num_samples % cells:
        axes = (["arms"] if arms else []) + [n for n, _ in grid]
        problems.append(f"num_samples: {num_samples} is not a multiple of the {cells} grid cells "
                        f"({' x '.join(axes)}); every cell must get the same budget")
    max_concurrent = _positive_int(raw, "max_concurrent", 1, problems)
    resources = _parse_resources(raw.get("resources"), max_concurrent, check_machine, problems)
    _check_devices(fixed, resources, check_machine, problems)
    scheduler = _parse_scheduler(raw.get("scheduler"), problems)
    if scheduler is not None and len(objectives) > 1:
        problems.append("scheduler: ASHA cannot be combined with several objectives")
    if problems:
        raise SpaceError(source, problems)
    return SweepSpec(name, description, seed, runner, fixed, evals, tuple(params), tuple(grid), arms, objectives,
                     num_samples, max_concurrent, resources, scheduler, dict(raw))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}); each key may appear once",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_space(path: str | Path, check_machine: bool = True) -> SweepSpec:
    """Read and validate a search-space YAML file (safe loading; a duplicate key is an error)."""
    path = Path(path)
    if not path.is_file():
        raise FcsaeInputError(f"{path}: search space file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise FcsaeInputError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return parse_space(raw, str(path), check_machine=check_machine)


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Define-by-run space for Optuna: sample the searched params, take the grid cell by trial number.

    Returns the grid values as constants (Ray's OptunaSearch merges them into the config).
    """
    for p in spec.params:
        if p.kind == "float":
            trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)
        elif p.kind == "int":
            trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            trial.suggest_categorical(p.name, list(p.values))
    cells = spec.grid_cells
    return dict(cells[trial.number % len(cells)])
