"""Compaction of a DISeL adapter from gate statistics on calibration data.

For every adapted layer and rank component, over the calibration tokens:

* **drop** the component if its gate stays closed: at least ``coverage`` (default 99%) of its values are
  below ``tau_closed`` (i.e. its 99th percentile is < tau_closed); its contribution is at most
  tau_closed times the component's output on those tokens;
* **fold** it into a static, ungated LoRA part if its gate stays open: at least ``coverage`` of its values
  are above ``tau_open`` (1st percentile > tau_open); the gate is replaced by 1;
* **keep** it gated otherwise.

The counts are exact (``GateRecorder(thresholds=...)``), not histogram estimates. The result is a new DISeL
adapter whose layers have rank ``r' = static + gated`` (``DiselConfig.rank_pattern``), whose first
``static`` components are ungated (``DiselConfig.static_rank_pattern``), and whose layers with no component
left are no longer adapted (``target_modules`` lists the kept layers by name). It loads with one
``PeftModel.from_pretrained`` call. ``lora_B`` columns are rescaled so that the new ``alpha / r'`` scaling
gives the same update.

For deployment, :func:`merge_static` folds the static components into the base weights
(``W += scaling * B_s A_s``), so that only the gated components cost anything at run time, and
:func:`save_merged` writes the merged base as a full model directory with the gated remainder beside it.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils import transpose
from torch import nn

from ..errors import UserError
from ..methods.gated_lora.layer import DiselGate, DiselLinear
from ..utils.io import atomic_dir
from .stats import GateStats


@dataclass
class LayerPlan:
    """Component indices (of the original adapter) to fold (static), keep gated and drop, for one layer."""

    r: int
    static: list[int]
    gated: list[int]
    dropped: list[int]
    tokens: int

    @property
    def new_r(self) -> int:
        return len(self.static) + len(self.gated)


@dataclass
class CompactionPlan:
    tau_closed: float
    tau_open: float
    coverage: float
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = {"components": 0, "dropped": 0, "folded": 0, "gated": 0, "layers": 0, "layers_removed": 0}
        for lp in self.layers.values():
            c["components"] += lp.r
            c["dropped"] += len(lp.dropped)
            c["folded"] += len(lp.static)
            c["gated"] += len(lp.gated)
            c["layers"] += 1
            c["layers_removed"] += lp.new_r == 0
        return c


def plan_compaction(
    stats: GateStats,
    tau_closed: float = 0.02,
    tau_open: float = 0.98,
    coverage: float = 0.99,
    adapter: str = "default",
) -> CompactionPlan:
    """Decide, per layer and component of ``adapter``, to drop, fold or keep (see the module docstring)."""
    if not 0.0 < tau_closed < tau_open < 1.0:
        raise UserError(
            f"tau_closed={tau_closed} and tau_open={tau_open} are invalid: use 0 < tau_closed < tau_open < 1."
        )
    if not 0.5 < coverage <= 1.0:
        raise UserError(f"coverage={coverage} is invalid: use a fraction in (0.5, 1], such as 0.99.")
    if not any(m.site.adapter == adapter for m in stats.modules.values()):
        raise UserError(f"the gate statistics hold no gate of adapter {adapter!r}; record that adapter.")
    plan = CompactionPlan(tau_closed, tau_open, coverage)
    for name, m in stats.modules.items():
        if m.site.adapter != adapter:
            continue
        if m.count == 0:  # never reached by the calibration data: keep every component gated
            plan.layers[m.site.module] = LayerPlan(m.r, [], list(range(m.r)), [], 0)
            continue
        closed = stats.frac_below(name, tau_closed) >= coverage - 1e-12
        opened = stats.frac_above(name, tau_open) >= coverage - 1e-12
        static = [i for i in range(m.r) if opened[i]]
        dropped = [i for i in range(m.r) if closed[i] and not opened[i]]
        gated = [i for i in range(m.r) if not closed[i] and not opened[i]]
        plan.layers[m.site.module] = LayerPlan(m.r, static, gated, dropped, m.count)
    return plan


def _layers(peft_model: nn.Module, adapter: str) -> dict[str, DiselLinear]:
    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, DiselLinear) and adapter in mod.lora_gate:
            out[name.removeprefix("base_model.model.")] = mod
    return out


def add_compacted_adapter(
    peft_model: nn.Module, plan: CompactionPlan, adapter: str = "default", new_adapter: str = "compact"
) -> Any:
    """Add the compacted adapter ``new_adapter`` beside ``adapter`` in ``peft_model``; returns its config.

    The active adapter is left unchanged. Use ``peft_model.set_adapter(new_adapter)`` to run it.
    """
    layers = _layers(peft_model, adapter)
    missing = sorted(set(plan.layers) - set(layers))
    if missing:
        raise UserError(f"the plan names layers the adapter does not have ({missing[0]}, ...); record again.")
    kept = {n: lp for n, lp in plan.layers.items() if lp.new_r > 0}
    if not kept:
        raise UserError(
            "every gate stayed closed on the calibration data, so nothing of the adapter would be left; "
            "use calibration data from the fine-tuning domain or a smaller --tau-closed."
        )
    old_cfg = peft_model.peft_config[adapter]
    cfg = copy.deepcopy(old_cfg)
    cfg.target_modules = sorted(kept)
    cfg.exclude_modules = None
    cfg.layers_to_transform = None
    cfg.layers_pattern = None
    cfg.rank_pattern = {n: lp.new_r for n, lp in kept.items()}
    cfg.static_rank_pattern = {n: len(lp.static) for n, lp in kept.items() if lp.static}
    cfg.inference_mode = True
    active = peft_model.active_adapter
    peft_model.add_adapter(new_adapter, cfg)
    with torch.no_grad():
        for name, lp in kept.items():
            mod = layers[name]
            order = lp.static + lp.gated
            a_old, b_old, g_old = mod.lora_A[adapter], mod.lora_B[adapter], mod.lora_gate[adapter]
            a_new, b_new, g_new = mod.lora_A[new_adapter], mod.lora_B[new_adapter], mod.lora_gate[new_adapter]
            ratio = mod.scaling[adapter] / mod.scaling[new_adapter]
            a_new.weight.copy_(a_old.weight[order])
            b_new.weight.copy_(b_old.weight[:, order] * ratio)
            if b_old.bias is not None and b_new.bias is not None:
                b_new.bias.copy_(b_old.bias)
            rows = [i - g_old.num_static for i in lp.gated]
            if any(i < 0 for i in rows):
                raise RuntimeError("a static component was planned as gated; its gate is 1 and stays open.")
            g_new.weight.copy_(g_old.weight[rows])
            g_new.bias.copy_(g_old.bias[rows])
            if g_old.proj is not None:
                g_new.proj.weight.copy_(g_old.proj.weight)
    peft_model.set_adapter(active)
    peft_model.requires_grad_(False)
    return cfg


def save_adapter(
    peft_model: nn.Module, adapter: str, out: str | os.PathLike[str], tokenizer: Any = None
) -> Path:
    """Save one adapter of ``peft_model`` to ``out`` (written in a temporary directory, then renamed)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new --out or remove it.")
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter])
        if adapter != "default":  # PEFT nests non-default adapters in a subfolder
            nested = tmp / adapter
            for item in list(nested.iterdir()):
                os.replace(item, tmp / item.name)
            nested.rmdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def _gate_cost(g: DiselGate, d_in: int, rows: int) -> int:
    """Multiply-adds per token (= parameters) of a gate computing ``rows`` rows."""
    if g.proj is not None:
        return g.bottleneck * d_in + rows * g.bottleneck + rows
    return rows * d_in + rows


