"""Entry points ``fcsae-sweep`` and ``fcsae-report``: parsing only.

Ray is imported lazily by the driver, so ``--help`` and validation errors are fast.
"""

from __future__ import annotations

import sys


def sweep_main(argv: list[str] | None = None) -> int:
    """``fcsae-sweep --space FILE``: run (or resume) a sweep."""
    print("fcsae-sweep: not yet implemented", file=sys.stderr)
    return 2


def report_main(argv: list[str] | None = None) -> int:
    """``fcsae-report RESULTS_DIR``: write a report of a sweep."""
    print("fcsae-report: not yet implemented", file=sys.stderr)
    return 2
