"""Model-level benchmark: a causal LM with adapters on every linear layer, every variant in one process.

Training step (causal-LM loss, forward + backward), forward and greedy generation with the KV cache of the
frozen base, PEFT LoRA (unmerged, merged), DoRA, DISeL, a compacted DISeL adapter and the compacted adapter
with its static part merged; interleaved rounds, median paired ratios vs unmerged LoRA with 95% confidence
intervals; training-step peak memory. This is ``disel bench --model`` with the model's shape as options
(nothing is downloaded: ``--hidden/--layers/--vocab`` build a random Llama-style model from a config).

    python benchmarks/bench_model.py                                   # tiny-llama: hidden 512, 4 layers
    python benchmarks/bench_model.py --hidden 1024 --layers 2 --vocab 2048 --r 64 --tokens 512
    python benchmarks/bench_model.py --model path/to/local/model --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from disel.commands.bench import MODEL_PRESETS, bench_llama, benchmark_model, format_model_table
from disel.utils.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help=f"{' | '.join(MODEL_PRESETS)} | a model directory.")
    p.add_argument("--hidden", type=int, default=None, help="Random Llama of this width (with --layers).")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--closed", type=float, default=0.5)
    p.add_argument("--open", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/model_<...>.json).")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model: str | torch.nn.Module = args.model
    tag = Path(args.model).name
    if args.hidden:
        torch.manual_seed(0)
        model = bench_llama(args.hidden, args.layers, args.vocab, args.tokens)
        tag = f"llama_h{args.hidden}_l{args.layers}"
    res = benchmark_model(
        model=model,
        r=args.r,
        tokens=args.tokens,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        dtype="fp32" if args.device == "cpu" else "bf16",
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        closed=args.closed,
        opened=args.open,
    )
    print(format_model_table(res))
    out = args.out or f"benchmarks/results/model_{tag}_{args.device}_threads{torch.get_num_threads()}.json"
    atomic_write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
