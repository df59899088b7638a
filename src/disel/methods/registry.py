"""One registry from a method name to everything the pipeline needs of that method.

Each method is registered once with :func:`register_method`: how it adapts a model, its options (one or more
dataclasses whose fields are the names ``method.options`` accepts), and its training-time behaviour: Trainer
callbacks (AdaLoRA's rank allocation, LaLoRA's curvature beside each checkpoint), an export of what loads on
the original base (CorDA rewrites the base weights), method state restored on resume. Regularisers are
attached to the model by the build itself (``model._disel_regularizers``). The trainer, the evaluator, the
demo and the CLI look methods up here and name none.

Adding a method = its folder under ``methods/`` + one ``@register_method`` (see docs/methods.md).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..utils.typed import coerce

if TYPE_CHECKING:
    from torch import nn

# Fields every method reads from MethodOptions itself, never from ``options`` (and PEFT's bookkeeping).
COMMON_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "task_type",
        "modules_to_save",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "total_step",
    }
)


@dataclass
class MethodOptions:
    """What every method may read. ``options`` holds the method's own settings (see :class:`MethodSpec`)."""

    rank: int = 8
    alpha: float | None = None  # default 2 * rank, as in the paper
    dropout: float = 0.0
    target_modules: str | list[str] | None = "all-linear"
    task_type: str | None = None  # PEFT TaskType name, e.g. "CAUSAL_LM", "SEQ_CLS"
    modules_to_save: list[str] | None = None
    total_steps: int | None = None  # AdaLoRA's schedule needs it
    # The method's own options, e.g. {"gate_bias_init": -5.0} for DISeL: flat keys for the method being built,
    # and/or sections named after methods ({"disel": {...}, "adalora": {...}}), each applied only when that
    # method (or a method combining it, e.g. disel+lalora) is built. Checked against the method's dataclasses.
    options: dict[str, Any] = field(default_factory=dict)
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
        if not isinstance(self.options, dict):
            raise UserError(f"options={self.options!r} is invalid: use a mapping of option names to values.")

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

    def pick(self, *classes: type) -> dict[str, Any]:
        """The options that are fields of ``classes`` (after :func:`resolve_options`, all of them are)."""
        names = set().union(*(option_fields(c) for c in classes))
        return {k: copy.deepcopy(v) for k, v in self.options.items() if k in names}


