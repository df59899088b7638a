"""``disel toy``: the paper's two-population regression (section 2, appendix I) with its theory.

Trains full fine-tuning, LoRA and DISeL of rank(Δ) on a 50/50 mixture and prints their MSE on each
population beside the best fixed correction (analytic) and the Bayes-optimal gated correction (Monte
Carlo). ``--sweep`` repeats LoRA and DISeL over several separations of the means. See docs/toy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.toy import DEFAULT_SWEEP, ToyConfig

    d = ToyConfig()
    p.add_argument(
        "--task",
        choices=["gated", "nonlinear"],
        default="gated",
        help="'gated' (default): the paper's section-2 regression. 'nonlinear': the Queryable LoRA paper's noisy "
        "non-linear regression, LoRA vs DISeL vs Queryable LoRA at equal trainable parameters (uses --seed, "
        "--out, --json).",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"Seed of problem, data and inits (default {d.seed})."
    )
    p.add_argument("--out", type=Path, default=None, help="Write toy.json and toy.png (or toy_sweep.*) here.")
    p.add_argument(
        "--json", action="store_true", help="Print one JSON object on stdout instead of the table."
    )
    p.add_argument(
        "--separation",
        type=float,
        default=d.separation,
        help=f"Distance between the two means, in units of the shared covariance (default {d.separation:g}).",
    )
    p.add_argument("--dim", type=int, default=d.dim, help=f"Input dimension d (default {d.dim}).")
    p.add_argument("--out-dim", type=int, default=d.out_dim, help=f"Output dimension (default {d.out_dim}).")
    p.add_argument("--rank", type=int, default=d.rank, help=f"rank(Δ) = LoRA/DISeL rank (default {d.rank}).")
    p.add_argument(
        "--samples",
        type=int,
        default=d.samples,
        help=f"Training inputs per population (default {d.samples}).",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=d.eval_samples,
        help=f"Fresh evaluation / Monte Carlo inputs per population (default {d.eval_samples}).",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"Full-batch AdamW steps (default {d.steps}).")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Learning rate of the weights (default {d.lr:g}).")
    p.add_argument(
        "--gate-lr", type=float, default=d.gate_lr, help=f"Gate learning rate (default {d.gate_lr:g})."
    )
    p.add_argument(
        "--gate-bias-init",
        type=float,
        default=d.gate_bias_init,
        help=f"Initial DISeL gate bias (default {d.gate_bias_init:g}).",
    )
    p.add_argument(
        "--gate-delay",
        type=float,
        default=d.gate_delay,
        help=f"Fraction of the steps before the gates start to learn (default {d.gate_delay:g}).",
    )
    p.add_argument(
        "--covariance",
        choices=("identity", "random"),
        default=d.covariance,
        help="Shared input covariance: identity (default) or a random SPD matrix (eigenvalues 0.5-2).",
    )
    p.add_argument(
        "--no-mirror",
        action="store_true",
        help="Draw the PT training inputs independently instead of as mirror images of the FT inputs.",
    )
    p.add_argument(
        "--sweep",
        nargs="?",
        const=",".join(f"{s:g}" for s in DEFAULT_SWEEP),
        default=None,
        metavar="S1,S2,...",
        help="Sweep the separation (default list: %(const)s) and plot mixture MSE against it; "
        "trains LoRA and DISeL at each value.",
    )


def _config(args: argparse.Namespace):
    from ..experiments.toy import ToyConfig

    return ToyConfig(
        dim=args.dim,
        out_dim=args.out_dim,
        rank=args.rank,
        separation=args.separation,
        samples=args.samples,
        eval_samples=args.eval_samples,
        steps=args.steps,
        lr=args.lr,
        gate_lr=args.gate_lr,
        gate_bias_init=args.gate_bias_init,
        gate_delay=args.gate_delay,
        covariance=args.covariance,
        mirror=not args.no_mirror,
        seed=args.seed,
    ).validate()


def _parse_separations(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--sweep {text!r} is not a comma-separated list of numbers: pass e.g. --sweep 1,2,3."
        ) from None
    if not values:
        raise UserError("--sweep got no separations: pass e.g. --sweep 1,2,3.")
    return values


def _check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: pass a directory path.")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..experiments import toy
    from ..utils.io import atomic_write_json

    if args.task == "nonlinear":
        return _run_nonlinear(args)
    cfg = _config(args)
    _check_out(args.out)
    t0 = time.perf_counter()
    if args.sweep is not None:
        seps = _parse_separations(args.sweep)
        for s in seps:
            replace(cfg, separation=s).validate()
        result = toy.run_sweep(cfg, seps, progress=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            result["figure"] = str(toy.plot_sweep(result, args.out / "toy_sweep.png"))
            atomic_write_json(args.out / "toy_sweep.json", result)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            cols = ["separation", "best_fixed", "bayes", *result["methods"], "gate_correlation"]
            print("| " + " | ".join(cols) + " |")
            print("|" + "---:|" * len(cols))
            for row in result["sweep"]:
                print("| " + " | ".join(f"{row[c]:.4g}" for c in cols) + " |")
    else:
        result = toy.run_toy(cfg, progress=True)
        _emit(args, result, "toy", toy.plot_bars, toy.format_table)
        if not args.json:
            g = result["gates"]
            print(
                f"\nDISeL gates vs Bayes gate p(FT|x) on fresh inputs: Pearson {g['pearson_mean']:.4f} "
                f"(min {g['pearson_min']:.4f}); cosine(W_g rows, w) = "
                + ", ".join(f"{c:.3f}" for c in g["cosine_w"])
            )
    print(f"disel toy: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _run_nonlinear(args: argparse.Namespace) -> int:
    from ..experiments import nonlinear
    from ..utils.threads import torch_threads

    _check_out(args.out)
    with torch_threads(1):  # tiny matmuls: one thread is fastest and keeps runs bit-identical
        result = nonlinear.run_nonlinear(nonlinear.NonlinearConfig(seed=args.seed), progress=not args.json)
    wall = result.pop("wall_seconds")
    _emit(args, result, "nonlinear", nonlinear.plot, nonlinear.format_table)
    print(f"wall time {wall:.1f} s", file=sys.stderr)
    return 0


def _emit(args: argparse.Namespace, result: dict, stem: str, plot, table) -> None:
    """Write STEM.png/.json/.md under --out (atomically) and print the JSON or the table."""
    from ..utils.io import atomic_write_json, atomic_write_text

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result["figure"] = str(plot(result, args.out / f"{stem}.png"))
        atomic_write_json(args.out / f"{stem}.json", result)
        atomic_write_text(args.out / f"{stem}.md", table(result) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
