"""``disel bench``: time DISeL against PEFT LoRA, DoRA and the frozen base on this machine, with intervals.

Layer benchmark (default): the contenders wrap the same frozen ``nn.Linear`` (d_in -> d_out, no bias):

* ``lora``: PEFT LoRA, unmerged;  ``lora_merged``: the same adapter merged (inference only);
* ``dora``: PEFT DoRA;  ``disel``: DISeL with the fused kernel;
* ``naive``: DISeL through the reference module path (lora_A(x), sigmoid(gate(x)), product, lora_B).

Whole-model benchmark (``--model tiny-llama`` or ``--model PATH``): adapters on every linear layer of a
causal LM; training step (causal-LM loss, forward + backward), forward, and greedy generation with the KV
cache (``generate(do_sample=False)``, a fixed number of new tokens) for the frozen base, LoRA (unmerged and
merged), DoRA, DISeL, a compacted DISeL adapter (closed gates dropped, open ones folded into an ungated
part, by ``disel.analysis``) and the compacted adapter with its static part merged (``disel.merge_static``).

Every time ratio comes from interleaved rounds in one process (each round runs every contender once, in a
fresh random order; :mod:`disel.utils.timing`): the median over rounds of the paired ratio ``t / t_LoRA``,
its inter-quartile range, and a distribution-free 95% confidence interval of that median. Memory is measured
without tracemalloc (which does not see torch's allocations): parameters + gradients + the unique storages
saved for backward (``torch.autograd.graph.saved_tensors_hooks``); for whole models also the peak of tensor
bytes allocated during one training step (a ``TorchDispatchMode`` that follows every new storage until it is
freed; on CUDA ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..utils import timing

TRAIN_CONTENDERS = ("lora", "dora", "naive", "disel")
INFER_CONTENDERS = ("lora", "lora_merged", "dora", "naive", "disel")
MODEL_TRAIN_VARIANTS = ("base", "lora", "dora", "disel")
MODEL_INFER_VARIANTS = ("base", "lora", "lora_merged", "dora", "disel", "disel_compact", "disel_merged")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Randomly initialised Llama-style models built from a config (nothing downloaded).
MODEL_PRESETS = {
    "tiny-llama": {"hidden": 512, "layers": 4, "vocab": 4096},
    "micro-llama": {"hidden": 64, "layers": 2, "vocab": 256},  # for tests (--smoke)
}
INTERVAL_KEYS = ("median", "q25", "q75", "ci_low", "ci_high", "ci_level", "n")


class OneLinear(nn.Module):
    """A module holding one bias-free linear layer named ``proj``: the layer the benchmarks adapt."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not on Windows
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch threads and version, GPU name and the load average (1, 5, 15 min)."""
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
        "load_avg": _load_avg(),
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
    base = OneLinear(d_in, d_out).to(device=device, dtype=dtype)
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
        num_attention_heads=max(1, hidden // 128) if hidden >= 128 else max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 128) if hidden >= 128 else max(1, hidden // 32),
        max_position_embeddings=max(2048, tokens),
    )
    return LlamaForCausalLM(cfg)


def _randomise_up(model: nn.Module, seed: int) -> None:
    """U (lora_B) starts at zero; give it small random values so every path does real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


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


def synthetic_gates(pm: nn.Module, closed: float, opened: float, seed: int) -> None:
    """Give every DISeL layer of ``pm`` a fixed split of gates, in place: a random ``closed`` fraction of the
    rank components always closed (b_g = -12, W_g = 0), an ``opened`` fraction always open (b_g = +12,
    W_g = 0), the rest input-dependent (b_g = 0, random W_g); U random. What a trained adapter that
    ``disel compact`` can shrink looks like, without training one."""
    import disel

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in pm.named_modules():
            if not isinstance(mod, disel.DiselLinear):
                continue
            for name, g in mod.lora_gate.items():
                r = mod.r[name]
                n_closed, n_open = round(closed * r), round(opened * r)
                b = mod.lora_B[name].weight
                b.copy_((torch.randn(b.shape, generator=gen) * 0.02).to(b.dtype))
                perm = torch.randperm(r, generator=gen)
                w = torch.randn(g.weight.shape, generator=gen) * g.weight.shape[1] ** -0.5
                g.weight.copy_(w.to(g.weight.dtype))
                g.bias.zero_()
                for i in perm[:n_closed].tolist():
                    g.weight[i].zero_()
                    g.bias[i] = -12.0
                for i in perm[n_closed : n_closed + n_open].tolist():
                    g.weight[i].zero_()
                    g.bias[i] = 12.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _train_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model(x).backward(grad)


