"""Optimizer parameter groups for DISeL.

The gates learn a different problem from the LoRA factors (telling fine-tuning inputs from the rest), so
they get their own, larger learning rate, and no weight decay: decay pulls W_g to zero, which removes the
input dependence the gates exist for. Biases and normalisation weights get no decay either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.gated_lora.gate_recipe import gate_lr_multiplier
from ..methods.gated_lora.layer import DiselGate

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(
    model: nn.Module, lr: float, gate_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Three groups of trainable parameters: ``decay``, ``no_decay`` (biases, norms) and ``gates``.

    ``gate_lr`` defaults to ``lr`` times the adapter config's ``gate_lr_multiplier`` (DiselConfig's default if none).
    Empty groups are left out.
    """
    if lr <= 0:
        raise ValueError(f"learning rate {lr!r} must be positive.")
    if gate_lr is None:
        gate_lr = lr * gate_lr_multiplier(model)
    if gate_lr <= 0:
        raise ValueError(f"gate learning rate {gate_lr!r} must be positive.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay {weight_decay!r} must be >= 0.")

    gate_ids = {id(p) for m in model.modules() if isinstance(m, DiselGate) for p in m.parameters()}
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if name.endswith("bias") or p.ndim < 2:
            no_decay_ids.add(id(p))

    decay, no_decay, gates = [], [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in gate_ids:
            gates.append(p)
        elif id(p) in no_decay_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    if not (decay or no_decay or gates):
        raise ValueError("The model has no trainable parameters; did you forget get_peft_model(...)?")
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "gates", "params": gates, "lr": gate_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    gate_lr: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """AdamW (by default) over :func:`param_groups`: gates at ``gate_lr`` without decay."""
    groups = param_groups(model, lr=lr, gate_lr=gate_lr, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, betas=betas, eps=eps, **optimizer_kwargs)


def with_disel_optimizer(trainer_cls: type) -> type:
    """Subclass a ``transformers.Trainer`` (or TRL's ``SFTTrainer``) that takes ``gate_lr=``.

    Every Trainer that trains a DISeL model already gives the gates their own group (lr x the adapter's
    ``gate_lr_multiplier``, no decay; see :mod:`disel.methods.gated_lora.gate_recipe`), on top of the optimizer
    the Trainer builds from ``args.optim`` / ``optim_args`` for the model it is given; this subclass only adds
    the ``gate_lr=`` override.
    """
    from ..methods.gated_lora.gate_recipe import install_trainer_hook

    install_trainer_hook()

    class _DiselTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, gate_lr: float | None = None, **kwargs: Any) -> None:
            self.gate_lr = gate_lr
            super().__init__(*args, **kwargs)

    _DiselTrainer.__name__ = f"Disel{trainer_cls.__name__}"
    _DiselTrainer.__qualname__ = _DiselTrainer.__name__
    return _DiselTrainer


def __getattr__(name: str) -> Any:
    # ``DiselTrainer`` is built on first use: subclassing ``transformers.Trainer`` imports most of
    # transformers, which ``import disel`` must not pay for.
    if name == "DiselTrainer":
        from transformers import Trainer

        cls = with_disel_optimizer(Trainer)
        globals()["DiselTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
