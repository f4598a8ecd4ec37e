"""The ``fcsae`` command: parsing only; the work lives in the library modules.

Subcommands: ``prepare`` (offline assets), ``harvest`` (activation cache),
``train`` (one SAE), ``eval`` (score a saved SAE), ``query`` (results tables).
Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``.
Bad input raises ``FcsaeInputError``; ``main`` prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


def _add_harvest(sub) -> None:
    from fcsae.config import DEFAULT_LAYER, DEFAULT_MODEL

    p = sub.add_parser(
        "harvest",
        help="run the model once and cache residual-stream activations on disk",
        description="Harvest activations at blocks.LAYER.hook_resid_post into sharded files under "
        "$FCSAE_HOME/activations. A second harvest with the same key is a cache hit; an interrupted "
        "one resumes from its last complete shard.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model short name, HF/TransformerLens name or local dir (default {DEFAULT_MODEL})")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help=f"residual layer (default {DEFAULT_LAYER})")
    p.add_argument("--tokens", type=int, default=200_000, help="activation vectors to store (default 200000)")
    p.add_argument("--corpus", default="offline", help="'offline', a local text/parquet/json file, or a datasets hub name")
    p.add_argument("--context-len", type=int, default=128, help="tokens per packed context (default 128)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_run_harvest)


def _run_harvest(args) -> int:
    from fcsae import activations
    from fcsae.config import HarvestConfig, LMConfig

    cfg = HarvestConfig(
        lm=LMConfig(model=args.model, layer=args.layer, device=args.device),
        corpus=args.corpus, tokens=args.tokens, context_len=args.context_len,
    )
    path = activations.harvest(cfg)
    print(path)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one SAE on cached activations")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    raise FcsaeInputError("train: not yet implemented")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a saved SAE (core metrics and first-letter absorption)")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    raise FcsaeInputError("eval: not yet implemented")


def _add_query(sub) -> None:
    p = sub.add_parser("query", help="query a sweep's result tables with polars")
    p.set_defaults(func=_run_query)


def _run_query(args) -> int:
    raise FcsaeInputError("query: not yet implemented")


def build_parser() -> argparse.ArgumentParser:
    """The ``fcsae`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="fcsae",
        description="Sparse autoencoders with a frequency-consistency tracker against feature absorption.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_harvest, _add_train, _add_eval, _add_query):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fcsae``: bad input prints one line and exits 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FcsaeInputError as e:
        print(f"fcsae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fcsae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
