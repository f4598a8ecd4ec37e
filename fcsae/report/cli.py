"""Entry point ``fcsae-report``: parsing only. Needs polars and matplotlib, not Ray (reports are built anywhere)."""

from __future__ import annotations

import argparse
import logging
import sys

from fcsae.errors import FcsaeInputError


def build_parser() -> argparse.ArgumentParser:
    """The ``fcsae-report`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fcsae-report",
        description="Write a self-contained report of a sweep (report.md, report.html, figures/*.png, tables/*.csv): "
        "best trials, baseline vs split criteria, Pareto fronts, parameter effects, per-letter absorption, split "
        "events. Works on running or interrupted sweeps. See docs/report.md.",
    )
    p.add_argument("results", help="the sweep's results directory (<experiment>/results) or its experiment directory")
    p.add_argument("--out", default=None, help="output directory (default <experiment>/report); an earlier report there is replaced, files it did not write are kept")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fcsae-report RESULTS_DIR [--out DIR]``: write a sweep's report; exit 2 only when nothing can be built."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from fcsae.report.build import build_report  # lazy: --help stays fast

        result = build_report(args.results, args.out)
    except FcsaeInputError as e:
        print(f"fcsae-report: error: {e}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(f"fcsae-report: warning: {problem}", file=sys.stderr)
    state = " (PARTIAL: sweep running or interrupted)" if result.partial else ""
    print(f"report{state}: {result.markdown} ({len(result.figures)} figures; also {result.html.name})")
    return 0
