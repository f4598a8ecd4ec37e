"""The ``fcsae`` command: parsing only; the work lives in the library modules.

Subcommands: ``prepare`` (offline assets), ``harvest`` (activation cache),
``train`` (one SAE), ``eval`` (score a saved SAE), ``query`` (results tables).
Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``.
Bad input raises ``FcsaeInputError``; ``main`` prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from fcsae.errors import FcsaeInputError


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="prepare the offline default model and corpus under $FCSAE_HOME (once)",
        description="Assemble/extract and dequantise the offline models and build the offline corpus. "
        "Idempotent: a second run finds everything cached and returns in seconds.",
    )
    p.add_argument("--model", default=None, help="model to prepare (default: the default model)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from fcsae import corpus, lm
    from fcsae.config import DEFAULT_MODEL

    lm.prepare_model(args.model or DEFAULT_MODEL)
    corpus.prepare_offline_corpus()
    return 0


def default(cls, name: str):
    """The default of config field ``cls.name`` (help texts quote the dataclasses, never a copy)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _add_harvest(sub) -> None:
    from fcsae.config import HarvestConfig, LMConfig

    h = lambda name: default(HarvestConfig, name)  # noqa: E731
    p = sub.add_parser(
        "harvest",
        help="run the model once and cache residual-stream activations on disk",
        description="Harvest activations at blocks.LAYER.hook_resid_post into sharded files under "
        "$FCSAE_HOME/activations. A second harvest with the same key is a cache hit; an interrupted "
        "one resumes from its last complete shard. Prints the cache directory.",
    )
    p.add_argument("--model", default=default(LMConfig, "model"),
                   help="model short name, HF/TransformerLens name or local dir (default %(default)s)")
    p.add_argument("--layer", type=int, default=default(LMConfig, "layer"), help="residual layer (default %(default)s)")
    p.add_argument("--harvest-tokens", "--tokens", dest="harvest_tokens", type=int, default=h("tokens"),
                   help="activation vectors to store (default %(default)s)")
    p.add_argument("--corpus", default=h("corpus"), help="'offline', a local text/parquet/json file, or a datasets hub name "
                   "(default %(default)s)")
    p.add_argument("--context-len", type=int, default=h("context_len"), help="tokens per packed context (default %(default)s)")
    p.add_argument("--device", default=default(LMConfig, "device"), help="torch device (default %(default)s)")
    p.add_argument("--dtype", default=default(LMConfig, "dtype"),
                   help="dtype the model runs in: float32, bfloat16 or float16 (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=h("batch_size"), help="contexts per forward pass (default %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=h("shard_tokens"), help="activation vectors per shard file (default %(default)s)")
    p.add_argument("--store-dtype", default=h("store_dtype"), help="on-disk dtype: float16 or bfloat16 (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_harvest)


def _run_harvest(args) -> int:
    from fcsae import activations
    from fcsae.config import HarvestConfig, LMConfig

    cfg = HarvestConfig(
        lm=LMConfig(model=args.model, layer=args.layer, device=args.device, dtype=args.dtype),
        corpus=args.corpus, tokens=args.harvest_tokens, context_len=args.context_len, batch_size=args.batch_size,
        shard_tokens=args.shard_tokens, store_dtype=args.store_dtype,
    )
    path = activations.harvest(cfg, progress=not args.no_progress)
    print(path)  # the cache directory, for scripts (`fcsae train --cache $(fcsae harvest ...)`)
    return 0


TRAIN_FLAGS = (  # (flag, section, field, type): the config fields `fcsae train` sets directly
    ("--dict-size", "sae", "dict_size", int), ("--k", "sae", "k", float), ("--activation", "sae", "activation", str),
    ("--matryoshka-groups", "sae", "matryoshka_groups", str),
    ("--criterion", "split", "criterion", str), ("--lr", "trainer", "lr", float),
    ("--train-tokens", "trainer", "total_tokens", int), ("--batch-size", "trainer", "batch_size", int),
    ("--seed", "trainer", "seed", int), ("--device", "trainer", "device", str),
)
"""Flags of ``fcsae train`` that override one config field each (help and default come from the field)."""
TRAIN_NOTES = {
    "k": "active latents per token: an integer for topk, the batch average (may be fractional) for batchtopk/matryoshka",
    "matryoshka_groups": "matryoshka prefixes: widths '128,512,4096' or group fractions '1/4,3/4'; "
                         "empty = 1/32,1/16,1/8,1/4,rest",
}
"""What a ``TRAIN_FLAGS`` field means where its dotted name does not say it."""


def _add_train(sub) -> None:
    from fcsae import config as C

    classes = {"sae": C.SAEConfig, "trainer": C.TrainerConfig, "split": C.SplitConfig}
    allowed = {"activation": C.ACTIVATIONS, "criterion": C.CRITERIA}
    p = sub.add_parser(
        "train", help="train one SAE on cached activations",
        description=f"Train one SAE ({', '.join(C.ACTIVATIONS)}) on an activation cache: --cache PATH, or --model/--layer (reuses the largest "
        "matching cache already harvested, e.g. a sweep's; harvests one when there is none or --harvest-tokens is "
        "given). Settings come from --config YAML (sections sae, trainer, split, tracker; keys as in fcsae.config) "
        "and the flags below, which override it; defaults are fcsae.config's. Writes OUT/sae (safetensors + "
        "cfg.json), OUT/events.jsonl, OUT/train.json; resumes from OUT/checkpoint.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cache", default=None, help="activation cache directory (from `fcsae harvest`)")
    src.add_argument("--model", default=None, help=f"use (or harvest) the cache of this model (default {C.DEFAULT_MODEL})")
    p.add_argument("--layer", type=int, default=C.DEFAULT_LAYER, help="with --model: residual layer (default %(default)s)")
    p.add_argument("--harvest-tokens", type=int, default=None,
                   help="with --model: harvest exactly this many activation vectors (default: reuse the largest "
                   f"matching cache, else harvest {default(C.HarvestConfig, 'tokens')})")
    p.add_argument("--corpus", default=default(C.HarvestConfig, "corpus"),
                   help="with --model: corpus to harvest ('offline', a local file, a datasets name; default %(default)s)")
    p.add_argument("--context-len", type=int, default=default(C.HarvestConfig, "context_len"),
                   help="with --model: tokens per packed context (default %(default)s)")
    p.add_argument("--config", default=None, help="YAML file with sections sae, trainer, split, tracker")
    for flag, section, name, typ in TRAIN_FLAGS:
        doc = f"{section}.{name}"
        choices = f"; one of {', '.join(allowed[name])}" if name in allowed else ""
        p.add_argument(flag, type=typ, default=None, dest=name, metavar=flag[2:].upper().replace("-", "_"),
                       help=f"{doc}{': ' + TRAIN_NOTES[name] if name in TRAIN_NOTES else ''} "
                       f"(default {default(classes[section], name) or repr(default(classes[section], name))}{choices})")
    p.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)  # ambiguous here: refused with a hint
    p.add_argument("--out", default=None, help="output directory (default $FCSAE_HOME/runs/<cache>-<activation>-<dict>)")
    p.add_argument("--no-resume", action="store_true", help="ignore OUT/checkpoint and start afresh")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: OMP_NUM_THREADS if set, else the cores the load average leaves "
                        "free, at least 1; see fcsae.threads and docs/training.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _train_sections(args) -> dict:
    """The YAML config's sections (sae, trainer, split, tracker), each a plain mapping."""
    import yaml

    sections: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                sections = yaml.safe_load(f) or {}
        except OSError as e:
            raise FcsaeInputError(f"--config: cannot read {args.config} ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise FcsaeInputError(f"--config: {args.config} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(sections, dict):
            raise FcsaeInputError(f"--config: {args.config} must be a mapping with sections sae, trainer, split, tracker")
        unknown = sorted(set(sections) - {"sae", "trainer", "split", "tracker"})
        if unknown:
            raise FcsaeInputError(f"--config: unknown section {unknown[0]!r}; allowed: sae, trainer, split, tracker")
    return {name: dict(sections.get(name) or {}) for name in ("sae", "trainer", "split", "tracker")}


def _train_overrides(args) -> dict:
    """The flags given, as dotted config fields (``{"split.criterion": "fc"}``): they win over the YAML."""
    return {f"{section}.{key}": getattr(args, key) for _, section, key, _ in TRAIN_FLAGS if getattr(args, key) is not None}


def _train_cache(args) -> str:
    """The cache to train on: --cache, else a matching one already harvested, else a fresh harvest."""
    from fcsae import activations
    from fcsae.config import DEFAULT_MODEL, HarvestConfig, LMConfig

    if args.cache:
        return args.cache
    lm_cfg = LMConfig(model=args.model or DEFAULT_MODEL, layer=args.layer)
    if args.harvest_tokens is None:
        found = activations.matching_caches(HarvestConfig(lm=lm_cfg, corpus=args.corpus, context_len=args.context_len))
        if found:
            logging.getLogger("fcsae.cli").info("reusing activation cache %s (pass --harvest-tokens N for a new one)", found[0])
            return str(found[0])
    tokens = args.harvest_tokens or default(HarvestConfig, "tokens")
    hcfg = HarvestConfig(lm=lm_cfg, corpus=args.corpus, tokens=tokens, context_len=args.context_len)
    return str(activations.harvest(hcfg, progress=not args.no_progress))


def _run_train(args) -> int:
    import json

    from fcsae.config import section_configs
    from fcsae.paths import cache_dir

    if args.tokens is not None:
        raise FcsaeInputError("--tokens: ambiguous in `fcsae train`; use --train-tokens (training budget) "
                              "or --harvest-tokens (activation vectors to harvest)")
    from fcsae.threads import set_threads

    s, overrides = _train_sections(args), _train_overrides(args)
    threads = set_threads(args.threads)  # refuses a bad --threads before anything is written
    logging.getLogger(__name__).info("training with %d torch threads", threads)
    section_configs(s, overrides)  # check every section before touching the cache (a harvest can take minutes)
    from fcsae import activations

    cache_path = _train_cache(args)
    cache = activations.ActivationCache(cache_path)
    if "d_in" in s["sae"] and s["sae"]["d_in"] != cache.d_in:
        raise FcsaeInputError(f"sae.d_in: config says {s['sae']['d_in']}, the cache {cache_path} holds {cache.d_in}-dim activations")
    cfgs = section_configs(s, overrides, d_in=cache.d_in)
    sae_cfg, trainer_cfg, split_cfg, tracker_cfg = (cfgs[k] for k in ("sae", "trainer", "split", "tracker"))
    from fcsae.trainer import LogMetrics, TrainingDiverged, train_from_cache

    out = args.out or cache_dir("runs") / f"{cache.path.name}-{sae_cfg.activation}-{sae_cfg.dict_size}"
    try:
        result = train_from_cache(cache_path, sae_cfg, trainer_cfg, split_cfg, tracker_cfg, out,
                                  callbacks=[LogMetrics()], resume=not args.no_resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"fcsae: training diverged: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(result.out_dir), **{k: result.metrics[k] for k in ("step", "fvu", "l0", "dead_frac")
                                                      if k in result.metrics}}))
    return 0


