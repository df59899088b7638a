"""``disel methods``: list the registered methods."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="Print a JSON object name -> description.")


def run(args: argparse.Namespace) -> int:
    from ..methods import available_methods

    methods = available_methods()
    if args.json:
        print(json.dumps({n: s.description for n, s in sorted(methods.items())}, indent=2))
        return 0
    width = max(len(n) for n in methods)
    for name, spec in sorted(methods.items()):
        print(f"{name:<{width}}  {spec.description}")
    return 0
