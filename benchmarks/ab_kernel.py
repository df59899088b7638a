"""Two versions of DISeL's kernel module against each other and PEFT LoRA, in one process: whole-model (or, with
``--layer D``, one D x D layer's) training step time, paired and interleaved, and peak step memory.

The baseline is any file holding a version of ``disel/methods/gated_lora/kernels.py``, for example the one
of an earlier commit::

    git show 86e9fd8:src/disel/methods/gated_lora/kernels.py > /tmp/kernels_before.py
    taskset -c 1 python benchmarks/ab_kernel.py --baseline /tmp/kernels_before.py --threads 1
    python benchmarks/ab_kernel.py --baseline /tmp/kernels_before.py --device cuda --dtype bf16  # on a GPU

Both versions run on the same DISeL model (``disel.methods.gated_lora.layer`` is pointed at one module or
the other before each step, outside the clock), LoRA on a copy of the same base, every round in a fresh
random order (:func:`disel.utils.timing.interleaved`); printed: the paired ratios with their 95% intervals
(``current / baseline``, and each against LoRA), the largest gradient difference between the two versions
(they compute the same function: it must be at float rounding), and the peak tensor bytes of one step
(``disel.commands.bench.AllocationPeak``) at each ``--memory-tokens`` count. A baseline whose
``fused_gated_update`` predates a keyword the current layer passes (``base_input``, for dropout on the
whole-layer path) is called without it while it is None; with ``--dropout`` > 0 such a baseline cannot be run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from disel.commands.bench import (
    _model_step_peak,
    _randomise_up,
    _train_step,
    bench_llama,
    build_contenders,
    machine_info,
)
from disel.methods.gated_lora import layer as disel_layer
from disel.utils.threads import torch_threads
from disel.utils.timing import interleaved, ratio_interval

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_kernels(path: Path) -> ModuleType:
    if not path.is_file():
        raise SystemExit(f"--baseline {path} does not exist: pass a copy of kernels.py (see the docstring).")
    spec = importlib.util.spec_from_file_location("disel_kernels_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path} is not a Python file: pass a copy of kernels.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "fused_gated_update"):
        raise SystemExit(f"--baseline {path} has no fused_gated_update: pass a copy of kernels.py.")
    if "base_input" not in inspect.signature(module.fused_gated_update).parameters:
        real = module.fused_gated_update

        def without_base_input(
            *args: object, base_input: torch.Tensor | None = None, **kwargs: object
        ) -> object:
            if base_input is not None:
                raise SystemExit(
                    f"--baseline {path} has no whole-layer kernel with dropout (no base_input): use --dropout 0."
                )
            return real(*args, **kwargs)

        module.fused_gated_update = without_base_input
    return module


def build(
    tokens: int,
    hidden: int,
    layers: int,
    vocab: int,
    r: int,
    dropout: float,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, nn.Module]:
    import peft

    import disel

    torch.manual_seed(0)
    base = bench_llama(hidden, layers, vocab, tokens)
    common = {"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear", "lora_dropout": dropout}
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**common))
    dis = peft.get_peft_model(copy.deepcopy(base), disel.DiselConfig(**common))
    _randomise_up(lora, 1)
    _randomise_up(dis, 1)
    # one dtype for base and adapters (PEFT would keep bf16/fp16 models' adapters in fp32)
    return {"lora": lora.to(device=device, dtype=dtype), "disel": dis.to(device=device, dtype=dtype)}


def step_fn(model: nn.Module, kernels: ModuleType, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        disel_layer.kernels = kernels
        torch.manual_seed(0)  # dropout masks alike for both versions
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def layer_step_fn(
    model: nn.Module, kernels: ModuleType, x: torch.Tensor, grad: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        disel_layer.kernels = kernels
        _train_step(model, x, grad)

    return step


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="A copy of an earlier kernels.py.")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout of both adapters.")
    p.add_argument(
        "--layer", type=int, default=0, help="Time one D x D layer (r, --tokens) instead of the model."
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32 (default), bf16 or fp16.")
    p.add_argument(
        "--memory-tokens", default="256,1024,2048", help="Token counts for the memory peaks ('' skips)."
    )
    p.add_argument("--out", type=Path, help="Also write the result as JSON.")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; use --device cpu.")
    baseline = load_kernels(args.baseline)
    current = disel_layer.kernels
    dev, dtype = args.device, DTYPES[args.dtype]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else None
    result: dict = {"machine": machine_info(), "settings": vars(args) | {"baseline": str(args.baseline)}}
    try:
        with torch_threads(args.threads):
            if args.layer:
                if args.dropout:
                    raise SystemExit(
                        "--layer times the benchmark layer without dropout: leave --dropout at 0."
                    )
                layer = build_contenders(args.layer, args.layer, args.r, dtype, dev)
                models = {"lora": layer["lora"][0], "disel": layer["disel"][0]}
                gen = torch.Generator().manual_seed(10)
                x = torch.randn(args.tokens, args.layer, generator=gen).to(dev, dtype).requires_grad_(True)
                g = torch.randn(args.tokens, args.layer, generator=gen).to(dev, dtype)

                def make(model: nn.Module, kernels: ModuleType) -> Callable[[], None]:
                    return layer_step_fn(model, kernels, x, g)
            else:
                models = build(
                    args.tokens, args.hidden, args.layers, args.vocab, args.r, args.dropout, dev, dtype
                )
                ids = torch.randint(
                    3, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(10)
                ).to(dev)

                def make(model: nn.Module, kernels: ModuleType) -> Callable[[], None]:
                    return step_fn(model, kernels, ids)

            grads = {}
            for name, mod in (("baseline", baseline), ("current", current)):
                make(models["disel"], mod)()
                grads[name] = _grads(models["disel"])
            diff = max((a - b).abs().max().item() for a, b in zip(grads["baseline"], grads["current"]))
            scale = max(g.abs().max().item() for g in grads["current"])
            fns = {
                "lora": make(models["lora"], current),
                "baseline": make(models["disel"], baseline),
                "current": make(models["disel"], current),
            }
            times = interleaved(fns, args.repeats, warmup=2, sync=sync)
            result["max_grad_diff"] = diff
            result["max_grad"] = scale
            result["median_ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            result["ratios"] = {
                "current_vs_baseline": ratio_interval(times["current"], times["baseline"]),
                "current_vs_lora": ratio_interval(times["current"], times["lora"]),
                "baseline_vs_lora": ratio_interval(times["baseline"], times["lora"]),
            }
            print(f"gradients, current vs baseline: max |diff| {diff:.2e} (max |grad| {scale:.2e})")
            what = f"one {args.layer} x {args.layer} layer, r={args.r}" if args.layer else "whole model"
            print(
                f"train step ({what}), {args.tokens} tokens, {args.threads} thread(s), {args.repeats} rounds:"
            )
            for k, iv in result["ratios"].items():
                print(
                    f"  {k:<20} {iv['median']:.3f} [{iv['ci_low']:.3f}, {iv['ci_high']:.3f}] ({iv['ci_level']:.1%} CI)"
                )
            result["peak_mb"] = {}
            for t in [] if args.layer else [int(s) for s in args.memory_tokens.split(",") if s.strip()]:
                ms = build(t, args.hidden, args.layers, args.vocab, args.r, args.dropout, dev, dtype)
                tid = torch.randint(3, args.vocab, (1, t), generator=torch.Generator().manual_seed(10)).to(
                    dev
                )
                row = {}
                for name, m, mod in (("lora", ms["lora"], current), ("baseline", ms["disel"], baseline)):
                    row[name] = _model_step_peak(step_fn(m, mod, tid), dev) / 1e6
                row["current"] = _model_step_peak(step_fn(ms["disel"], current, tid), dev) / 1e6
                result["peak_mb"][t] = row
                print(
                    f"  peak step memory, {t} tokens: LoRA {row['lora']:.1f} MB, baseline {row['baseline']:.1f} MB "
                    f"({row['baseline'] / row['lora']:.3f}x), current {row['current']:.1f} MB "
                    f"({row['current'] / row['lora']:.3f}x)"
                )
    finally:
        disel_layer.kernels = current  # also when a step raised: the library's own module again

    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
