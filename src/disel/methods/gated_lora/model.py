"""The DISeL tuner: PEFT's LoraModel with gated layers, registered as its own PEFT type."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraModel
from torch import nn

from .._input_dependent import create_linear_layer
from .config import DiselConfig
from .gate_recipe import install_trainer_hook
from .layer import MERGE_ERROR, DiselGate, DiselLinear


class DiselModel(LoraModel):
    """Creates DISeL layers in place of the targeted linear layers of a model.

    Use it through PEFT: ``peft.get_peft_model(model, disel.DiselConfig(...))``.
    """

    prefix: str = "lora_"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # any Trainer that trains this model (stock, TRL's) gives the gates their own lr and no decay
        install_trainer_hook()
        super().__init__(*args, **kwargs)

    @staticmethod
    def _create_new_module(config: Any, adapter_name: str, target: nn.Module, **kwargs: Any):
        return create_linear_layer(DiselLinear, "DISeL", config, adapter_name, target, **kwargs)

    def _check_new_adapter_config(self, config: DiselConfig) -> None:
        if not isinstance(config, DiselConfig):
            raise TypeError(
                f"A DISeL model takes DiselConfig adapters, got {type(config).__name__}; build the adapter "
                "config with disel.DiselConfig(...)."
            )
        if config.target_parameters:
            raise ValueError(
                f"DiselConfig.target_parameters={config.target_parameters!r} is not supported: DISeL gates the "
                "output of linear layers; use target_modules instead."
            )
        super()._check_new_adapter_config(config)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        raise TypeError(MERGE_ERROR)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(MERGE_ERROR)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "DISeL adapters cannot be combined with add_weighted_adapter: the gates of different adapters do "
            "not add up to one gated update. Use set_adapter, or mixed batches with adapter_names=..."
        )

    def gate_modules(self, adapter_name: str | None = None) -> dict[str, DiselGate]:
        """Map of module name to the gate of ``adapter_name`` (default: the active adapter)."""
        adapter_name = adapter_name or self.active_adapters[0]
        out: dict[str, DiselGate] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, DiselLinear) and adapter_name in module.lora_gate:
                out[name] = module.lora_gate[adapter_name]
        return out
