"""`disel report RESULTS`: trade-off plot, retention over checkpoints and a markdown table.

The table's notes (a run evaluated without a target, a run whose evaluation is incomplete) are printed
too, to stderr, one line each.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", help="Results store: a .sqlite file or the directory that holds results.sqlite."
    )
    parser.add_argument("--out", default=None, help="Output directory (default: <store dir>/report).")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..report import make_report

    files = make_report(args.results, args.out, log=lambda line: print(f"note: {line}", file=sys.stderr))
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
