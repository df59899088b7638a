"""``disel bench``: time one DISeL layer against PEFT LoRA, DoRA and a naive gated layer on this machine.

The contenders wrap the same frozen ``nn.Linear`` (d_in -> d_out, no bias) with PEFT:

* ``lora``: PEFT LoRA, unmerged;  ``lora_merged``: the same adapter merged (inference only);
* ``dora``: PEFT DoRA;  ``disel``: DISeL with the fused kernel;
* ``naive``: DISeL through the reference module path (lora_A(x), sigmoid(gate(x)), product, lora_B).

Timings are interleaved (every round runs every contender once, in a rotating order) and summarised by
medians; the ratios that matter are the per-round paired ratios ``t_contender / t_lora``, whose median and
inter-quartile range are reported. Memory is measured without tracemalloc: parameters + gradients + the
unique storages saved for backward (``torch.autograd.graph.saved_tensors_hooks``), and on CUDA also
``torch.cuda.max_memory_allocated`` over one training step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UserError

TRAIN_CONTENDERS = ("lora", "dora", "naive", "disel")
INFER_CONTENDERS = ("lora", "lora_merged", "dora", "naive", "disel")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version and GPU name: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    return info


def build_contenders(
    d_in: int, d_out: int, r: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (model, use_reference_path). Every adapter gets non-zero U so all paths do real work."""
    torch.manual_seed(seed)
    base = _OneLinear(d_in, d_out).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    return adapt_contenders(base, r, ["proj"])


def add_llama_arguments(p: argparse.ArgumentParser, tokens: int = 512) -> None:
    """The shape options of :func:`bench_llama` and the adapter rank, shared by the model benchmarks."""
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--tokens", type=int, default=tokens)


