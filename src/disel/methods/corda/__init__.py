"""CorDA and CorDA++ (context-oriented decomposition adaptation) as disel methods.

``corda``: PEFT's CorDA (KPM or IPM) with batched, cached covariance collection.
``corda++``: per-layer covariance selection and rank allocation by a compactness metric, fed to PEFT.
``disel+corda``: DISeL with its down-projections initialised on CorDA directions (the base stays untouched).
KPM reads ``MethodOptions.calibration`` (knowledge to keep), IPM reads ``MethodOptions.task_calibration``.
Options: ``method.options`` (:class:`CordaOptions`, :class:`CordaPlusPlusOptions`), see docs/corda.md.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from torch import nn

from ..registry import MethodOptions, register_method
from .core import (
    CordaInfo,
    CordaOptions,
    CordaPlusPlusOptions,
    balance_factors,
    build_corda,
    calibration_source,
    corda_info,
    export_to_lora,
    original_base,
    original_base_state,
    resolve_targets,
    save_initial_adapter,
)
from .covariance import CovarianceSet, get_covariances
from .gated import DiselCordaOptions, build_disel_corda, corda_directions, disel_corda_info
from .plusplus import allocate_ranks, compactness, energy_spectrum, select_covariances


def _export(model: nn.Module, directory: Path) -> None:
    export_to_lora(model, directory)


@register_method(
    "corda",
    "CorDA (PEFT): adapter from the SVD of weight x input covariance of calibration data; KPM freezes the "
    "data's principal directions (calibrate on knowledge to keep), IPM adapts them (calibrate on the task).",
    options=(LoraConfig, CordaOptions),
    export=_export,
)
def _build_corda(model: nn.Module, o: MethodOptions) -> nn.Module:
    return build_corda(model, o, "corda")


@register_method(
    "corda++",
    "CorDA++: CorDA with per-layer choice among candidate covariances and rank allocation under a parameter "
    "budget, both by one compactness metric.",
    options=(LoraConfig, CordaOptions, CordaPlusPlusOptions),
    components=("corda",),
    export=_export,
)
def _build_corda_pp(model: nn.Module, o: MethodOptions) -> nn.Module:
    return build_corda(model, o, "corda++")


@register_method(
    "disel+corda",
    "DISeL whose down-projections start on CorDA's KPM directions of the knowledge to keep (inputs that data "
    "barely excites); B = 0 and closed gates keep the model exactly the base at init.",
    input_dependent=True,
    options=(DiselCordaOptions,),
    components=("disel",),
)
def _build_disel_corda(model: nn.Module, o: MethodOptions) -> nn.Module:
    return build_disel_corda(model, o)


__all__ = [
    "CordaInfo",
    "CordaOptions",
    "CordaPlusPlusOptions",
    "DiselCordaOptions",
    "CovarianceSet",
    "allocate_ranks",
    "balance_factors",
    "build_corda",
    "build_disel_corda",
    "calibration_source",
    "compactness",
    "corda_directions",
    "corda_info",
    "disel_corda_info",
    "energy_spectrum",
    "export_to_lora",
    "get_covariances",
    "original_base",
    "original_base_state",
    "resolve_targets",
    "save_initial_adapter",
    "select_covariances",
]
