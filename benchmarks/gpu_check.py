"""GPU check of DISeL's fused kernel: correctness in bf16 / fp16, then speed ratios with intervals.

Run it through ``benchmarks/gpu_check.sh`` on a CUDA machine (it checks the environment and uses this
checkout); ``--cpu-dry-run`` runs the same code on the CPU at tiny sizes (what the test suite does).

(a) **Correctness.** For bf16 and fp16, and for a plain adapter, one with the logit scale, a compacted one
(static components) and fp32 adapter weights under ``torch.autocast``: one adapted linear layer, forward
and backward through the fused kernel and through the reference module path
(``kernels.reference_path()``), both compared with an fp32 reference-path computation of the same
weights and inputs. A tensor (the adapter's contribution ``out - base(x)``, the output, and the gradients
of x, D, U, W_g, b_g) passes when its relative error to fp32 (Frobenius norm) is at most ``TOL[dtype]`` and
at most 1.5x the reference path's own error plus ``TOL[dtype] / 10``: the fused kernel may round
differently, not worse. The fused kernel must actually have run (its calls are counted). Any failure:
exit status 1.

(b) **Speed.** ``disel.commands.bench.benchmark_layer`` on a Llama-7B-like layer (d = 4096, r = 64 and 256,
4096 tokens, bf16) and ``benchmark_model`` on a small random Llama: median paired time ratios vs PEFT
LoRA (unmerged) with 95% confidence intervals, and ``torch.cuda.max_memory_allocated`` peaks.

    bash benchmarks/gpu_check.sh                 # on the CUDA machine
    bash benchmarks/gpu_check.sh --cpu-dry-run   # anywhere: tiny sizes on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _layer(case: str, d: int, r: int, dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    """One adapted linear layer with non-trivial U and input-dependent gates; fp32 weights for 'autocast'."""
    import peft

    import disel
    from disel.commands.bench import OneLinear

    torch.manual_seed(seed)
    wdtype = torch.float32 if case == "autocast" else dtype
    base = OneLinear(d, d).to(device=device, dtype=wdtype)
    opts: dict[str, Any] = {"r": r, "lora_alpha": 2 * r, "target_modules": ["proj"], "lora_dropout": 0.0}
    if case == "logit_scale":
        opts["gate_logit_scale"] = True
    if case == "static":
        opts["static_rank_pattern"] = {"proj": max(1, r // 4)}
    pm = peft.get_peft_model(base, disel.DiselConfig(**opts), autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_gate" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif "lora_gate" in name and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return pm.to(device)


def _run(
    pm: nn.Module, x: torch.Tensor, g: torch.Tensor, reference: bool, autocast_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    from disel.methods.gated_lora import kernels

    pm.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    ctx = kernels.reference_path() if reference else contextlib.nullcontext()
    ac = (
        torch.autocast(x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx, ac:
        out = pm(x)
        with torch.no_grad(), pm.disable_adapter():
            base_out = pm(x)
    (out.float() * g).sum().backward()
    res = {"out": out.detach().float(), "delta": (out.detach().float() - base_out.float())}
    res["grad_x"] = x.grad.detach().float()
    for name, p in pm.named_parameters():
        if p.grad is not None:
            kind = name.split(".")[-3] + "." + name.split(".")[-1]  # e.g. lora_A.weight, lora_gate.bias
            res[f"grad_{kind}"] = p.grad.detach().float()
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


def check_kernel(
    device: str, d: int, r: int, tokens: int, seed: int = 0
) -> tuple[bool, list[dict[str, Any]]]:
    """Part (a): every case and dtype; returns (all passed, rows)."""
    from disel.methods.gated_lora import kernels

    calls = {"n": 0}
    real = kernels.fused_gated_update

    def counting(*a: Any, **k: Any) -> torch.Tensor:
        calls["n"] += 1
        return real(*a, **k)

    rows: list[dict[str, Any]] = []
    ok = True
    kernels.fused_gated_update = counting
    try:
        for dtype in (torch.bfloat16, torch.float16):
            for case in ("plain", "logit_scale", "static", "autocast"):
                pm = _layer(case, d, r, dtype, device, seed)
                gold_model = copy.deepcopy(pm).float()
                gen = torch.Generator().manual_seed(seed + 2)
                x32 = torch.randn(tokens, d, generator=gen).to(device)
                g = torch.randn(tokens, d, generator=gen).to(device)
                xin = x32 if case == "autocast" else x32.to(dtype)
                ac = dtype if case == "autocast" else None
                calls["n"] = 0
                fused = _run(pm, xin, g, reference=False, autocast_dtype=ac)
                used_fused = calls["n"] > 0
                ref = _run(pm, xin, g, reference=True, autocast_dtype=ac)
                # the fp32 gold: same weights and (rounded) inputs, reference path, no autocast
                gold = _run(gold_model, xin.float(), g, reference=True, autocast_dtype=None)
                tol = TOL[dtype]
                for key in gold:
                    if key not in fused or key not in ref:
                        rows.append({"dtype": DTYPE_NAMES[dtype], "case": case, "tensor": key, "ok": False})
                        ok = False
                        continue
                    ef, er = _rel(fused[key], gold[key]), _rel(ref[key], gold[key])
                    passed = ef <= tol and ef <= 1.5 * er + tol / 10
                    rows.append(
                        {
                            "dtype": DTYPE_NAMES[dtype],
                            "case": case,
                            "tensor": key,
                            "fused_vs_fp32": ef,
                            "reference_vs_fp32": er,
                            "fused_vs_reference": _rel(fused[key], ref[key]),
                            "tol": tol,
                            "ok": passed,
                        }
                    )
                    ok &= passed
                if not used_fused:
                    rows.append(
                        {"dtype": DTYPE_NAMES[dtype], "case": case, "tensor": "fused kernel ran", "ok": False}
                    )
                    ok = False
    finally:
        kernels.fused_gated_update = real
    return ok, rows


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'dtype':<5} {'case':<12} {'tensor':<22} {'fused/fp32':>11} {'ref/fp32':>11} {'fused/ref':>11}  ok"
    )
    for row in rows:
        if "fused_vs_fp32" in row:
            print(
                f"{row['dtype']:<5} {row['case']:<12} {row['tensor']:<22} {row['fused_vs_fp32']:>11.2e} "
                f"{row['reference_vs_fp32']:>11.2e} {row['fused_vs_reference']:>11.2e}  "
                f"{'PASS' if row['ok'] else 'FAIL'}"
            )
        else:
            print(f"{row['dtype']:<5} {row['case']:<12} {row['tensor']:<22} {'':>35}  FAIL")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="Run everything on the CPU at tiny sizes.")
    p.add_argument("--repeats", type=int, default=None, help="Interleaved rounds (default 25; 3 dry).")
    p.add_argument("--skip-speed", action="store_true", help="Only the correctness check (part a).")
    p.add_argument("--out", default=None, help="Write all results as JSON to this file.")
    args = p.parse_args(argv)

    from disel.commands.bench import (
        bench_llama,
        benchmark_layer,
        benchmark_model,
        format_model_table,
        format_table,
        machine_info,
    )

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible to torch; use --cpu-dry-run to check the script.",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if dry else "cuda"
    t0 = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "device": device, "dry_run": dry}

    print(f"== (a) fused kernel vs reference path on {device}, bf16 and fp16 ==", flush=True)
    ok, rows = check_kernel(device, d=32 if dry else 1024, r=8 if dry else 64, tokens=16 if dry else 2048)
    _print_rows(rows)
    report["kernel_check"] = {"ok": ok, "rows": rows}
    print(f"kernel check: {'PASS' if ok else 'FAIL'}", flush=True)

    if not args.skip_speed:
        repeats = args.repeats or (3 if dry else 25)
        shapes = [(64, 8, 32), (64, 16, 32)] if dry else [(4096, 64, 4096), (4096, 256, 4096)]
        dtype = "bf16"
        report["layer"] = []
        for d, r, tokens in shapes:
            print(f"\n== (b) layer d={d} r={r} tokens={tokens} {dtype} {device} ==", flush=True)
            res = benchmark_layer(
                d_in=d,
                r=r,
                tokens=tokens,
                dtype=dtype,
                device=device,
                repeats=repeats,
                warmup=1 if dry else 3,
            )
            print(format_table(res), flush=True)
            report["layer"].append(res)
        if dry:
            model: Any = "micro-llama"
            mkw = {"r": 4, "tokens": 32, "prompt_tokens": 8, "new_tokens": 4}
        else:
            torch.manual_seed(0)
            model = bench_llama(hidden=2048, layers=8, vocab=8192, tokens=2048)
            mkw = {"r": 64, "tokens": 2048, "prompt_tokens": 64, "new_tokens": 64}
        print(f"\n== (b) whole model on {device}, {dtype} ==", flush=True)
        res = benchmark_model(
            model=model, dtype=dtype, device=device, repeats=min(repeats, 15), warmup=1, **mkw
        )
        print(format_model_table(res), flush=True)
        report["model"] = res
    report["seconds"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"\ngpu_check: kernel {'PASS' if ok else 'FAIL'} ({report['seconds']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