def _on_path(reference: bool, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` run through DISeL's reference module path (``reference=True``) or as it is."""
    from ..methods.gated_lora import kernels

    def call() -> None:
        if reference:
            with kernels.reference_path():
                fn()
        else:
            fn()

    return call


def _interleave(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str = "cpu", seed: int = 0
) -> dict[str, list[float]]:
    """:func:`disel.utils.timing.interleaved` with a device sync on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return timing.interleaved(fns, repeats, warmup, order="random", seed=seed, sync=sync)


def _summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per contender: median/min/quartile seconds, the median paired ratio to ``baseline`` (``ratio``), its
    IQR (``ratio_q25``, ``ratio_q75``), its 95% confidence interval (``ratio_ci_low``, ``ratio_ci_high``,
    coverage ``ratio_ci_level``), ``n`` rounds, and ``interval`` (the same as a :func:`timing.ratio_interval`
    dict)."""
    out = {}
    for name, s in timing.summarize(times, baseline).items():
        iv = s.pop("ratio")
        out[name] = {
            **s,
            "ratio": iv["median"],
            "ratio_q25": iv["q25"],
            "ratio_q75": iv["q75"],
            "ratio_ci_low": iv["ci_low"],
            "ratio_ci_high": iv["ci_high"],
            "ratio_ci_level": iv["ci_level"],
            "n": iv["n"],
            "interval": iv,
        }
    return out


def saved_bytes(model: nn.Module, x: torch.Tensor, reference: bool = False, **kwargs: Any) -> dict[str, int]:
    """Bytes of one training step: parameters, gradients of trainable ones, unique saved-for-backward storages.

    Saved tensors are deduplicated by storage, and storages that belong to parameters are not counted twice;
    x itself is counted once as an activation for every contender alike. ``kwargs`` go to the model too
    (``model(x, **kwargs)``; pass ``x`` as a keyword argument through them with ``x=None``).
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
        out = model(x, **kwargs) if x is not None else model(**kwargs)
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


class AllocationPeak:
    """Peak of tensor bytes newly allocated inside the block, above what was live when it started.

    A ``TorchDispatchMode`` sees every aten op's outputs (autograd's backward ops included, as the CPU
    autograd engine runs them in the calling thread); a storage that did not exist among the op's inputs is
    a new allocation, counted until its last reference goes (a weakref callback on the storage). Counts what
    torch allocates for tensors: activations, temporaries, gradients; not library-internal scratch space
    (oneDNN / BLAS workspaces) nor the Python heap. ``peak`` and ``live`` (at the end) are in bytes.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}
        self._mode: Any = None

    def _gone(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def _track(self, out: Any, args: Any) -> None:
        from torch.utils._pytree import tree_flatten

        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            n = st.nbytes()
            key = id(st)
            if n == 0 or key in self._refs or st.data_ptr() in inputs:
                continue
            self._refs[key] = weakref.ref(st, lambda _r, k=key, n=n: self._gone(k, n))
            self.live += n
            self.peak = max(self.peak, self.live)

    def __enter__(self) -> AllocationPeak:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                tracker._track(out, (args, kwargs))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


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


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}.")


def _check_device(device: str, dtype: str) -> None:
    if dtype not in _DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Device {device!r} was asked for but CUDA is not available; use --device cpu.")


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
    _check_device(device, dtype)
    _check_positive(d_in=d_in, d_out=d_out, r=r, tokens=tokens, repeats=repeats)
    tdtype = _DTYPES[dtype]
    contenders = build_contenders(d_in, d_out, r, tdtype, device, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=tdtype)
    grad = torch.randn(tokens, d_out, generator=gen).to(device=device, dtype=tdtype)
    result: dict[str, Any] = {
        "shape": {"d_in": d_in, "d_out": d_out, "r": r, "tokens": tokens, "dtype": dtype, "device": device},
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
    if train:
        xt = x.clone().requires_grad_(True)
        fns = {
            n: _on_path(ref, lambda m=m: _train_step(m, xt, grad))
            for n, (m, ref) in contenders.items()
            if n in TRAIN_CONTENDERS
        }
        result["train"] = _summary(_interleave(fns, repeats, warmup, device, seed), "lora")
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

        fns = {
            n: _on_path(ref, lambda m=m: forward(m))
            for n, (m, ref) in contenders.items()
            if n in INFER_CONTENDERS
        }
        result["infer"] = _summary(_interleave(fns, repeats, warmup, device, seed + 1), "lora")
    result["load_avg_after"] = _load_avg()
    return result


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The flat summary ``disel bench --json`` prints: DISeL's and the naive layer's ratios vs LoRA.

    ``<mode>_ratio_vs_lora`` is the median paired ratio and ``<mode>_ratio_vs_lora_interval`` its
    ``{"median", "q25", "q75", "ci_low", "ci_high", "ci_level", "n"}`` (:func:`disel.utils.timing.ratio_interval`).
    """
    out: dict[str, Any] = {}
    for who, prefix in (("disel", ""), ("naive", "naive_")):
        for mode in ("train", "infer"):
            if mode in res:
                t = res[mode][who]
                out[f"{prefix}{mode}_ratio_vs_lora"] = t["ratio"]
                out[f"{prefix}{mode}_ratio_vs_lora_interval"] = t["interval"]
        if "memory" in res:
            out[f"{prefix}memory_ratio_vs_lora"] = res["memory"][who]["ratio"]
    if "infer" in res:
        out["infer_ratio_vs_merged_lora"] = (
            res["infer"]["disel"]["median_s"] / res["infer"]["lora_merged"]["median_s"]
        )
        out["merged_lora_infer_ratio_vs_lora_interval"] = res["infer"]["lora_merged"]["interval"]
    if "train" in res:
        out["dora_train_ratio_vs_lora_interval"] = res["train"]["dora"]["interval"]
    out["shape"] = res["shape"]
    out["repeats"] = res["repeats"]
    out["threads"] = res["threads"]
    out["machine"] = res["machine"]
    out["load_avg_after"] = res.get("load_avg_after")
    return out


def _cell(v: dict[str, Any]) -> str:
    return f"{v['ratio']:.3f} [{v['ratio_ci_low']:.3f}, {v['ratio_ci_high']:.3f}]"


def format_table(res: dict[str, Any]) -> str:
    """A plain-text table: median time, paired ratio vs LoRA with its IQR and 95% CI, memory ratio."""
    s = res["shape"]
    level = next(iter(res.get("train", res.get("infer", {})).values()), {}).get("ratio_ci_level", 0.0)
    lines = [
        f"shape d_in={s['d_in']} d_out={s['d_out']} r={s['r']} tokens={s['tokens']} {s['dtype']} {s['device']}"
        f"  ({res['repeats']} interleaved rounds, {res['threads']} torch thread(s), "
        f"load avg {res['machine'].get('load_avg')} -> {res.get('load_avg_after')})",
        f"{'mode':<6} {'contender':<12} {'median ms':>10} {'x LoRA':>7} {'IQR':>16} "
        f"{f'{level:.0%} CI':>16} {'memory x LoRA':>14}",
    ]
    for mode in ("train", "infer"):
        for name, v in res.get(mode, {}).items():
            mem = res.get("memory", {}).get(name, {}).get("ratio") if mode == "train" else None
            mem_s = f"{mem:.3f}" if mem is not None else ""
            iqr = f"[{v['ratio_q25']:.3f}, {v['ratio_q75']:.3f}]"
            ci = f"[{v['ratio_ci_low']:.3f}, {v['ratio_ci_high']:.3f}]"
            lines.append(
                f"{mode:<6} {name:<12} {v['median_s'] * 1e3:>10.2f} {v['ratio']:>7.3f} {iqr:>16} {ci:>16} "
                f"{mem_s:>14}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Whole-model benchmark


def load_bench_model(spec: str, dtype: torch.dtype, device: str, tokens: int, seed: int = 0) -> nn.Module:
    """A preset (``tiny-llama``, ``micro-llama``: random weights from a config) or a local model directory."""
    if spec in MODEL_PRESETS:
        torch.manual_seed(seed)
        p = MODEL_PRESETS[spec]
        model = bench_llama(p["hidden"], p["layers"], p["vocab"], tokens)
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise UserError(
                f"--model {spec!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a local model "
                "directory with a config.json."
            )
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"Could not load {spec!r} as a causal LM with transformers: {e}") from e
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def _param_count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def build_model_variants(
    base: nn.Module, r: int, ids: torch.Tensor, closed: float = 0.5, opened: float = 0.25, seed: int = 0
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The whole-model contenders on copies of ``base``, and a description of the compaction.

    ``disel`` gets synthetic gates (:func:`synthetic_gates`: ``closed`` / ``opened`` fractions); the gates are
    recorded on ``ids`` and the adapter compacted by the library (``plan_compaction``,
    ``add_compacted_adapter``) into ``disel_compact``, whose static part ``merge_static`` folds into the base
    weights of ``disel_merged``.
    """
    import peft

    import disel
    from disel.analysis import GateRecorder, add_compacted_adapter, cost_report, plan_compaction

    common = {"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear", "lora_dropout": 0.0}
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**common))
    _randomise_up(lora, seed + 1)
    dora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**common, use_dora=True))
    _randomise_up(dora, seed + 2)
    merged = copy.deepcopy(lora)
    merged.merge_adapter()
    dsl = peft.get_peft_model(copy.deepcopy(base), disel.DiselConfig(**common))
    synthetic_gates(dsl, closed, opened, seed + 3)
    with torch.no_grad(), GateRecorder(dsl, thresholds=(0.02, 0.98)) as rec:
        dsl(input_ids=ids)
    plan = plan_compaction(rec.stats())
    compact = copy.deepcopy(dsl)
    add_compacted_adapter(compact, plan, "default", "compact")
    compact.set_adapter("compact")
    compact.delete_adapter("default")
    merged_static = copy.deepcopy(compact)
    merge_counts = disel.merge_static(merged_static, "compact")
    for m in (lora, dora, merged, dsl, compact, merged_static):
        m.eval()
    variants = {
        "base": base,
        "lora": lora,
        "lora_merged": merged,
        "dora": dora,
        "disel": dsl,
        "disel_compact": compact,
        "disel_merged": merged_static,
    }
    info = {
        "gates": f"synthetic: per layer {closed:.0%} closed, {opened:.0%} open, the rest input-dependent",
        "counts": plan.counts(),
        "merge_static": merge_counts,
        "cost": cost_report(dsl, plan),
    }
    return variants, info


def _generate_fn(model: nn.Module, prompt: torch.Tensor, new_tokens: int, pad: int) -> Callable[[], None]:
    att = torch.ones_like(prompt)

    def gen() -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(
                input_ids=prompt,
                attention_mask=att,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
            )
        if out.shape[1] != prompt.shape[1] + new_tokens:  # pragma: no cover - a contract of generate
            raise RuntimeError(f"generate made {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")

    return gen


def _model_step_peak(fn: Callable[[], None], device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with AllocationPeak() as tracker:
        fn()
    return tracker.peak


def benchmark_model(
    model: str | nn.Module = "tiny-llama",
    r: int = 16,
    tokens: int = 256,
    prompt_tokens: int = 16,
    new_tokens: int = 32,
    dtype: str = "fp32",
    device: str = "cpu",
    repeats: int = 9,
    warmup: int = 1,
    closed: float = 0.5,
    opened: float = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """Whole-model training step, forward and greedy generation of every variant (see the module docstring);
    a JSON-able dict. ``model``: a preset name, a local model directory, or a causal-LM module (a
    transformers ``PreTrainedModel``; it is moved to ``device``/``dtype`` and frozen). ``tokens`` is the
    sequence length of the training step and the forward (batch 1); generation starts from a random
    ``prompt_tokens``-token prompt and makes exactly ``new_tokens``."""
    _check_device(device, dtype)
    _check_positive(r=r, tokens=tokens, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
    if not (closed >= 0 and opened >= 0 and closed + opened <= 1):
        raise UserError("--closed and --open must be fractions with closed + open <= 1.")
    tdtype = _DTYPES[dtype]
    if isinstance(model, nn.Module):
        base = model.to(device=device, dtype=tdtype).requires_grad_(False).eval()
        model = type(model).__name__
    else:
        base = load_bench_model(model, tdtype, device, tokens, seed)
    cfg = base.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos:
        tokens = min(tokens, max_pos)
        if prompt_tokens + new_tokens > max_pos:
            raise UserError(
                f"prompt + new tokens ({prompt_tokens} + {new_tokens}) exceed the model's "
                f"max_position_embeddings ({max_pos})."
            )
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(seed + 10)
    ids = torch.randint(3, vocab, (1, tokens), generator=gen).to(device)
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=gen).to(device)
    pad = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
    variants, compaction = build_model_variants(base, r, ids, closed, opened, seed)

    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)

    def train_step(name: str) -> Callable[[], None]:
        m = variants[name]
        if name == "base":  # the floor: the frozen model's forward and backward down to the embeddings

            def step() -> None:
                embeds.grad = None
                m(inputs_embeds=embeds, labels=ids).loss.backward()

            return step

        def step() -> None:
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()

        return step

    def forward(name: str) -> Callable[[], None]:
        m = variants[name]

        def fwd() -> None:
            with torch.no_grad():
                m(input_ids=ids)

        return fwd

    with torch.no_grad():
        logits = {n: variants[n](input_ids=ids).logits.float() for n in MODEL_INFER_VARIANTS}

    pairs = {
        "lora_merged_vs_lora": ("lora_merged", "lora"),
        "disel_compact_vs_disel": ("disel_compact", "disel"),
        "disel_merged_vs_disel_compact": ("disel_merged", "disel_compact"),
    }
    fidelity = {k: float((logits[a] - logits[b]).abs().max()) for k, (a, b) in pairs.items()}
    del logits

    res: dict[str, Any] = {
        "model": {
            "name": model,
            "type": getattr(cfg, "model_type", None),
            "hidden": getattr(cfg, "hidden_size", None),
            "intermediate": getattr(cfg, "intermediate_size", None),
            "layers": getattr(cfg, "num_hidden_layers", None),
            "vocab": vocab,
            "params": _param_count(base),
        },
        "settings": {
            "r": r,
            "lora_alpha": 2 * r,
            "target_modules": "all-linear",
            "tokens": tokens,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "dtype": dtype,
            "device": device,
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
        },
        "machine": machine_info(),
        "compaction": compaction,
        "fidelity_max_abs_logit_diff": fidelity,
    }
    res["train"] = _summary(
        _interleave({n: train_step(n) for n in MODEL_TRAIN_VARIANTS}, repeats, warmup, device, seed), "lora"
    )
    res["forward"] = _summary(
        _interleave({n: forward(n) for n in MODEL_INFER_VARIANTS}, repeats, warmup, device, seed + 1), "lora"
    )
    gen_fns = {n: _generate_fn(variants[n], prompt, new_tokens, pad) for n in MODEL_INFER_VARIANTS}
    res["generate"] = _summary(_interleave(gen_fns, repeats, warmup, device, seed + 2), "lora")
    for v in res["generate"].values():
        v["tokens_per_s"] = new_tokens / v["median_s"]

    memory: dict[str, dict[str, Any]] = {}
    for n in MODEL_TRAIN_VARIANTS:
        m = variants[n]
        params = list(m.parameters())
        fn = train_step(n)
        fn()  # the step's lazily created state (e.g. cached masks) is not part of its peak
        m.zero_grad(set_to_none=True)
        embeds.grad = None
        peak = _model_step_peak(fn, device)
        m.zero_grad(set_to_none=True)
        embeds.grad = None
        if n == "base":
            saved = saved_bytes(m, None, inputs_embeds=embeds, labels=ids)
        else:
            saved = saved_bytes(m, None, input_ids=ids, labels=ids)
        memory[n] = {
            "params": sum(p.numel() * p.element_size() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "step_peak": peak,
            "saved": saved["saved"],
        }
    for v in memory.values():
        v["step_peak_ratio"] = v["step_peak"] / memory["lora"]["step_peak"]
        v["total"] = v["params"] + v["step_peak"]
        v["total_ratio"] = v["total"] / (memory["lora"]["params"] + memory["lora"]["step_peak"])
    res["memory"] = memory
    res["memory_method"] = (
        "torch.cuda.max_memory_allocated over one step"
        if device.startswith("cuda")
        else "peak of tensor bytes allocated during one training step (TorchDispatchMode + storage weakrefs)"
    )
    res["load_avg_after"] = _load_avg()
    return res


def format_model_table(res: dict[str, Any]) -> str:
    """A plain-text table of the whole-model benchmark: times, ratios vs LoRA with 95% CIs, memory."""
    m, s = res["model"], res["settings"]
    c = res["compaction"]["counts"]
    lines = [
        f"model {m['name']} ({m['type']}, hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']}, "
        f"{m['params'] / 1e6:.1f}M params); adapters r={s['r']} on all linear layers; {s['dtype']} "
        f"{s['device']}, {s['threads']} torch thread(s)",
        f"train step / forward: {s['tokens']} tokens; generate: {s['prompt_tokens']}-token prompt + "
        f"{s['new_tokens']} new tokens, greedy, KV cache; {s['repeats']} interleaved rounds; load avg "
        f"{res['machine'].get('load_avg')} -> {res.get('load_avg_after')}",
        f"compaction ({res['compaction']['gates']}): {c['components']} components, {c['dropped']} dropped, "
        f"{c['folded']} folded, {c['gated']} gated",
        f"ratios: median paired time ratio vs LoRA (unmerged) [{res['train']['lora']['ratio_ci_level']:.0%} "
        "CI]; memory of one training step: peak of tensor bytes allocated during it (MB), x LoRA, and with the "
        "parameters x LoRA",
        f"{'variant':<14} {'train ms':>9} {'x LoRA':>22} {'fwd ms':>8} {'x LoRA':>22} {'gen tok/s':>9} "
        f"{'time x LoRA':>22} {'peak MB':>8} {'x LoRA':>7} {'+params':>7}",
    ]
    for n in MODEL_INFER_VARIANTS:
        t = res["train"].get(n)
        f, g = res["forward"][n], res["generate"][n]
        mem = res["memory"].get(n)
        t_ms = f"{t['median_s'] * 1e3:.1f}" if t else "-"
        t_cell = _cell(t) if t else "-"
        peak = f"{mem['step_peak'] / 1e6:.1f}" if mem else "-"
        peak_ratio = f"{mem['step_peak_ratio']:.3f}" if mem else "-"
        total_ratio = f"{mem['total_ratio']:.3f}" if mem else "-"
        lines.append(
            f"{n:<14} {t_ms:>9} {t_cell:>22} {f['median_s'] * 1e3:>8.1f} {_cell(f):>22} "
            f"{g['tokens_per_s']:>9.1f} {_cell(g):>22} {peak:>8} {peak_ratio:>7} {total_ratio:>7}"
        )
    fid = res["fidelity_max_abs_logit_diff"]
    lines.append("max |logit diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in fid.items()))
    return "\n".join(lines)


def model_headline(res: dict[str, Any]) -> dict[str, Any]:
    """The summary ``disel bench --model ... --json`` prints: per mode and variant the median seconds and
    the ratio vs LoRA's interval (``{"median", "q25", "q75", "ci_low", "ci_high", "ci_level", "n"}``)."""
    out: dict[str, Any] = {k: res[k] for k in ("model", "settings", "machine", "load_avg_after")}
    for mode in ("train", "forward", "generate"):
        out[mode] = {
            n: {
                "median_s": v["median_s"],
                "ratio_vs_lora": v["interval"],
                **({"tokens_per_s": v["tokens_per_s"]} if "tokens_per_s" in v else {}),
            }
            for n, v in res[mode].items()
        }
    out["memory"] = res["memory"]
    out["memory_method"] = res["memory_method"]
    out["compaction"] = res["compaction"]["counts"]
    out["fidelity_max_abs_logit_diff"] = res["fidelity_max_abs_logit_diff"]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="Small token count and fewer rounds (< 1 min on 2 cores)."
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="Tiny sizes and 3 rounds, to check that everything runs (numbers mean nothing).",
    )
    p.add_argument("--json", action="store_true", help="Print the summary as JSON instead of a table.")
    p.add_argument(
        "--model",
        default=None,
        help="Whole-model benchmark: 'tiny-llama' (random Llama, hidden 512, 4 layers, vocab 4096) or a "
        "local model directory loadable by transformers. Default: the layer benchmark.",
    )
    p.add_argument("--d", type=int, default=2048, help="Layer width d_in = d_out (default 2048).")
    p.add_argument(
        "--r", type=int, default=None, help="Adapter rank (default 64 for a layer, 16 for a model)."
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="Tokens per step (layer: 2048, 512 with --quick; model: 256, 128 with --quick).",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="Interleaved rounds (default 15, 9 with --quick; 6 or more give a 95%% interval).",
    )
    p.add_argument("--prompt-tokens", type=int, default=16, help="Model: generation prompt length.")
    p.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="Model: tokens to generate (default 32, 8 with --quick).",
    )
    p.add_argument(
        "--closed", type=float, default=0.5, help="Model: fraction of closed gates (compacted variant)."
    )
    p.add_argument(
        "--open", type=float, default=0.25, help="Model: fraction of open gates (compacted variant)."
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
    p.add_argument("--seed", type=int, default=0, help="Seed of the weights, inputs and round orders.")
    p.add_argument("--out", default=None, help="Also write the full result (all contenders) as JSON here.")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    small = args.quick or args.smoke
    if args.model is not None:
        model = "micro-llama" if args.smoke and args.model == "tiny-llama" else args.model
        res = benchmark_model(
            model=model,
            r=args.r if args.r is not None else (4 if args.smoke else 16),
            tokens=args.tokens if args.tokens is not None else (32 if args.smoke else 128 if small else 256),
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens
            if args.new_tokens is not None
            else (4 if args.smoke else 8 if small else 32),
            dtype=dtype,
            device=device,
            repeats=args.repeats if args.repeats is not None else (3 if args.smoke else 9 if small else 15),
            warmup=1,
            closed=args.closed,
            opened=args.open,
            seed=args.seed,
        )
        summary, table = model_headline(res), format_model_table(res)
    else:
        res = benchmark_layer(
            d_in=64 if args.smoke and args.d == 2048 else args.d,
            r=args.r if args.r is not None else (4 if args.smoke else 64),
            tokens=args.tokens if args.tokens is not None else (32 if args.smoke else 512 if small else 2048),
            dtype=dtype,
            device=device,
            repeats=args.repeats if args.repeats is not None else (3 if args.smoke else 9 if small else 15),
            warmup=1 if small else 2,
            seed=args.seed,
        )
        summary, table = headline(res), format_table(res)
    if args.out:
        from ..utils.io import atomic_write_json

        atomic_write_json(args.out, res)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(table)
    return 0