def _add_eval(sub) -> None:
    from fcsae.config import EvalConfig

    p = sub.add_parser(
        "eval", help="score a saved SAE (core metrics and first-letter absorption)",
        description="Score the SAE saved in PATH (from `fcsae train`, a sweep's trial directory, or "
        "SparseAutoencoder.save): reconstruction, sparsity and spliced CE/KL scores on held-out text, and the "
        "first-letter absorption eval. The model, layer and norm_scale come from PATH/../train.json and its "
        "activation cache, or from --cache, or from --model/--layer/--norm-scale (flags win). For a sweep trial "
        "(PATH = <experiment>/trials/<id> or its sae/) the eval settings are that trial's, so the numbers match its "
        "result row; elsewhere fcsae.config.EvalConfig's defaults. Flags override either; the settings used are "
        "printed and saved. Per-(model, layer) baselines are cached under $FCSAE_HOME/evals.",
    )
    p.add_argument("path", metavar="PATH", help="a saved SAE directory (sae_weights.safetensors + cfg.json) or a trial directory")
    p.add_argument("--cache", default=None, help="activation cache the SAE was trained on (gives model, layer, norm_scale)")
    p.add_argument("--model", default=None, help="model name or directory (overrides the cache's)")
    p.add_argument("--layer", type=int, default=None, help="residual layer (overrides the cache's)")
    p.add_argument("--norm-scale", type=float, default=None, help="SAE input = raw activation x this (overrides the cache's)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--out", default=None, help="JSON output file (default PATH/eval.json)")
    p.add_argument("--corpus", default=None, help=f"text source of the held-out tokens (default: the trial's, else {default(EvalConfig, 'corpus')})")
    p.add_argument("--core-tokens", type=int, default=None,
                   help=f"held-out tokens for the core metrics (default: the trial's, else {default(EvalConfig, 'core_tokens')})")
    p.add_argument("--absorption-words", type=int, default=None,
                   help="word budget of the first-letter eval (default: the trial's, else "
                   f"{default(EvalConfig, 'absorption_words')} = SAEBench's full vocabulary)")
    p.add_argument("--absorption-probe", default=None, choices=("saebench", "standardized"),
                   help="ground-truth letter probe (default: the trial's, else "
                   f"{default(EvalConfig, 'absorption_probe')}: one linear layer on raw activations)")
    p.add_argument("--skip-core", action="store_true", help="skip the core metrics")
    p.add_argument("--skip-absorption", action="store_true", help="skip the absorption eval")
    p.set_defaults(func=_run_eval)


