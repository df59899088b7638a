"""Queryable LoRA: per-layer LoRA factors around an operator routed from atoms shared by all layers."""

from __future__ import annotations

from torch import nn

from ..peft_registration import ensure_registered
from ..registry import MethodOptions, peft_config, register_method
from .config import PEFT_TYPE, QueryableConfig
from .layer import AtomMemory, QueryableLinear, RoutingContext
from .model import QueryableModel, instruction_prior, layer_index, record_routing

ensure_registered()


@register_method(
    "queryable",
    "Queryable LoRA: per-layer LoRA factors around an r x r operator routed (top-k attention) from update "
    "atoms shared by all layers.",
    input_dependent=True,
    options=(QueryableConfig,),
)
def _build_queryable(model: nn.Module, o: MethodOptions) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(QueryableConfig, o))


__all__ = [
    "PEFT_TYPE",
    "AtomMemory",
    "QueryableConfig",
    "QueryableLinear",
    "QueryableModel",
    "RoutingContext",
    "instruction_prior",
    "layer_index",
    "record_routing",
]
