"""CorDA and CorDA++ (context-oriented decomposition adaptation) as disel methods.

``corda``: PEFT's CorDA (KPM or IPM) with batched, cached covariance collection.
``corda++``: per-layer covariance selection and rank allocation by a compactness metric, fed to PEFT.
Settings: ``MethodOptions.extra["corda"]`` (and ``extra["corda++"]`` for CorDA++), see docs/corda.md.
"""

from __future__ import annotations

from torch import nn

from ..registry import MethodOptions, register_method
from .core import (
    CordaInfo,
    build_corda,
    corda_info,
    export_to_lora,
    original_base,
    original_base_state,
    resolve_targets,
    save_initial_adapter,
)
from .covariance import CovarianceSet, get_covariances
from .plusplus import allocate_ranks, compactness, energy_spectrum, select_covariances


@register_method(
    "corda",
    "CorDA (PEFT): adapter from the SVD of weight x input covariance of calibration data; KPM freezes the "
    "data's principal directions (calibrate on knowledge to keep), IPM adapts them (calibrate on the task).",
)
def _build_corda(model: nn.Module, o: MethodOptions) -> nn.Module:
    return build_corda(model, o, "corda")


@register_method(
    "corda++",
    "CorDA++: CorDA with per-layer choice among candidate covariances and rank allocation under a parameter "
    "budget, both by one compactness metric.",
)
def _build_corda_pp(model: nn.Module, o: MethodOptions) -> nn.Module:
    return build_corda(model, o, "corda++")


__all__ = [
    "CordaInfo",
    "CovarianceSet",
    "allocate_ranks",
    "build_corda",
    "compactness",
    "corda_info",
    "energy_spectrum",
    "export_to_lora",
    "get_covariances",
    "original_base",
    "original_base_state",
    "resolve_targets",
    "save_initial_adapter",
    "select_covariances",
]
