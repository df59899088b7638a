"""`disel report RESULTS`: trade-off plot, retention over checkpoints and a markdown table."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", help="Results store: a .sqlite file or the directory that holds results.sqlite."
    )
    parser.add_argument("--out", default=None, help="Output directory (default: <store dir>/report).")


def run(args: argparse.Namespace) -> int:
    from ..report import make_report

    files = make_report(args.results, args.out)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
