"""DISeL: LoRA with one input-dependent sigmoid gate per rank-one component."""

from .config import PEFT_TYPE, DiselConfig
from .layer import DiselGate, DiselLinear, gated_delta
from .model import DiselModel, register

register()

__all__ = ["PEFT_TYPE", "DiselConfig", "DiselGate", "DiselLinear", "DiselModel", "gated_delta", "register"]
