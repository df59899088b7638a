"""The DISeL tuner: PEFT's LoraModel with gated layers, registered as its own PEFT type."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PEFT_TYPE, DiselConfig
from .layer import MERGE_ERROR, DiselGate, DiselLinear


class DiselModel(LoraModel):
    """Creates DISeL layers in place of the targeted linear layers of a model.

    Use it through PEFT: ``peft.get_peft_model(model, disel.DiselConfig(...))``.
    """

    prefix: str = "lora_"

    @staticmethod
    def _create_new_module(lora_config: DiselConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kwargs.pop("parameter_name", None)
        if isinstance(base, nn.Linear):
            lora_config.fan_in_fan_out = False
            return DiselLinear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, Conv1D):
            lora_config.fan_in_fan_out = True
            return DiselLinear(
                target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs
            )
        raise ValueError(
            f"DISeL cannot adapt {type(base).__name__} modules (matched by target_modules); it adapts "
            "torch.nn.Linear and transformers' Conv1D. Narrow target_modules or list the module in "
            "exclude_modules."
        )

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


def register() -> None:
    """Make PEFT know the DISeL type (idempotent; runs on ``import disel``)."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = DiselConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = DiselModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = DiselModel.prefix