def _sae_dir(path: Path) -> Path:
    """PATH itself, or PATH/sae for a trial / `fcsae train` output directory."""
    return path / "sae" if not (path / "cfg.json").is_file() and (path / "sae" / "cfg.json").is_file() else path


def trial_eval_settings(sae_dir: Path) -> tuple[dict, str | None]:
    """The ``eval.*`` settings of the sweep trial that saved ``sae_dir`` (``<exp>/trials/<id>/sae``), and its id."""
    from fcsae.config import EvalConfig
    from results_schema.reader import read_trial

    trial_dir = sae_dir.resolve().parent
    if trial_dir.parent.name != "trials" or not (trial_dir.parent.parent / "results").is_dir():
        return {}, None
    row = read_trial(trial_dir.parent.parent / "results", trial_dir.name)
    if row is None:
        return {}, None
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    return {k[5:]: v for k, v in row.items() if k.startswith("eval.") and k[5:] in names and v is not None}, trial_dir.name


def _run_eval(args) -> int:
    from fcsae.config import EvalConfig, LMConfig, from_dict
    from fcsae.evals.report import eval_report, print_report, resolve_target
    from fcsae.io import write_json
    from fcsae.sae import SparseAutoencoder

    sae_dir = _sae_dir(Path(args.path))
    sae = SparseAutoencoder.load(sae_dir)
    target = resolve_target(sae_dir, cache=args.cache, model=args.model, layer=args.layer, norm_scale=args.norm_scale)
    settings, trial = trial_eval_settings(sae_dir)
    if not settings and target.context_len is not None:
        settings["context_len"] = target.context_len
    flags = {k: v for k, v in (("core_tokens", args.core_tokens), ("absorption_words", args.absorption_words),
                               ("absorption_probe", args.absorption_probe), ("corpus", args.corpus)) if v is not None}
    eval_cfg = from_dict(EvalConfig, {**settings, **flags}, "eval.")
    source = f"trial {trial}'s result row" if trial else "fcsae.config.EvalConfig defaults"
    print(f"eval settings: {source}" + (f", flags {', '.join(sorted(flags))}" if flags else "")
          + f" (core_tokens={eval_cfg.core_tokens}, absorption_words={eval_cfg.absorption_words}, "
          f"absorption_probe={eval_cfg.absorption_probe}, corpus={eval_cfg.corpus}, context_len={eval_cfg.context_len})")
    lm_cfg = LMConfig(model=target.model, layer=target.layer, device=args.device)
    out = Path(args.out) if args.out else sae_dir / "eval.json"
    report = eval_report(sae, lm_cfg, eval_cfg, target.norm_scale, core=not args.skip_core,
                         absorption=not args.skip_absorption, strict=True)
    report["sae"] = str(sae_dir)
    report["eval_config"] = dataclasses.asdict(eval_cfg)
    report["eval_config_source"] = source
    write_json(out, report)
    print_report(report)
    print(f"wrote {out}")
    return 0