def cost_report(peft_model: nn.Module, plan: CompactionPlan, adapter: str = "default") -> dict[str, Any]:
    """Adapter parameters and multiply-adds per token, before and after compaction.

    ``merged_static``: the cost once the static part is merged into the base weights (it has a fixed
    ``Delta W``), leaving only the gated components at run time.
    """
    before = after = merged = 0
    for name, mod in _layers(peft_model, adapter).items():
        g = mod.lora_gate[adapter]
        d_in, d_out = mod.in_features, mod.out_features
        lp = plan.layers.get(name)
        before += mod.r[adapter] * (d_in + d_out) + _gate_cost(g, d_in, g.r - g.num_static)
        if lp is None or lp.new_r == 0:
            continue
        after += lp.new_r * (d_in + d_out) + _gate_cost(g, d_in, len(lp.gated))
        merged += len(lp.gated) * (d_in + d_out) + (_gate_cost(g, d_in, len(lp.gated)) if lp.gated else 0)
    return {
        "params_before": before,
        "params_after": after,
        "params_saved_fraction": 1 - after / before if before else 0.0,
        "macs_per_token_before": before,
        "macs_per_token_after": after,
        "macs_per_token_merged_static": merged,
        "macs_saved_fraction": 1 - after / before if before else 0.0,
    }


