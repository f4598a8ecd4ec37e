"""Entry point ``fcsae-sweep``: parsing only (``fcsae-report`` lives in ``fcsae.report.cli``, Ray-free).

Ray is imported lazily by the driver, so ``--help`` and validation errors are fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from fcsae.errors import FcsaeInputError
from fcsae.storage import location


def build_sweep_parser() -> argparse.ArgumentParser:
    """The ``fcsae-sweep`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fcsae-sweep",
        description="Run a sweep of fcsae trials (Ray Tune + Optuna) from a search-space YAML; results land as one "
        "Parquet row per trial in <experiment>/results/. See docs/sweeps.md.",
    )
    p.add_argument("--space", required=True, help="search-space YAML (see docs/sweeps.md)")
    p.add_argument("--experiment-dir", default=None,
                   help="experiment directory or storage URI (default: <storage>/<space name>)")
    p.add_argument("--storage", default=None,
                   help="root for experiments: a directory (default ./experiments) or any pyarrow filesystem URI "
                   "(s3://bucket/prefix); on a cluster, storage every node sees")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else a private local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an existing experiment (a complete one just prints "
                   "its table again)")
    g.add_argument("--restart", action="store_true", help="delete an existing experiment's sweep outputs (results, trials, Ray state) and "
                   "start over; other files there (a report, your notes) stay")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished trial's training checkpoint (default: deleted once its row is written; "
                   "the SAE always stays)")
    p.add_argument("--fail-fast", action="store_true", help="stop the whole sweep at the first failed trial (debugging)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a trial whose worker or node died, from its last checkpoint (default 2)")
    p.add_argument("--no-live", action="store_true", help="log one line per finished trial instead of a live table")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


class _Aborted(Exception):
    """The user declined to resume or restart an existing experiment."""


def _choose_mode(args, root: Path) -> str:
    from orchestrator.trainable import ExperimentPaths

    if args.resume:
        return "resume"
    if args.restart:
        return "restart"
    if not ExperimentPaths(root).sweep_file.exists():
        return "new"
    if not sys.stdin.isatty():
        raise FcsaeInputError(f"{root}: experiment exists; pass --resume to continue it or --restart to start over")
    answer = input(f"{root} exists. [r]esume, [s]tart over, or [a]bort? ").strip().lower()
    if answer.startswith("r"):
        return "resume"
    if answer.startswith("s"):
        return "restart"
    raise _Aborted()


def _print_summary(spec, root: Path) -> None:
    from fcsae.report.summary import arm_keys, summary_text
    from orchestrator.trainable import ExperimentPaths
    from results_schema.reader import scan_results

    rows = scan_results(ExperimentPaths(root).results).collect()
    # Print the follow-up commands the way this one was called (`.venv/bin/fcsae-sweep` -> `.venv/bin/fcsae-report`).
    prefix = ""
    if "/" in sys.argv[0]:
        bin_dir = Path(sys.argv[0]).parent
        with contextlib.suppress(ValueError):
            bin_dir = bin_dir.resolve().relative_to(Path.cwd().resolve())
        prefix = f"{bin_dir}/"
    print(summary_text(rows, arm_keys(spec.grid_names, rows), root, prefix))


def sweep_main(argv: list[str] | None = None) -> int:
    """``fcsae-sweep --space FILE``: run (or resume) a sweep; bad input prints one message and exits 2."""
    args = build_sweep_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = None
    try:
        from orchestrator import driver, space

        if args.num_cpus is not None and args.num_cpus < 1:
            raise FcsaeInputError(f"--num-cpus: must be >= 1, got {args.num_cpus}")
        if args.max_failures < 0:
            raise FcsaeInputError(f"--max-failures: must be >= 0, got {args.max_failures}")
        if args.address and args.num_cpus:
            raise FcsaeInputError("--num-cpus: only for a local cluster, not with --address")
        joining = bool(args.address or os.environ.get("RAY_ADDRESS"))
        spec = space.load_space(args.space, check_machine=not joining)
        root = location(args.experiment_dir) if args.experiment_dir else driver.default_experiment_dir(spec, args.storage)
        mode = _choose_mode(args, root)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # the driver's harvest bar and its log lines stay on separate lines
            outcome = driver.run_sweep(spec, root, mode=mode, address=args.address, num_cpus=args.num_cpus,
                                       fail_fast=args.fail_fast, live=False if args.no_live else None,
                                       max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints)
    except FcsaeInputError as e:
        print(f"fcsae-sweep: error: {e}", file=sys.stderr)
        return 2
    except _Aborted:
        print("fcsae-sweep: aborted; nothing changed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fcsae-sweep: interrupted", file=sys.stderr)
        if root is not None:
            print(f"resume with: fcsae-sweep --space {args.space} --experiment-dir {root} --resume", file=sys.stderr)
        return 130
    c = outcome.counts
    print(f"sweep {outcome.sweep_id}: {c['ok']} ok, {c['failed']} failed, {c['pruned']} pruned of {c['total']} trials; "
          f"results in {root / 'results'}")
    if c["ok"] + c["failed"] + c["pruned"]:
        _print_summary(spec, root)
    if not outcome.complete and not (args.fail_fast and c["failed"]):
        print(f"sweep incomplete; resume with: fcsae-sweep --space {args.space} --experiment-dir {root} --resume",
              file=sys.stderr)
        return 130
    if c["failed"]:  # like Ray Tune's raise_on_failed_trial: scripts and CI must notice
        print(f"fcsae-sweep: {c['failed']} of {c['total']} trials failed; see failure_reason in {root / 'results'}",
              file=sys.stderr)
        return 1
    return 0
