"""Small helpers over the gates of a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .layer import DiselGate


def iter_gates(model: nn.Module) -> Iterator[tuple[str, DiselGate]]:
    """Yield (qualified name, gate) for every DISeL gate of every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, DiselGate):
            yield name, module


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gate parameters (W_g, b_g and the bottleneck projection, if any) of ``model``."""
    return [p for _, gate in iter_gates(model) for p in gate.parameters()]


@contextmanager
def force_gates(model: nn.Module, value: float) -> Iterator[None]:
    """Within the block every gate outputs ``value`` (1.0: plain LoRA, 0.0: base model)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"force_gates value {value!r} is outside [0, 1]; gates are sigmoid outputs.")
    gates = [g for _, g in iter_gates(model)]
    previous = [g.override for g in gates]
    for g in gates:
        g.override = float(value)
    try:
        yield
    finally:
        for g, p in zip(gates, previous):
            g.override = p
