"""Where a whole model's DISeL training step loses time against its FLOP bound: torch.profiler by op.

Builds the ``disel bench --model`` variants (random Llama-style model, adapters r on every linear layer),
profiles training steps (causal-LM loss, forward + backward) of PEFT LoRA and DISeL, alternating the two
step by step so that a change in machine load hits both, and prints per op the self CPU time per step, the
number of calls per step, the DISeL - LoRA difference, and the FLOP bound of the step:

* per adapted linear layer (d_in -> d_out) and token, with the base frozen: base ``4 d_in d_out`` (forward
  and gradient of the input), LoRA ``6 r (d_in + d_out)`` (forward, input gradient, weight gradients),
  DISeL's gate ``6 r d_in`` (its logits, their input and weight gradients);
* attention (causal, no weights): ``6 T h`` per token and layer (``2 T h`` forward with T/2 keys on
  average, twice that backward); the frozen LM head ``4 h V`` per token.

    python benchmarks/profile_model.py --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from disel.commands.bench import MODEL_PRESETS, build_model_variants, load_bench_model, machine_info

CATEGORIES = {
    "GEMM (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm"),
    "attention kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash_attention"),
    "sigmoid / glu (DISeL)": ("aten::sigmoid", "aten::glu", "aten::glu_backward", "aten::sigmoid_backward"),
    "mul / add / scale": ("aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::div", "aten::sub"),
    "copies, cat, sum": ("aten::copy_", "aten::cat", "aten::sum", "aten::clone", "aten::contiguous"),
}


def flop_bound(model: nn.Module, r: int, tokens: int) -> dict[str, float]:
    """FLOPs per token of one training step (frozen base) of LoRA and DISeL on every linear layer."""
    base = lora = gate = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
            k, d = mod.in_features, mod.out_features
            base += 4 * k * d
            lora += 6 * r * (k + d)
            gate += 6 * r * k
    cfg = model.config
    attn = 6 * tokens * cfg.hidden_size * cfg.num_hidden_layers
    head = 4 * cfg.hidden_size * cfg.vocab_size
    rest = base + attn + head
    return {
        "linear_base": base,
        "lora": lora,
        "gate": gate,
        "attention": attn,
        "lm_head": head,
        "lora_step": rest + lora,
        "disel_step": rest + lora + gate,
        "ratio_disel_vs_lora": (rest + lora + gate) / (rest + lora),
        "ratio_adapted_linears_only": (base + lora + gate) / (base + lora),
        "ratio_lora_vs_frozen": (rest + lora) / rest,
    }


def _category(key: str) -> str:
    for cat, names in CATEGORIES.items():
        if key in names or any(n in key for n in names if not n.startswith("aten::")):
            return cat
    return "other (views, autograd, norms, activations, ...)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help=f"{' | '.join(MODEL_PRESETS)} | a model directory.")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="Profiled steps of each (after one warm-up).")
    p.add_argument(
        "--mode",
        choices=["train", "generate"],
        default="train",
        help="Profile training steps (default) or greedy generation (--new-tokens after a 16-token prompt).",
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    p.add_argument("--out", default=None, help="JSON file for the per-op table.")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_bench_model(args.model, torch.float32, "cpu", args.tokens)
    ids = torch.randint(
        3, base.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1)
    )
    variants, _ = build_model_variants(base, args.r, ids)
    models = {"lora": variants["lora"], "disel": variants["disel"]}

    prompt = ids[:, :16]

    def step(m: nn.Module) -> None:
        if args.mode == "generate":
            with torch.no_grad():
                m.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            return
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()

    for m in models.values():
        step(m)  # warm-up
    self_us: dict[str, collections.Counter] = {n: collections.Counter() for n in models}
    calls: dict[str, collections.Counter] = {n: collections.Counter() for n in models}
    totals: dict[str, float] = dict.fromkeys(models, 0.0)
    cpu: dict[str, float] = dict.fromkeys(models, 0.0)
    for i in range(args.steps):
        for name in list(models)[:: 1 if i % 2 == 0 else -1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.thread_time()
                step(models[name])
                cpu[name] += time.thread_time() - t0
            for ev in prof.key_averages():
                self_us[name][ev.key] += ev.self_cpu_time_total
                calls[name][ev.key] += ev.count
            totals[name] += sum(ev.self_cpu_time_total for ev in prof.key_averages())
    n = args.steps
    bound = flop_bound(base, args.r, args.tokens)
    keys = sorted(
        set(self_us["lora"]) | set(self_us["disel"]),
        key=lambda k: -(self_us["lora"][k] + self_us["disel"][k]),
    )
    rows = []
    for k in keys:
        lo, di = self_us["lora"][k] / n / 1e3, self_us["disel"][k] / n / 1e3
        rows.append(
            {
                "op": k,
                "category": _category(k),
                "lora_ms": lo,
                "disel_ms": di,
                "diff_ms": di - lo,
                "lora_calls": calls["lora"][k] / n,
                "disel_calls": calls["disel"][k] / n,
            }
        )
    cats: dict[str, dict[str, float]] = {}
    for row in rows:
        c = cats.setdefault(
            row["category"], {"lora_ms": 0.0, "disel_ms": 0.0, "lora_calls": 0, "disel_calls": 0}
        )
        for f in ("lora_ms", "disel_ms", "lora_calls", "disel_calls"):
            c[f] += row[f]
    tot_l, tot_d = totals["lora"] / n / 1e3, totals["disel"] / n / 1e3
    cpu_l, cpu_d = cpu["lora"] / n * 1e3, cpu["disel"] / n * 1e3
    cfg = base.config
    print(
        f"{args.model}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}; "
        f"r = {args.r} on all linear layers; {args.tokens} tokens; {torch.get_num_threads()} thread(s); "
        f"{n} profiled {'training steps' if args.mode == 'train' else 'generate calls'} of each, alternating"
    )
    print(
        f"FLOP bound per token: frozen linears {bound['linear_base'] / 1e6:.2f} M, LoRA {bound['lora'] / 1e6:.2f} M, "
        f"gate {bound['gate'] / 1e6:.2f} M, attention {bound['attention'] / 1e6:.2f} M, LM head "
        f"{bound['lm_head'] / 1e6:.2f} M -> DISeL / LoRA {bound['ratio_disel_vs_lora']:.3f} "
        f"(adapted linears only {bound['ratio_adapted_linears_only']:.3f}); LoRA / frozen "
        f"{bound['ratio_lora_vs_frozen']:.3f}"
    )
    print(
        f"profiled self CPU time of the recorded ops per step: LoRA {tot_l:.1f} ms, DISeL {tot_d:.1f} ms, "
        f"ratio {tot_d / tot_l:.3f}; thread CPU time per profiled step (ops + the Python around them + the "
        f"profiler's own cost): LoRA {cpu_l:.1f} ms, DISeL {cpu_d:.1f} ms, ratio {cpu_d / cpu_l:.3f}"
    )
    print("\n| category | LoRA ms/step | DISeL ms/step | DISeL - LoRA | calls/step LoRA → DISeL |")
    print("|---|---|---|---|---|")
    for cat, c in sorted(cats.items(), key=lambda kv: -kv[1]["disel_ms"]):
        print(
            f"| {cat} | {c['lora_ms']:.1f} | {c['disel_ms']:.1f} | {c['disel_ms'] - c['lora_ms']:+.1f} | "
            f"{c['lora_calls']:.0f} → {c['disel_calls']:.0f} |"
        )
    print(
        f"\n| op (top {args.rows}) | LoRA ms/step | DISeL ms/step | DISeL - LoRA | calls/step LoRA → DISeL |"
    )
    print("|---|---|---|---|---|")
    for row in rows[: args.rows]:
        print(
            f"| `{row['op']}` | {row['lora_ms']:.1f} | {row['disel_ms']:.1f} | {row['diff_ms']:+.1f} | "
            f"{row['lora_calls']:.0f} → {row['disel_calls']:.0f} |"
        )
    if args.out:
        res: dict[str, Any] = {
            "machine": machine_info(),
            "settings": {**vars(args), "threads": torch.get_num_threads()},
            "flop_bound_per_token": bound,
            "per_step_ms": {"lora": tot_l, "disel": tot_d},
            "thread_cpu_per_step_ms": {"lora": cpu_l, "disel": cpu_d},
            "categories": cats,
            "ops": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
