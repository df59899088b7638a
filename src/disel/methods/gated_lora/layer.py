"""The DISeL layer: PEFT's LoRA ``Linear`` with one sigmoid gate per rank-one component.

The layer reuses everything PEFT's LoRA layer does (dropout, scaling, Conv1D handling, several adapters,
mixed batches, device and dtype moves) and plugs the gate in through PEFT's LoRA-variant hook, so the
only new state is the ``lora_gate`` ModuleDict, saved and loaded with the adapter like ``lora_A``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn
from torch.nn.modules import module as _nn_module

from .._input_dependent import NonMergeableVariant
from . import kernels
from .config import DiselConfig

MERGE_ERROR = (
    "DISeL adapters cannot be merged into the base weights: each rank-one component is scaled by an "
    "input-dependent gate, so there is no fixed weight update to add. Keep the adapter unmerged (it costs "
    "about as much as unmerged LoRA), or run `disel compact` to fold always-open components into a "
    "mergeable LoRA part."
)


class DiselGate(nn.Module):
    """g(x) = sigmoid(W_g x [/ sqrt(d_in)] + b_g), or with a bottleneck sigmoid(W_g P x + b_g).

    ``override`` (None by default) forces every gate to a constant, for tests and ablations
    (see :func:`disel.force_gates`).

    ``num_static`` (0 by default, set by ``disel compact`` through ``DiselConfig.static_rank_pattern``): the
    first ``num_static`` components are ungated (gate = 1); W_g and b_g hold only the other r - num_static rows.
    """

    def __init__(
        self,
        in_features: int,
        r: int,
        bottleneck: int | None = None,
        logit_scale: bool = False,
        num_static: int = 0,
    ):
        super().__init__()
        if not 0 <= num_static <= r:
            raise ValueError(f"num_static={num_static} is invalid for a gate of rank {r}: use 0..{r}.")
        self.in_features = in_features
        self.r = r
        self.num_static = num_static
        self.bottleneck = bottleneck
        self.logit_scale = logit_scale
        width = bottleneck if bottleneck is not None else in_features
        self.proj = nn.Linear(in_features, bottleneck, bias=False) if bottleneck is not None else None
        self.weight = nn.Parameter(torch.empty(r - num_static, width))
        self.bias = nn.Parameter(torch.empty(r - num_static))
        self.override: float | None = None
        # [D; s W_g] and [0, b_g] for calls without autograd (kernels.WeightCache; not in the state dict)
        self.weight_cache = kernels.WeightCache()

    @property
    def input_scale(self) -> float:
        return 1.0 / math.sqrt(self.in_features) if self.logit_scale else 1.0

    def reset_parameters(self, bias_init: float, weight_init: str) -> None:
        with torch.no_grad():
            if self.proj is not None:
                nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5))
            if weight_init == "zero" or self.weight.numel() == 0:
                nn.init.zeros_(self.weight)
            else:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.bias.fill_(bias_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) if self.proj is not None else x
        z = F.linear(h, self.weight)
        if self.logit_scale:
            z = z * self.input_scale
        return z + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            return torch.full((*x.shape[:-1], self.r), self.override, dtype=x.dtype, device=x.device)
        g = torch.sigmoid(self.logits(x))
        if self.num_static:
            g = torch.cat([g.new_ones((*g.shape[:-1], self.num_static)), g], dim=-1)
        return g

    def fast_path_ok(self) -> bool:
        """Whether a fused kernel may compute this gate without calling the module.

        False while anything must observe or alter the gate: forward or backward hooks (gate recording), a
        replaced ``forward``, or a forced value. Static (ungated) components are fine: the fused kernel takes
        ``num_static`` and treats them as gate 1. Fused implementations must fall back to calling ``gate(x)``
        when this is False.
        """
        return self.override is None and kernels.unhooked(self)

    def _apply(self, fn: Any, recurse: bool = True) -> DiselGate:
        # .to() / .half() / .cuda() give the parameters new tensors: drop the cached copy now, not at the next
        # call (it would be recomputed then anyway, see kernels.WeightCache), so the old memory is freed.
        cache = getattr(self, "weight_cache", None)
        if cache is not None:
            cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, r={self.r}, bottleneck={self.bottleneck}, "
            f"logit_scale={self.logit_scale}" + (f", num_static={self.num_static}" if self.num_static else "")
        )


def gated_delta(
    x: torch.Tensor, lora_A: nn.Linear, lora_B: nn.Linear, gate: DiselGate, scaling: float
) -> torch.Tensor:
    """scaling * U (g(x) * (D x)) for an already dropout-applied x: the reference module path.

    The gate is called as a module so that forward hooks (gate recording, see ``disel.analysis``) see it.
    :meth:`DiselLinearVariant.forward` uses the fused kernel (``kernels.fused_gated_update``) instead
    whenever it computes the same thing; this function is what it falls back to and is tested against.
    """
    down = lora_A(x)
    return lora_B(down * gate(x)) * scaling


class DiselLinearVariant(NonMergeableVariant):
    """Plugs the gate into PEFT's LoRA ``Linear`` forward, mixed-batch forward and merge paths."""

    merge_error = MERGE_ERROR

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: DiselConfig | None = None, **kwargs: Any) -> None:
        if config is None or not hasattr(config, "gate_bias_init"):
            raise TypeError("The DISeL layer needs a DiselConfig; build it with disel.DiselConfig(...).")
        lora_A = module.lora_A[adapter_name]
        gate = DiselGate(
            module.in_features,
            module.r[adapter_name],
            bottleneck=config.gate_bottleneck,
            logit_scale=config.gate_logit_scale,
            num_static=config.static_rank_for(kwargs.get("target_name") or ""),
        )
        gate.reset_parameters(config.gate_bias_init, config.gate_weight_init)
        module.lora_gate[adapter_name] = gate.to(device=lora_A.weight.device, dtype=lora_A.weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        # Dropout is applied once: the down-projection and the gate read the same dropped-out x.
        x = module.lora_dropout[active_adapter](x)
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        gate = module.lora_gate[active_adapter]
        scaling = module.scaling[active_adapter]
        tensors = kernels.fast_tensors(lora_A, lora_B, gate)
        if tensors is not None:
            down_w, gate_w, gate_b, up_w = tensors
            return kernels.fused_gated_update(
                x,
                result,
                down_w,
                gate_w,
                gate_b,
                up_w,
                scaling,
                gate.input_scale,
                gate.num_static,
                cache=getattr(gate, "weight_cache", None),
            )
        return result + gated_delta(x, lora_A, lora_B, gate, scaling)


class DiselLinear(lora_layer.Linear):
    """LoRA ``Linear`` (nn.Linear and GPT-2's Conv1D) with DISeL gates."""

    adapter_layer_names: tuple[str, ...] = (*LoraLayer.adapter_layer_names, "lora_gate")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if "lora_gate" not in self._modules:
            self.lora_gate = nn.ModuleDict({})
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self) -> dict[tuple[str, ...], type[LoraVariant] | None]:
        return {(): DiselLinearVariant}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's LoRA forward, or, in the common case, the whole layer in one fused kernel.

        The common case: no extra arguments (no ``adapter_names`` mixed batch), one active DISeL adapter on
        the fused path (the conditions of :func:`kernels.fast_tensors`), adapters not disabled, a plain
        unhooked ``nn.Linear`` base, an ``nn.Identity`` or not-in-place ``nn.Dropout`` as the adapter's dropout
        (in training the base reads x and the adapter the dropped-out x, as in PEFT) and one dtype for
        x, the base and the adapter. Then ``kernels.fused_gated_update(..., base_weight=W)`` computes
        ``x W.T + b + scaling U (g(x) * D x)`` itself, which is exactly what PEFT's forward computes through
        :meth:`DiselLinearVariant.forward`, with fewer full-width passes and less Python per call (this
        check runs on every call and reads everything it depends on: nothing is cached but the no-grad
        weight copy, see ``kernels.WeightCache``). Everything else, and everything under
        ``kernels.reference_path()``, goes through PEFT's forward.
        """
        if not args and not kwargs and kernels._ENABLED:
            out = self._whole_layer_forward(x)
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)

    def _whole_layer_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole-layer kernel's output when it computes exactly what PEFT's forward would, else None.

        Written for speed, as it runs on every call: the checks are inlined and read the instance dicts
        directly (PEFT's adapter state included; a PEFT version whose attributes differ takes PEFT's forward).
        """
        d = self.__dict__
        try:
            if d["_disable_adapters"] or d["merged_adapters"]:
                return None
            name = d["_active_adapter"]
            mods = d["_modules"]
            variants = d["lora_variant"]
        except KeyError:
            return None
        if type(name) is not str:
            if len(name) != 1:
                return None
            name = name[0]
        lora_A = mods["lora_A"]._modules.get(name)
        if lora_A is None or not isinstance(variants.get(name), DiselLinearVariant):
            return None
        lora_B = mods["lora_B"]._modules[name]
        gate = mods["lora_gate"]._modules[name]
        dropout = mods["lora_dropout"]._modules[name]
        base = mods["base_layer"]
        drop_t = type(dropout)
        if (
            type(base) is not nn.Linear
            or type(lora_A) is not nn.Linear
            or type(lora_B) is not nn.Linear
            or type(gate) is not DiselGate
            or not (drop_t is nn.Identity or (drop_t is nn.Dropout and not dropout.inplace))
        ):
            return None
        # no hooks on any of the five modules (kernels.hooked, inlined), none global, a plain gate
        for m in (base, lora_A, lora_B, gate, dropout):
            md = m.__dict__
            if (
                md["_forward_hooks"]
                or md["_forward_pre_hooks"]
                or md["_backward_hooks"]
                or md["_backward_pre_hooks"]
                or "forward" in md
            ):
                return None
        g = _nn_module
        if (
            g._global_forward_hooks
            or g._global_forward_pre_hooks
            or g._global_backward_hooks
            or g._global_backward_pre_hooks
        ):
            return None
        gd = gate.__dict__
        if gd["override"] is not None or gd.get("proj") is not None or gd["_modules"].get("proj") is not None:
            return None  # forced, or with a bottleneck (proj is a submodule then)
        pa, pb, pg, pw = lora_A._parameters, lora_B._parameters, gate._parameters, base._parameters
        down_w, up_w, gate_w, gate_b, base_w, base_b = (
            pa["weight"],
            pb["weight"],
            pg["weight"],
            pg["bias"],
            pw["weight"],
            pw["bias"],
        )
        dtype = x.dtype
        if (
            pa["bias"] is not None
            or pb["bias"] is not None
            or down_w.dtype != dtype
            or up_w.dtype != dtype
            or gate_w.dtype != dtype
            or gate_b.dtype != dtype
            or base_w.dtype != dtype
            or (base_b is not None and base_b.dtype != dtype)
        ):
            return None
        num_static = gd["num_static"]
        if gate_w.shape[0] + num_static != down_w.shape[0]:
            return None
        base_x = None
        if drop_t is nn.Dropout and dropout.training:
            # PEFT's order: the base reads x, the adapter dropout(x) (the module's forward, the same RNG draw)
            base_x, x = x, F.dropout(x, dropout.p, True, False)
        return kernels.fused_gated_update(
            x,
            None,
            down_w,
            gate_w,
            gate_b,
            up_w,
            d["scaling"][name],
            1.0 / math.sqrt(gd["in_features"]) if gd["logit_scale"] else 1.0,  # gate.input_scale
            num_static,
            base_weight=base_w,
            base_bias=base_b,
            base_input=base_x,
            cache=gd.get("weight_cache"),
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise TypeError(MERGE_ERROR)

    def __repr__(self) -> str:
        return "disel." + super().__repr__().removeprefix("lora.")