Builder = Callable[["nn.Module", MethodOptions], "nn.Module"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``options``: dataclasses whose fields are the method's option names (a PEFT config class counts: its
    fields minus :data:`COMMON_FIELDS`). ``components``: methods it combines, whose option sections apply
    too (``disel+lalora`` reads ``options.disel`` and ``options.lalora``).
    ``starts_as_base``: the adapted model computes the base model's function at init (up to float error).
    ``rank_scaled_lr``: ``training.rank_scaled_lr`` applies to its learning rate.
    ``callbacks(model)``: ``transformers.TrainerCallback`` objects the Trainer runs for this method.
    ``export(model, dir)``: writes, beside every saved checkpoint, what loads on the ORIGINAL base model
    (``rundir.EXPORT_DIR``), for methods whose native adapter needs a rewritten base.
    ``resume(options, checkpoint_dir)``: the options of a run resumed from that checkpoint (method state
    saved beside it, e.g. LaLoRA's curvature, instead of recomputing it).
    """

    name: str
    description: str
    build: Builder
    uses_peft: bool = True
    input_dependent: bool = False
    options: tuple[type, ...] = ()
    components: tuple[str, ...] = ()
    starts_as_base: bool = True
    rank_scaled_lr: bool = False
    callbacks: Callable[[nn.Module], list[Any]] | None = None
    export: Callable[[nn.Module, Path], None] | None = None
    resume: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None

    @property
    def sections(self) -> tuple[str, ...]:
        return (*self.components, self.name)

    def option_fields(self) -> dict[str, Any]:
        """Option name -> type annotation, over the option dataclasses of this method and its components."""
        out: dict[str, Any] = {}
        for comp in self.components:
            out.update(get_method(comp).option_fields())
        for cls in self.options:
            out.update(option_fields(cls))
        return out


def option_fields(cls: type) -> dict[str, Any]:
    """Field name -> annotation of an option dataclass (PEFT's own fields of a PEFT config left out)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.name not in COMMON_FIELDS}


METHODS: dict[str, MethodSpec] = {}

# Modules that register more methods when imported (kept lazy so `import disel` stays light).
_PLUGIN_MODULES: tuple[str, ...] = ("disel.methods.lalora", "disel.methods.corda", "disel.methods.queryable")
_plugins_loaded = False


def register_method(name: str, description: str, **behaviour: Any) -> Callable[[Builder], Builder]:
    """Register the decorated builder as method ``name``; ``behaviour`` are :class:`MethodSpec` fields
    (``options``, ``components``, ``callbacks``, ``export``, ``resume``, ``starts_as_base``, ...)."""
    allowed = {f.name for f in dataclasses.fields(MethodSpec)} - {"name", "description", "build"}
    unknown = set(behaviour) - allowed
    if unknown:
        raise TypeError(f"register_method got unknown field(s) {sorted(unknown)}")

    def deco(fn: Builder) -> Builder:
        if name in METHODS:
            raise KeyError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, description, fn, **behaviour)
        return fn

    return deco


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    _builtin()
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


def resolve_options(method: str, options: Mapping[str, Any] | None, where: str = "options") -> dict[str, Any]:
    """The flat, checked options of ``method`` from a mapping of flat keys and per-method sections.

    Sections named after other methods are checked against those methods and left out; the sections of
    ``method`` and of the methods it combines are merged in order, then the flat keys. An unknown or
    misspelt option, or a value of the wrong type, is a :class:`UserError` naming it.
    """
    spec = get_method(method)
    methods = available_methods()
    options = dict(options or {})
    flat = {k: v for k, v in options.items() if k not in methods}
    merged: dict[str, Any] = {}
    for name, section in options.items():
        if name not in methods:
            continue
        if not isinstance(section, Mapping):
            raise UserError(
                f"{where}.{name}={section!r} is invalid: give the options of method {name!r} as a mapping."
            )
        checked = _check(methods[name], dict(section), f"{where}.{name}")
        if name in spec.sections:
            merged.setdefault(name, checked)
    out: dict[str, Any] = {}
    for name in spec.sections:
        out.update(merged.get(name, {}))
    out.update(_check(spec, flat, where))
    return out


def _check(spec: MethodSpec, options: dict[str, Any], where: str) -> dict[str, Any]:
    known = spec.option_fields()
    out = {}
    for key, value in options.items():
        if key not in known:
            raise UserError(
                f"Unknown option {where}.{key} for method {spec.name!r}{_options_hint(spec, key)}"
            )
        out[key] = coerce(value, known[key], f"{where}.{key}")
    return out


def _options_hint(spec: MethodSpec, key: str) -> str:
    """``(did you mean 'mode'?): its options are ...`` with PEFT configs named instead of listed."""
    import difflib

    known = spec.option_fields()
    close = difflib.get_close_matches(key, list(known), n=1)
    classes = [c for s in (*[get_method(n) for n in spec.components], spec) for c in s.options]
    peft_classes = sorted({c.__name__ for c in classes if any(b.__name__ == "PeftConfig" for b in c.__mro__)})
    own = sorted({n for c in classes if c.__name__ not in peft_classes for n in option_fields(c)})
    parts = [", ".join(own)] if own else []
    if peft_classes:
        parts.append(f"the fields of {' and '.join(peft_classes)}")
    listed = "; ".join(parts) or "none"
    return (f" (did you mean {close[0]!r}?)" if close else "") + f": its options are {listed}."


def build_model(
    model: nn.Module, method: str, method_options: MethodOptions | None = None, /, **kw: Any
) -> nn.Module:
    """Adapt ``model`` with ``method``; ``kw`` are :class:`MethodOptions` fields (``options=`` the method's own
    options), checked against the method (:func:`resolve_options`) before anything is built."""
    spec = get_method(method)
    if method_options is not None and kw:
        raise TypeError("build_model takes a MethodOptions or its fields as keywords, not both")
    opts = method_options if method_options is not None else MethodOptions(**kw)
    opts = dataclasses.replace(opts, options=resolve_options(method, opts.options))
    try:
        return spec.build(model, opts)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        # an option value a config class rejects (DiselConfig, LoraConfig, ...): its message names the option
        if not any(k in str(e) for k in opts.options):
            raise
        raise UserError(f"method {method!r}: {e}") from e


def peft_config(cls: type, o: MethodOptions, **fixed: Any) -> Any:
    """A PEFT config of ``cls`` from the common fields, the options that are its fields, and ``fixed``."""
    return cls(**{**o.peft_common(), **o.pick(cls), **fixed})


# --------------------------------------------------------------------------------------------------
# Built-in methods (registered on the first lookup: their option classes import PEFT)


def _adalora_callbacks(model: nn.Module) -> list[Any]:
    from transformers import TrainerCallback

    class AdaLoraAllocation(TrainerCallback):
        """AdaLoRA prunes its rank budget from the gradients: ``update_and_allocate`` after every optimizer
        step, before the gradients are zeroed."""

        def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[override]
            m = kwargs.get("model")
            base = getattr(m, "base_model", None)
            if base is not None and hasattr(base, "update_and_allocate"):
                base.update_and_allocate(state.global_step)
            return control

    return [AdaLoraAllocation()]


def _builtin() -> None:
    from peft import AdaLoraConfig, LoraConfig

    from .gated_lora.config import DiselConfig

    @register_method(
        "disel",
        "DISeL: LoRA whose rank-one components are scaled by input-dependent sigmoid gates that start closed.",
        input_dependent=True,
        options=(DiselConfig,),
        rank_scaled_lr=True,
    )
    def _build_disel(model: nn.Module, o: MethodOptions) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(DiselConfig, o))

    @register_method(
        "lora",
        "LoRA (PEFT): a fixed low-rank update applied to every input.",
        options=(LoraConfig,),
        rank_scaled_lr=True,
    )
    def _build_lora(model: nn.Module, o: MethodOptions) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(LoraConfig, o))

    @register_method(
        "dora",
        "DoRA (PEFT): LoRA with a learned per-column magnitude (weight decomposition).",
        options=(LoraConfig,),
        rank_scaled_lr=True,
    )
    def _build_dora(model: nn.Module, o: MethodOptions) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(LoraConfig, o, use_dora=True))

    @register_method(
        "adalora",
        "AdaLoRA (PEFT): SVD-form LoRA whose rank budget is pruned during training "
        "(needs total_steps; the trainer calls update_and_allocate each step).",
        options=(AdaLoraConfig,),
        callbacks=_adalora_callbacks,
    )
    def _build_adalora(model: nn.Module, o: MethodOptions) -> nn.Module:
        from peft import get_peft_model

        if not o.total_steps:
            raise UserError(
                "AdaLoRA needs total_steps (its rank schedule spans the run): set total_steps > 0."
            )
        given = o.pick(AdaLoraConfig)
        total = int(o.total_steps)
        tinit = given.pop("tinit", max(1, total // 10))
        tfinal = given.pop("tfinal", max(1, total // 5))
        if tinit + tfinal >= total:
            tinit, tfinal = 0, 0
        kw = o.peft_common()
        kw.pop("r")
        cfg = AdaLoraConfig(
            **kw,
            **{
                "init_r": int(round(o.rank * 1.5)),
                "target_r": o.rank,
                "deltaT": 1,
                **given,
                "total_step": total,
                "tinit": tinit,
                "tfinal": tfinal,
            },
        )
        return get_peft_model(model, cfg)

    @register_method("full", "Full fine-tuning: every parameter trains (no adapter).", uses_peft=False)
    def _build_full(model: nn.Module, o: MethodOptions) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