@torch.no_grad()
def fidelity(
    peft_model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], a: str, b: str
) -> dict[str, float]:
    """Logit differences and token NLL of adapters ``a`` and ``b`` on ``batches`` (ids, attention, mask)."""
    active = peft_model.active_adapter
    max_diff, sum_diff, n_logits = 0.0, 0.0, 0
    nll = {a: 0.0, b: 0.0}
    n_tok = 0
    dev = next(peft_model.parameters()).device
    for ids, att, _ in batches:
        ids, att = ids.to(dev), att.to(dev)
        logits = {}
        for name in (a, b):
            peft_model.set_adapter(name)
            logits[name] = peft_model(input_ids=ids, attention_mask=att).logits.float()
        keep = att.bool()
        d = (logits[a] - logits[b]).abs()[keep]
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.sum())
        n_logits += d.numel()
        m = att[:, 1:].float()
        for name in (a, b):
            lp = torch.log_softmax(logits[name][:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            nll[name] += float(-(lp * m).sum())
        n_tok += int(m.sum())
    peft_model.set_adapter(active)
    n_tok = max(n_tok, 1)
    return {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": sum_diff / max(n_logits, 1),
        f"nll_{a}": nll[a] / n_tok,
        f"nll_{b}": nll[b] / n_tok,
        "nll_diff": (nll[b] - nll[a]) / n_tok,
        "tokens": n_tok,
    }


@torch.no_grad()
def interleaved_timing(
    peft_model: nn.Module, ids: torch.Tensor, att: torch.Tensor, adapters: list[str], repeats: int = 20
) -> dict[str, float]:
    """Median forward time (seconds) of each adapter and of "base" (see :func:`interleaved_times`)."""
    return {
        n: statistics.median(t) for n, t in interleaved_times(peft_model, ids, att, adapters, repeats).items()
    }


def speedup_interval(times: dict[str, list[float]], slow: str = "default", fast: str = "compact") -> dict:
    """The paired-round ratio ``slow / fast`` with its confidence interval (``disel.utils.timing``)."""
    from ..utils.timing import ratio_interval

    return ratio_interval(times[slow], times[fast])


@torch.no_grad()
def interleaved_times(
    peft_model: nn.Module,
    ids: torch.Tensor,
    att: torch.Tensor,
    adapters: list[str],
    repeats: int = 20,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Forward times (seconds, one per round) of each adapter and of "base" (adapters off) on one batch.

    :func:`disel.utils.timing.interleaved`: ``warmup`` untimed forwards of each, then ``repeats`` rounds that
    run every variant once in a fresh random order (so a drift in machine load hits all of them alike), the
    garbage collector between rounds; switching adapters (``set_adapter``, adapter layers off for "base")
    happens outside the clock. ``times[a][i] / times[b][i]`` are paired: :func:`speedup_interval`.
    """
    from ..utils.timing import interleaved

    active = peft_model.active_adapter
    tuner = peft_model.base_model
    dev = next(peft_model.parameters()).device
    ids, att = ids.to(dev), att.to(dev)

    def forward() -> None:
        peft_model(input_ids=ids, attention_mask=att)

    def use(name: str) -> Any:
        def setup() -> None:
            tuner.enable_adapter_layers()
            peft_model.set_adapter(name)

        return setup

    names = [*adapters, "base"]
    setup = {n: use(n) for n in adapters}
    setup["base"] = tuner.disable_adapter_layers
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # disable_adapter_layers warns about biases on every call
            return interleaved(
                dict.fromkeys(names, forward), repeats, warmup, seed=seed, sync=sync, setup=setup
            )
    finally:
        tuner.enable_adapter_layers()
        peft_model.set_adapter(active)


@torch.no_grad()
def merge_static(model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """Fold the static (ungated) components of ``adapter`` into the base weights, in place.

    For every layer whose ``adapter`` has ``num_static = k > 0``: ``W += scaling * B[:, :k] @ A[:k]`` (in
    float32, then cast to W's dtype), and the adapter keeps only its gated components (rank ``r - k``, no
    static part; ``lora_B`` is rescaled so that the new ``alpha / (r - k)`` scaling gives the same update).
    A layer with no gated component left no longer holds ``adapter``; if no layer does, the model computes
    exactly the merged base (``model.unload()`` then returns it as a plain model). The adapter's config is
    updated to match (``target_modules``, ``rank_pattern``, empty ``static_rank_pattern``), so it saves and
    reloads on top of the merged base.

    The base weights change for every adapter of ``model``: others now run on the merged base. Returns
    counts: ``layers`` merged, ``components_merged``, ``layers_removed``, ``gated_components`` left.
    """
    if adapter not in getattr(model, "peft_config", {}):
        raise UserError(f"the model has no adapter {adapter!r}; pass one of {sorted(model.peft_config)}.")
    counts = {"layers": 0, "components_merged": 0, "layers_removed": 0, "gated_components": 0}
    kept: dict[str, int] = {}
    for name, mod in _layers(model, adapter).items():
        gate = mod.lora_gate[adapter]
        k, r = gate.num_static, mod.r[adapter]
        g = r - k
        if k == 0:
            kept[name] = r
            counts["gated_components"] += r
            continue
        lora_A, lora_B = mod.lora_A[adapter], mod.lora_B[adapter]
        if lora_B.bias is not None:
            raise UserError(
                f"layer {name} of adapter {adapter!r} has a lora_B bias (lora_bias=True); merge_static "
                "supports adapters without it."
            )
        weight = mod.get_base_layer().weight
        scaling = mod.scaling[adapter]
        a = lora_A.weight.float()
        b = lora_B.weight.float()
        delta = transpose(b[:, :k] @ a[:k] * scaling, mod.fan_in_fan_out)
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        counts["layers"] += 1
        counts["components_merged"] += k
        if g == 0:
            for attr in (*mod.adapter_layer_names, *mod.other_param_names):
                container = getattr(mod, attr)
                if adapter in container:
                    del container[adapter]
            counts["layers_removed"] += 1
            continue
        alpha = mod.lora_alpha[adapter]
        new_scaling = alpha / math.sqrt(g) if mod.use_rslora.get(adapter, False) else alpha / g
        new_a = nn.Linear(
            mod.in_features, g, bias=False, device=lora_A.weight.device, dtype=lora_A.weight.dtype
        )
        new_b = nn.Linear(
            g, mod.out_features, bias=False, device=lora_B.weight.device, dtype=lora_B.weight.dtype
        )
        new_a.weight.copy_(lora_A.weight[k:])
        new_b.weight.copy_((b[:, k:] * (scaling / new_scaling)).to(lora_B.weight.dtype))
        new_a.requires_grad_(lora_A.weight.requires_grad)
        new_b.requires_grad_(lora_B.weight.requires_grad)
        mod.lora_A[adapter], mod.lora_B[adapter] = new_a, new_b
        mod.r[adapter] = g
        mod.scaling[adapter] = new_scaling
        gate.r, gate.num_static = g, 0
        kept[name] = g
        counts["gated_components"] += g
    cfg = model.peft_config[adapter]
    if counts["layers"]:
        cfg.target_modules = sorted(kept)
        cfg.exclude_modules = None
        cfg.layers_to_transform = None
        cfg.layers_pattern = None
        cfg.rank_pattern = dict(kept)
        cfg.static_rank_pattern = {}
    return counts


def save_merged(
    peft_model: nn.Module, adapter: str, out: str | os.PathLike[str], tokenizer: Any = None
) -> Path:
    """Write ``peft_model``'s base (after :func:`merge_static`) as a full model directory ``out``, and
    ``adapter``'s remaining gated components, if any, to ``out/adapter`` (its ``base_model_name_or_path`` is
    ``out``). Written in a temporary directory, then renamed. Consumes ``peft_model`` (its adapter layers are
    unloaded); returns ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} is not empty; choose a new --out or remove it.")
    if any(mod.lora_gate[adapter].num_static for mod in _layers(peft_model, adapter).values()):
        raise UserError(f"adapter {adapter!r} still has static components; call merge_static first.")
    with atomic_dir(out) as tmp:
        if _layers(peft_model, adapter):
            cfg = peft_model.peft_config[adapter]
            cfg.base_model_name_or_path = str(out.resolve())
            with warnings.catch_warnings():  # PEFT looks for the base's config in `out`, not yet written
                warnings.filterwarnings("ignore", message="Could not find a config file")
                peft_model.save_pretrained(str(tmp / ".adapter"), selected_adapters=[adapter])
            src = tmp / ".adapter" / adapter if adapter != "default" else tmp / ".adapter"
            os.replace(src, tmp / "adapter")
            shutil.rmtree(tmp / ".adapter", ignore_errors=True)
        base = peft_model.unload()
        base.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
