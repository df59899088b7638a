"""Model-level benchmark: a randomly initialised Llama-style decoder with adapters on every linear layer.

Times training steps (causal-LM loss, forward + backward) and inference forwards of DISeL (fused), the naive
gated layer, PEFT LoRA (unmerged / merged) and DoRA, interleaved in one process; measures training memory
(parameters + gradients + unique saved-for-backward storages, and CUDA peak when on GPU). Nothing is
downloaded: the model is built from a config.

    python benchmarks/bench_model.py --hidden 1024 --layers 2 --tokens 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from disel.commands.bench import (
    _interleave,
    _runner,
    _summary,
    adapt_contenders,
    add_llama_arguments,
    bench_llama,
    machine_info,
    saved_bytes,
)
from disel.utils.io import atomic_write_json


def build(
    args: argparse.Namespace, device: str, dtype: torch.dtype
) -> dict[str, tuple[torch.nn.Module, bool]]:
    torch.manual_seed(0)
    base = bench_llama(args.hidden, args.layers, args.vocab, args.tokens).to(device=device, dtype=dtype)
    return adapt_contenders(base, args.r, "all-linear")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_arguments(p, tokens=512)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="benchmarks/results/model.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    models = build(args, device, dtype)
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(
        device
    )

    def train_step(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()

    def forward(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(input_ids=ids)

    train_names = ("lora", "dora", "naive", "disel")
    res: dict = {
        "shape": {**vars(args), "dtype": str(dtype)},
        "machine": machine_info(),
    }
    for mode, names, fn in (("train", train_names, train_step), ("infer", tuple(models), forward)):
        runners = {
            n: _runner(models[n][0], models[n][1], (lambda m=models[n][0], fn=fn: fn(m)), device)
            for n in names
        }
        print(f"{mode}: {args.repeats} interleaved rounds", file=sys.stderr)
        times = _interleave(runners, args.repeats, warmup=1)
        res[mode] = _summary(times, "lora")
    mem = {}
    for n in tqdm(train_names, desc="memory", file=sys.stderr):
        m, ref = models[n]
        mem[n] = saved_bytes(m, ids, ref)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            runner = _runner(m, ref, (lambda m=m: train_step(m)), device)
            runner()
            mem[n]["cuda_peak"] = torch.cuda.max_memory_allocated() - start
    res["memory"] = {n: {**v, "ratio": v["total"] / mem["lora"]["total"]} for n, v in mem.items()}
    if device == "cuda":
        for n in mem:
            res["memory"][n]["cuda_peak_ratio"] = mem[n]["cuda_peak"] / mem["lora"]["cuda_peak"]
    for mode in ("train", "infer"):
        for n, v in res[mode].items():
            extra = f"  memory x LoRA {res['memory'][n]['ratio']:.3f}" if mode == "train" else ""
            print(
                f"{mode:<6}{n:<12}{v['median_s'] * 1e3:9.1f} ms  x LoRA {v['ratio']:.3f} "
                f"[{v['ratio_q25']:.3f}, {v['ratio_q75']:.3f}]{extra}"
            )
    atomic_write_json(args.out, res)
    print(f"wrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
