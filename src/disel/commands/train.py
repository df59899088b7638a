"""`disel train CONFIG [--set key=value ...] [--key value ...]`: one fine-tuning run from a YAML config."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (sections: model, method, data, training, eval, output).")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="Overrides: --set training.lr=1e-4, --training.lr 1e-4 or --method.rank=16; "
        "--print-config shows the resolved config and exits; --no-progress hides the progress bar; "
        "--dry-run trains the config for 2 steps with a tiny model and generated data (no download).",
    )


def run(args: argparse.Namespace) -> int:
    from ..training.config import dump_yaml, load_config, parse_override_args
    from ..training.runner import train

    overrides, rest = parse_override_args(list(args.overrides or []))
    flags = {"--print-config", "--no-progress", "--dry-run"}
    unknown = [t for t in rest if t not in flags]
    if unknown:
        raise UserError(f"Unknown argument {unknown[0]!r}: use --set KEY=VALUE or --section.key VALUE.")
    cfg = load_config(args.config, overrides)
    if "--print-config" in rest:
        print(dump_yaml(cfg), end="")
        return 0
    if cfg.grid:
        print("disel train: the config's grid is ignored (use `disel sweep` to run it).")
    if "--dry-run" in rest:
        import tempfile

        from ..training.dryrun import dry_run_config

        with tempfile.TemporaryDirectory(prefix="disel-dry-run-") as tmp:
            result = train(dry_run_config(cfg, tmp), progress="--no-progress" not in rest)
            print(f"dry run {result.status}: {result.global_step} steps, loss {result.train_loss:.4f}")
        return 0
    result = train(cfg, progress="--no-progress" not in rest)
    print(f"{result.status}: {result.run_dir}")
    return 0
