"""`disel sweep CONFIG`: every grid point of the config, trained once, resumable after a crash."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="YAML config with a grid: section (e.g. grid: {method: [lora, disel]})."
    )
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="Overrides as for `disel train` (--set training.lr=1e-4); --no-eval skips evaluation; "
        "--list prints the run ids and exits; --no-progress hides progress bars.",
    )


def run(args: argparse.Namespace) -> int:
    from ..experiments.sweep import expand_grid, run_sweep
    from ..training.config import load_config, parse_override_args

    overrides, rest = parse_override_args(list(args.overrides or []))
    flags = {"--no-eval", "--list", "--no-progress"}
    unknown = [t for t in rest if t not in flags]
    if unknown:
        raise UserError(
            f"Unknown argument {unknown[0]!r}: use --set KEY=VALUE, --no-eval, --list or --no-progress."
        )
    cfg = load_config(args.config, overrides)
    if "--list" in rest:
        for rc in expand_grid(cfg):
            print(rc.run_id)
        return 0
    s = run_sweep(cfg, progress="--no-progress" not in rest, run_eval="--no-eval" not in rest)
    print(
        f"sweep: {s.total} runs, {len(s.trained)} trained now, {len(s.skipped)} already finished, "
        f"{len(s.evaluated)} evaluated; results in {cfg.results_path}"
    )
    return 0
