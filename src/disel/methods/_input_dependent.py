"""What every input-dependent LoRA variant here shares (DISeL, Queryable LoRA).

Such an update has no fixed weight delta, so merging must refuse with the method's reason; and the layer is
PEFT's LoRA ``Linear`` (``nn.Linear`` and transformers' ``Conv1D``) with the variant plugged in.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D


class NonMergeableVariant(LoraVariant):
    """A LoRA variant whose update depends on the input: merging and LoRA conversion refuse with ``merge_error``."""

    merge_error: str = "This adapter's update depends on the input and cannot be merged."

    def supports_lora_conversion(self) -> bool:
        return False

    @classmethod
    def merge_safe(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise TypeError(cls.merge_error)

    @classmethod
    def merge_unsafe(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        raise TypeError(cls.merge_error)

    @classmethod
    def unmerge(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise TypeError(cls.merge_error)


def create_linear_layer(
    layer_cls: type[nn.Module], method: str, config: Any, adapter_name: str, target: nn.Module, **kwargs: Any
) -> nn.Module:
    """Wrap ``target`` (nn.Linear or Conv1D, possibly already a tuner layer) in ``layer_cls``."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kwargs.pop("parameter_name", None)
    if isinstance(base, nn.Linear):
        config.fan_in_fan_out = False
        return layer_cls(target, adapter_name, config=config, **kwargs)
    if isinstance(base, Conv1D):
        config.fan_in_fan_out = True
        return layer_cls(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
    raise ValueError(
        f"{method} cannot adapt {type(base).__name__} modules (matched by target_modules); it adapts "
        "torch.nn.Linear and transformers' Conv1D. Narrow target_modules or list the module in exclude_modules."
    )
