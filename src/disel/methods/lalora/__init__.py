"""LaLoRA: a Laplace-approximation penalty on the LoRA weights, alone (``lalora``) or on DISeL (``disel+lalora``).

Building either method estimates the Fisher of the LoRA matrices on ``MethodOptions.calibration`` (the
source-domain batches whose knowledge must be kept) and attaches the penalty
``(lam/2)(theta - theta0)^T P (theta - theta0)`` through ``model._disel_regularizers``. Options come from
``method.options`` (:class:`LaLoRAOptions`) and docs/lalora.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ...errors import UserError
from ..registry import MethodOptions, get_method, register_method
from .curvature import CurvatureState, estimate_curvature, lora_sites, param_names
from .penalty import (
    CURVATURE_FILE,
    LaplacePenalty,
    attach,
    checkpoint_callback,
    get_penalty,
    load_curvature,
    penalty,
    regularizers,
    save_curvature,
    set_lambda,
)


@dataclass
class LaLoRAOptions:
    """LaLoRA's options (``method.options``); see docs/lalora.md."""

    lam: float = (
        1.0  # the one knob: 0 = plain LoRA/DISeL, larger = closer to theta0 along confident directions
    )
    curvature: str = "diag"  # "diag" | "kfac"
    fisher: str = "true"  # "true" (labels sampled from the model) | "empirical" (the data's labels)
    n_batches: int = 8  # calibration batches used for the estimate
    up_init: str = "virtual"  # how the zero up-projection at init is handled: "virtual" | "none"
    up_scale: float = 1.0  # size of the virtual up-projection (the D-block grows with its square)
    prior_prec: float = 0.0  # isotropic floor added to every block
    penalize_gates: bool = False  # DISeL only: also penalise W_g, b_g (diagonal Fisher)
    gates: str = (
        "open"  # DISeL only: LoRA blocks estimated with gates "open" (=1) or at their "actual" values
    )
    seed: int = 0
    curvature_dir: str | None = None  # load lalora_curvature.safetensors from here instead of estimating
    progress: bool = False


DEFAULTS: dict[str, Any] = asdict(LaLoRAOptions())


def lalora_options(o: MethodOptions) -> dict[str, Any]:
    return asdict(LaLoRAOptions(**o.pick(LaLoRAOptions)))


def _callbacks(model: nn.Module) -> list[Any]:
    return [checkpoint_callback()]  # the curvature travels with every checkpoint


def _resume(options: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Resume with the curvature (and theta0) saved beside the checkpoint instead of re-estimating it."""
    if (Path(checkpoint) / CURVATURE_FILE).is_file():
        return {**options, "curvature_dir": str(checkpoint)}
    return options


def add_laplace_penalty(
    model: nn.Module,
    batches: Any,
    *,
    lam: float = 1.0,
    curvature: str = "diag",
    fisher: str = "true",
    n_batches: int | None = 8,
    up_init: str = "virtual",
    up_scale: float = 1.0,
    prior_prec: float = 0.0,
    penalize_gates: bool = False,
    gates: str = "open",
    seed: int = 0,
    progress: bool = False,
) -> LaplacePenalty:
    """Estimate the curvature of ``model``'s LoRA matrices on ``batches`` and attach the penalty."""
    state: CurvatureState = estimate_curvature(
        model,
        batches,
        curvature=curvature,  # type: ignore[arg-type]
        fisher=fisher,  # type: ignore[arg-type]
        n_batches=n_batches,
        up_init=up_init,  # type: ignore[arg-type]
        up_scale=float(up_scale),
        include_gates=bool(penalize_gates),
        gates=gates,
        seed=int(seed),
        progress=progress,
    )
    names = param_names(model)
    params: dict[str, nn.Parameter] = {}
    for s in lora_sites(model):
        for p in (s.A.weight, s.B.weight):
            params[names[id(p)]] = p  # type: ignore[assignment]
        if penalize_gates and s.gate is not None:
            for p in (s.gate.weight, s.gate.bias):
                params[names[id(p)]] = p  # type: ignore[assignment]
    theta0 = {n: p.detach() for n, p in params.items()}
    reg = LaplacePenalty(params, theta0, state, lam=lam, prior_prec=prior_prec)
    return attach(model, reg)


def _with_lalora(model: nn.Module, o: MethodOptions) -> nn.Module:
    opts = lalora_options(o)
    cdir = opts.pop("curvature_dir")
    if cdir is not None and (Path(cdir) / CURVATURE_FILE).is_file():
        load_curvature(model, cdir, lam=opts["lam"])
        return model
    if o.calibration is None:
        raise UserError(
            "LaLoRA needs source-domain batches to estimate curvature: pass calibration=<callable returning "
            "batches> in the method options (or the option curvature_dir with a saved curvature)."
        )
    add_laplace_penalty(model, o.calibration(), **opts)
    return model


@register_method(
    "lalora",
    "LaLoRA: LoRA with a Laplace (Fisher) penalty that keeps the LoRA weights near their start along "
    "directions the source data is confident about (needs calibration data).",
    options=(LaLoRAOptions,),
    components=("lora",),
    callbacks=_callbacks,
    resume=_resume,
)
def _build_lalora(model: nn.Module, o: MethodOptions) -> nn.Module:
    return _with_lalora(get_method("lora").build(model, o), o)


@register_method(
    "disel+lalora",
    "DISeL with LaLoRA's Laplace penalty on its LoRA matrices (gates unpenalised by default; needs "
    "calibration data).",
    input_dependent=True,
    options=(LaLoRAOptions,),
    components=("disel", "lalora"),
    callbacks=_callbacks,
    resume=_resume,
)
def _build_disel_lalora(model: nn.Module, o: MethodOptions) -> nn.Module:
    return _with_lalora(get_method("disel").build(model, o), o)


__all__ = [
    "CURVATURE_FILE",
    "DEFAULTS",
    "LaLoRAOptions",
    "LaplacePenalty",
    "add_laplace_penalty",
    "estimate_curvature",
    "get_penalty",
    "load_curvature",
    "penalty",
    "regularizers",
    "save_curvature",
    "set_lambda",
    "lalora_options",
    "attach",
    "checkpoint_callback",
]
