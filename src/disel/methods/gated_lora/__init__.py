"""DISeL: LoRA with one input-dependent sigmoid gate per rank-one component."""

from ..peft_registration import ensure_registered
from .config import PEFT_TYPE, DiselConfig
from .layer import DiselGate, DiselLinear, gated_delta
from .model import DiselModel

ensure_registered()

__all__ = ["PEFT_TYPE", "DiselConfig", "DiselGate", "DiselLinear", "DiselModel", "gated_delta"]
