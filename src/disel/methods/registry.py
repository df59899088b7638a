"""One registry from a method name to the function that adapts a model.

Each method is registered once with :func:`register_method`; the pipeline, the demo and the CLI look
methods up here instead of branching on names. Methods built on PEFT return a ``PeftModel``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from torch import nn


@dataclass
class MethodOptions:
    """What every method may read. Fields a method does not use are ignored by it."""

    rank: int = 8
    alpha: float | None = None  # default 2 * rank, as in the paper
    dropout: float = 0.0
    target_modules: str | list[str] | None = "all-linear"
    task_type: str | None = None  # PEFT TaskType name, e.g. "CAUSAL_LM", "SEQ_CLS"
    modules_to_save: list[str] | None = None
    total_steps: int | None = None  # AdaLoRA's schedule needs it
    gate_bias_init: float = -3.0
    gate_lr_multiplier: float = 5.0
    gate_bottleneck: int | None = None
    gate_logit_scale: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific settings
    # Model-ready batches (dicts of tensors: input_ids, attention_mask, labels) of the method's calibration
    # or source-domain data, for methods that need data at build time (LaLoRA's curvature, CorDA's
    # covariance). A zero-argument callable so the data is only made when a method asks for it.
    calibration: Callable[[], Iterable[dict[str, Any]]] | None = None
    # The same kind of batches drawn from the FINE-TUNING TASK (e.g. the first training batches), for methods
    # that must preview the task at build time (CorDA's instruction-previewed mode). Separate from
    # ``calibration`` because the two play opposite roles: knowledge to keep vs. task to learn.
    task_calibration: Callable[[], Iterable[dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"rank={self.rank!r} is invalid: use a positive integer such as 8.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout={self.dropout!r} is invalid: use a value in [0, 1).")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def peft_common(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "r": self.rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": float(self.dropout),
            "target_modules": self.target_modules,
        }
        if self.task_type:
            kw["task_type"] = self.task_type
        if self.modules_to_save:
            kw["modules_to_save"] = list(self.modules_to_save)
        return kw


Builder = Callable[["nn.Module", MethodOptions], "nn.Module"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    build: Builder
    uses_peft: bool = True
    input_dependent: bool = False


METHODS: dict[str, MethodSpec] = {}

# Modules that register more methods when imported (kept lazy so `import disel` stays light).
# A module listed here that is not installed is skipped.
_PLUGIN_MODULES: list[str] = ["disel.methods.lalora", "disel.methods.corda", "disel.methods.queryable"]
_plugins_loaded = False


def register_method(
    name: str, description: str, *, uses_peft: bool = True, input_dependent: bool = False
) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        if name in METHODS:
            raise KeyError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, description, fn, uses_peft, input_dependent)
        return fn

    return deco


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in _PLUGIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def available_methods() -> dict[str, MethodSpec]:
    _load_plugins()
    return dict(METHODS)


def get_method(name: str) -> MethodSpec:
    methods = available_methods()
    if name not in methods:
        raise UserError(f"Unknown method {name!r}: choose one of {', '.join(sorted(methods))}.")
    return methods[name]


def build_model(model: nn.Module, method: str, options: MethodOptions | None = None, **kw: Any) -> nn.Module:
    """Adapt ``model`` with ``method``; ``kw`` are :class:`MethodOptions` fields."""
    spec = get_method(method)
    opts = options if options is not None else MethodOptions(**kw)
    return spec.build(model, opts)


# --------------------------------------------------------------------------------------------------
# Built-in methods


@register_method(
    "disel",
    "DISeL: LoRA whose rank-one components are scaled by input-dependent sigmoid gates that start closed.",
    input_dependent=True,
)
def _build_disel(model: nn.Module, o: MethodOptions) -> nn.Module:
    from peft import get_peft_model

    from .gated_lora import DiselConfig

    cfg = DiselConfig(
        **o.peft_common(),
        gate_bias_init=o.gate_bias_init,
        gate_lr_multiplier=o.gate_lr_multiplier,
        gate_bottleneck=o.gate_bottleneck,
        gate_logit_scale=o.gate_logit_scale,
        **o.extra.get("disel", {}),
    )
    return get_peft_model(model, cfg)


@register_method("lora", "LoRA (PEFT): a fixed low-rank update applied to every input.")
def _build_lora(model: nn.Module, o: MethodOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**o.peft_common(), **o.extra.get("lora", {})))


@register_method("dora", "DoRA (PEFT): LoRA with a learned per-column magnitude (weight decomposition).")
def _build_dora(model: nn.Module, o: MethodOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**o.peft_common(), use_dora=True, **o.extra.get("dora", {})))


@register_method(
    "adalora",
    "AdaLoRA (PEFT): SVD-form LoRA whose rank budget is pruned during training "
    "(needs total_steps; the trainer calls update_and_allocate each step).",
)
def _build_adalora(model: nn.Module, o: MethodOptions) -> nn.Module:
    from peft import AdaLoraConfig, get_peft_model

    if not o.total_steps:
        raise UserError("AdaLoRA needs total_steps (its rank schedule spans the run): set total_steps > 0.")
    extra = dict(o.extra.get("adalora", {}))
    total = int(o.total_steps)
    tinit = extra.pop("tinit", max(1, total // 10))
    tfinal = extra.pop("tfinal", max(1, total // 5))
    if tinit + tfinal >= total:
        tinit, tfinal = 0, 0
    kw = o.peft_common()
    kw.pop("r")
    cfg = AdaLoraConfig(
        **kw,
        init_r=extra.pop("init_r", int(round(o.rank * 1.5))),
        target_r=extra.pop("target_r", o.rank),
        total_step=total,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=extra.pop("deltaT", 1),
        **extra,
    )
    return get_peft_model(model, cfg)


@register_method("full", "Full fine-tuning: every parameter trains (no adapter).", uses_peft=False)
def _build_full(model: nn.Module, o: MethodOptions) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
