"""Queryable LoRA tuner: ties one atom memory per adapter across layers and assigns layers to blocks."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .._input_dependent import create_linear_layer
from .config import QueryableConfig
from .layer import MERGE_ERROR, AtomMemory, QueryableLinear, RoutingContext

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int:
    """Index of the transformer layer a module belongs to (0 if the name has none)."""
    m = _LAYER_INDEX.search(module_name)
    return int(m.group(1)) if m else 0


class QueryableModel(LoraModel):
    prefix: str = "lora_"

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self._routing_ctx = RoutingContext()
        super().__init__(model, config, adapter_name, **kwargs)
        self.model.register_forward_pre_hook(lambda *_: self._routing_ctx.reset())

    @staticmethod
    def _create_new_module(config: Any, adapter_name: str, target: nn.Module, **kwargs: Any):
        return create_linear_layer(QueryableLinear, "Queryable LoRA", config, adapter_name, target, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config: QueryableConfig = self.peft_config[adapter_name]
        shared: AtomMemory | None = None
        for name, module in model.named_modules():
            if isinstance(module, QueryableLinear) and adapter_name in module.lora_memory:
                module._routing_ctx = self._routing_ctx
                module.block_index = layer_index(name) // config.block_size
                if shared is None:
                    shared = module.lora_memory[adapter_name]
                else:
                    module.lora_memory[adapter_name] = shared

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise TypeError(MERGE_ERROR)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(MERGE_ERROR)

    def memory(self, adapter_name: str | None = None) -> AtomMemory:
        adapter_name = adapter_name or self.active_adapters[0]
        for module in self.model.modules():
            if isinstance(module, QueryableLinear) and adapter_name in module.lora_memory:
                return module.lora_memory[adapter_name]
        raise KeyError(f"no Queryable LoRA adapter named {adapter_name!r}")


def _tuner(model: nn.Module) -> QueryableModel:
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, QueryableModel):
        raise TypeError("expected a model built with get_peft_model(..., QueryableConfig(...))")
    return tuner


@contextmanager
def instruction_prior(model: nn.Module, embedding: torch.Tensor) -> Iterator[None]:
    """Within the block, routing logits get the log-prior computed from ``embedding`` (batch, prior_dim)."""
    ctx = _tuner(model)._routing_ctx
    previous = ctx.prior_input
    ctx.prior_input = embedding
    try:
        yield
    finally:
        ctx.prior_input = previous


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[tuple[str, int, torch.Tensor]]]:
    """Collect (adapter, block, alpha) for every routing decision made inside the block."""
    ctx = _tuner(model)._routing_ctx
    ctx.record = []
    try:
        yield ctx.record
    finally:
        ctx.record = None