def bench_llama(hidden: int, layers: int, vocab: int, tokens: int) -> nn.Module:
    """A randomly initialised Llama-style model of the given width and depth, for speed measurements only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),  # Llama-2-7B's ratio (11008 / 4096)
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=max(2048, tokens),
    )
    return LlamaForCausalLM(cfg)


def adapt_contenders(
    base: nn.Module, r: int, target_modules: str | list[str]
) -> dict[str, tuple[nn.Module, bool]]:
    """LoRA, DoRA, DISeL (fused), DISeL through the naive module path and merged LoRA, each on a copy of
    ``base``: name -> (model, use_reference_path)."""
    import peft

    import disel

    common = {"r": r, "lora_alpha": 2 * r, "target_modules": target_modules, "lora_dropout": 0.0}
    configs = {
        "lora": peft.LoraConfig(**common),
        "dora": peft.LoraConfig(**common, use_dora=True),
        "disel": disel.DiselConfig(**common),
    }
    out: dict[str, tuple[nn.Module, bool]] = {}
    for name, cfg in configs.items():
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.02)
        out[name] = (model, False)
    out["naive"] = (out["disel"][0], True)
    merged = copy.deepcopy(out["lora"][0])
    merged.merge_adapter()
    out["lora_merged"] = (merged, False)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _train_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model(x).backward(grad)


def _runner(model: nn.Module, reference: bool, fn: Callable[[], None], device: str) -> Callable[[], float]:
    from ..methods.gated_lora import kernels

    def run() -> float:
        _sync(device)
        if reference:
            with kernels.reference_path():
                t0 = time.perf_counter()
                fn()
                _sync(device)
                return time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    return run


def _summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    out = {}
    base = times[baseline]
    for name, ts in times.items():
        paired = sorted(t / b for t, b in zip(ts, base))
        q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
        out[name] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "ratio": statistics.median(paired),
            "ratio_q25": q[0],
            "ratio_q75": q[2],
            "ratio_of_medians": statistics.median(ts) / statistics.median(base),
        }
    return out


def _interleave(runners: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        order = names[k:] + names[:k]  # rotate so no contender always runs first (or last)
        if i % 2:
            order.reverse()
        for n in order:
            times[n].append(runners[n]())
    return times


def saved_bytes(model: nn.Module, x: torch.Tensor, reference: bool = False) -> dict[str, int]:
    """Bytes of one training step: parameters, gradients of trainable ones, unique saved-for-backward storages.

    Saved tensors are deduplicated by storage, and storages that belong to parameters (or to x) are not
    counted twice; x itself is counted once as an activation for every contender alike.
    """
    from ..methods.gated_lora import kernels

    params = list(model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ctx = kernels.reference_path() if reference else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    acts = sum(seen.values())
    return {
        "params": param_bytes,
        "grads": grad_bytes,
        "saved": acts,
        "total": param_bytes + grad_bytes + acts,
    }


def _cuda_peak(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, reference: bool) -> int:
    from ..methods.gated_lora import kernels

    ctx = kernels.reference_path() if reference else contextlib.nullcontext()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with ctx:
        _train_step(model, x, grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def benchmark_layer(
    d_in: int = 2048,
    d_out: int | None = None,
    r: int = 64,
    tokens: int = 2048,
    dtype: str = "fp32",
    device: str = "cpu",
    repeats: int = 15,
    warmup: int = 2,
    train: bool = True,
    infer: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and measure one shape; returns a JSON-able dict with times, ratios vs LoRA and memory."""
    d_out = d_in if d_out is None else d_out
    if dtype not in _DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}.")
    for name, v in (("d_in", d_in), ("d_out", d_out), ("r", r), ("tokens", tokens), ("repeats", repeats)):
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Device {device!r} was asked for but CUDA is not available; use --device cpu.")
    tdtype = _DTYPES[dtype]
    contenders = build_contenders(d_in, d_out, r, tdtype, device, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=tdtype)
    grad = torch.randn(tokens, d_out, generator=gen).to(device=device, dtype=tdtype)
    result: dict[str, Any] = {
        "shape": {"d_in": d_in, "d_out": d_out, "r": r, "tokens": tokens, "dtype": dtype, "device": device},
        "repeats": repeats,
        "machine": machine_info(),
    }
    if train:
        xt = x.clone().requires_grad_(True)
        runners = {
            n: _runner(m, ref, (lambda m=m: _train_step(m, xt, grad)), device)
            for n, (m, ref) in contenders.items()
            if n in TRAIN_CONTENDERS
        }
        times = _interleave(runners, repeats, warmup)
        result["train"] = _summary(times, "lora")
        mem = {n: saved_bytes(contenders[n][0], xt, contenders[n][1]) for n in TRAIN_CONTENDERS}
        result["memory"] = {
            n: {
                **v,
                "ratio": v["total"] / mem["lora"]["total"],
                "saved_ratio": v["saved"] / mem["lora"]["saved"],
            }
            for n, v in mem.items()
        }
        if device.startswith("cuda"):
            peaks = {n: _cuda_peak(contenders[n][0], xt, grad, contenders[n][1]) for n in TRAIN_CONTENDERS}
            result["cuda_peak"] = {n: {"bytes": v, "ratio": v / peaks["lora"]} for n, v in peaks.items()}
    if infer:

        def forward(m: nn.Module) -> None:
            with torch.no_grad():
                m(x)

        runners = {
            n: _runner(m, ref, (lambda m=m: forward(m)), device)
            for n, (m, ref) in contenders.items()
            if n in INFER_CONTENDERS
        }
        result["infer"] = _summary(_interleave(runners, repeats, warmup), "lora")
    return result


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The flat summary ``disel bench --json`` prints: DISeL's and the naive layer's ratios vs LoRA."""
    out: dict[str, Any] = {}
    for who, prefix in (("disel", ""), ("naive", "naive_")):
        if "train" in res:
            t = res["train"][who]
            out[f"{prefix}train_ratio_vs_lora"] = t["ratio"]
            out[f"{prefix}train_ratio_iqr"] = [t["ratio_q25"], t["ratio_q75"]]
        if "infer" in res:
            t = res["infer"][who]
            out[f"{prefix}infer_ratio_vs_lora"] = t["ratio"]
            out[f"{prefix}infer_ratio_iqr"] = [t["ratio_q25"], t["ratio_q75"]]
        if "memory" in res:
            out[f"{prefix}memory_ratio_vs_lora"] = res["memory"][who]["ratio"]
    if "infer" in res:
        out["infer_ratio_vs_merged_lora"] = (
            res["infer"]["disel"]["median_s"] / res["infer"]["lora_merged"]["median_s"]
        )
    out["shape"] = res["shape"]
    out["repeats"] = res["repeats"]
    out["machine"] = res["machine"]
    return out


def format_table(res: dict[str, Any]) -> str:
    """A plain-text table: median time, paired ratio vs LoRA and its inter-quartile range, memory ratio."""
    s = res["shape"]
    lines = [
        f"shape d_in={s['d_in']} d_out={s['d_out']} r={s['r']} tokens={s['tokens']} {s['dtype']} {s['device']}"
        f"  ({res['repeats']} interleaved rounds)",
        f"{'mode':<6} {'contender':<12} {'median ms':>10} {'x LoRA':>7} {'IQR':>15} {'memory x LoRA':>14}",
    ]
    for mode in ("train", "infer"):
        for name, v in res.get(mode, {}).items():
            mem = res.get("memory", {}).get(name, {}).get("ratio") if mode == "train" else None
            mem_s = f"{mem:.3f}" if mem is not None else ""
            lines.append(
                f"{mode:<6} {name:<12} {v['median_s'] * 1e3:>10.2f} {v['ratio']:>7.3f} "
                f"{'[' + format(v['ratio_q25'], '.3f') + ', ' + format(v['ratio_q75'], '.3f') + ']':>15} {mem_s:>14}"
            )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="Small token count and few rounds (< 1 min on 2 cores)."
    )
    p.add_argument("--json", action="store_true", help="Print the summary as JSON instead of a table.")
    p.add_argument("--d", type=int, default=2048, help="Layer width d_in = d_out (default 2048).")
    p.add_argument("--r", type=int, default=64, help="Adapter rank (default 64).")
    p.add_argument(
        "--tokens", type=int, default=None, help="Tokens per step (default 2048, 512 with --quick)."
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="Interleaved rounds (default 15, 5 with --quick)."
    )
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="fp32 on CPU, bf16 on CUDA by default."
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: torch's; 1 is steadier on a busy shared machine).",
    )
    p.add_argument("--out", default=None, help="Also write the full result (all contenders) as JSON here.")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    tokens = args.tokens if args.tokens is not None else (512 if args.quick else 2048)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    res = benchmark_layer(
        d_in=args.d,
        r=args.r,
        tokens=tokens,
        dtype=dtype,
        device=device,
        repeats=repeats,
        warmup=1 if args.quick else 2,
    )
    if args.out:
        from ..utils.io import atomic_write_json

        atomic_write_json(args.out, res)
    if args.json:
        print(json.dumps(headline(res), indent=2))
    else:
        print(format_table(res))
    return 0