def _add_query(sub) -> None:
    p = sub.add_parser(
        "query", help="query a sweep's result tables with polars SQL or a named recipe",
        description="Run a polars SQL query over the tables `trials` (one row per trial) and `letters` (per-letter "
        "absorption rows) of a sweep, or one of the named recipes. Quote dotted columns: \"split.criterion\". "
        "Examples: docs/queries.md.",
    )
    p.add_argument("sql", nargs="?", default=None, help="SQL over the tables trials and letters (omit with --recipe/--list)")
    p.add_argument("--results", required=False, default=None, help="results directory (<experiment>/results) or experiment directory")
    p.add_argument("--recipe", default=None, help="a named query: best, matched-l0, letters, failed, importance")
    p.add_argument("--metric", default=None, help="metric column for best/matched-l0/importance (default absorption.mean_absorption_fraction)")
    p.add_argument("--trial", default=None, help="trial_id for the letters recipe")
    p.add_argument("--format", default="table", help="table, csv or json (default table)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.set_defaults(func=_run_query)


def _run_query(args) -> int:
    from fcsae import query

    if args.list:
        for name, recipe in query.RECIPES.items():
            print(f"{name:12s} {recipe.help}")
        return 0
    if args.format not in ("table", "csv", "json"):
        raise FcsaeInputError(f"--format: must be table, csv or json, got {args.format!r}")
    if not args.results:
        raise FcsaeInputError("--results: required (a sweep's results directory or its experiment directory)")
    if bool(args.sql) == bool(args.recipe):
        raise FcsaeInputError("query: give either SQL or --recipe NAME (not both); see --list")
    if args.recipe and args.recipe not in query.RECIPES:
        raise FcsaeInputError(f"--recipe: unknown recipe {args.recipe!r}; allowed: {', '.join(query.RECIPES)}")
    from results_schema.reader import load_tables

    tables = load_tables(args.results)
    for problem in tables.problems:
        print(f"fcsae: warning: skipped {problem}", file=sys.stderr)
    if args.recipe:
        df = query.run_recipe(tables, args.recipe, metric=args.metric or query.DEFAULT_METRIC, trial=args.trial)
    else:
        df = query.run_sql(tables, args.sql)
    print(query.format_table(df, args.format), end="" if args.format != "table" else "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fcsae`` argument parser with all subcommands."""
    import fcsae

    parser = argparse.ArgumentParser(
        prog="fcsae",
        description="Sparse autoencoders with a frequency-consistency tracker against feature absorption.",
    )
    parser.add_argument("--version", action="version", version=f"fcsae {fcsae.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_harvest, _add_train, _add_eval, _add_query):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fcsae``: bad input prints one line and exits 2."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bars, not glued onto them
            return args.func(args)
    except FcsaeInputError as e:
        print(f"fcsae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fcsae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
