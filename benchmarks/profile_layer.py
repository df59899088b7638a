"""Where the time of one layer's training step goes: torch.profiler tables for LoRA, DISeL and the naive layer.

python benchmarks/profile_layer.py --d 2048 --r 64 --tokens 2048
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from disel.commands.bench import _train_step, build_contenders
from disel.methods.gated_lora import kernels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contenders = build_contenders(args.d, args.d, args.r, torch.float32, "cpu")
    x = torch.randn(args.tokens, args.d, requires_grad=True)
    grad = torch.randn(args.tokens, args.d)
    for name in ("lora", "disel", "naive"):
        model, reference = contenders[name]
        ctx = kernels.reference_path() if reference else contextlib.nullcontext()
        with ctx:
            _train_step(model, x, grad)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    _train_step(model, x, grad)
        print(f"\n=== {name}: {args.steps} training steps, d={args.d} r={args.r} tokens={args.tokens} ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
