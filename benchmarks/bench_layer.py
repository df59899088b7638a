"""Layer-level benchmark: DISeL (fused) vs PEFT LoRA (unmerged, merged), DoRA and the naive gated layer.

For each shape, times training steps (forward + backward) and inference forwards of every contender in one
process, interleaved over rounds, and measures training memory; prints a table of ratios vs LoRA and
writes everything as JSON (and a markdown table) to --out-dir.

    python benchmarks/bench_layer.py                    # CPU fp32 grid, plus CUDA bf16 when present
    python benchmarks/bench_layer.py --shapes main      # only d=2048, r=64, 2048 tokens
    python benchmarks/bench_layer.py --threads 1        # fewer threads: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from disel.commands.bench import benchmark_layer, format_table, headline, machine_info
from disel.utils.io import atomic_write_json, atomic_write_text
from disel.utils.timing import format_interval

# (d, r, tokens): small to Llama-7B-like (d = 4096, r up to 256, several thousand tokens)
SHAPES = {
    "small": [(512, 16, 512)],
    "main": [(2048, 64, 2048)],
    "grid": [(512, 16, 512), (1024, 32, 1024), (2048, 16, 2048), (4096, 64, 2048)],
    "llama7b": [(4096, 16, 4096), (4096, 64, 4096), (4096, 256, 4096)],
}


def markdown(rows: list[dict]) -> str:
    head = (
        "| device | dtype | d | r | tokens | train DISeL/LoRA | train naive/LoRA | train DoRA/LoRA "
        "| infer DISeL/LoRA | infer naive/LoRA | infer merged-LoRA/LoRA | memory DISeL/LoRA | memory naive/LoRA |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def cell(v: dict) -> str:  # median paired ratio [95% confidence interval]
        return format_interval(v["interval"])

    lines = []
    for res in rows:
        s, t, i, m = res["shape"], res["train"], res["infer"], res["memory"]
        lines.append(
            f"| {s['device']} | {s['dtype']} | {s['d_in']} | {s['r']} | {s['tokens']} | {cell(t['disel'])} "
            f"| {cell(t['naive'])} | {cell(t['dora'])} | {cell(i['disel'])} | {cell(i['naive'])} "
            f"| {cell(i['lora_merged'])} | {m['disel']['ratio']:.3f} | {m['naive']['ratio']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="grid")
    p.add_argument(
        "--shape", default=None, help="One custom shape D,R,TOKENS instead of --shapes (e.g. 4096,256,4096)."
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    if args.shape:
        d, r, t = (int(v) for v in args.shape.split(","))
        shapes, tag = [(d, r, t)], f"d{d}_r{r}_t{t}"
    else:
        shapes, tag = SHAPES[args.shapes], args.shapes
    jobs = [(dev, shape) for dev in devices for shape in shapes]
    for dev, (d, r, tokens) in tqdm(jobs, desc="shapes", file=sys.stderr):
        res = benchmark_layer(
            d_in=d,
            r=r,
            tokens=tokens,
            device=dev,
            dtype="fp32" if dev == "cpu" else "bf16",
            repeats=args.repeats,
        )
        res["summary"] = headline(res)
        rows.append(res)
        print(format_table(res), flush=True)
    out = Path(args.out_dir)
    atomic_write_json(out / f"layer_{tag}.json", {"machine": machine_info(), "results": rows})
    atomic_write_text(out / f"layer_{tag}.md", markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
