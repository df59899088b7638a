"""DISeL's optimizer recipe, wherever a DISeL model trains: the gates in their own parameter group, at their
own learning rate (``lr x gate_lr_multiplier``) and without weight decay.

The gates learn a different problem from the LoRA factors (telling fine-tuning inputs from the rest); weight
decay pulls W_g to zero, which removes the input dependence the gates exist for. A stock
``transformers.Trainer`` (and so TRL's ``SFTTrainer``, ``DPOTrainer``, ...) puts them in its decayed group at
the base learning rate: building a DISeL model therefore hooks ``Trainer.create_optimizer`` once, so that
after the Trainer built its optimizer (whatever ``args.optim``: AdamW, SGD, Adafactor, fused, 8-bit and
paged optimisers) the gate parameters are moved into a group of their own. Nothing else of the Trainer's
optimizer changes; models without gates are untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import DiselConfig
from .layer import DiselGate

logger = logging.getLogger("disel")
GROUP_NAME = "gates"


def gate_lr_multiplier(model: nn.Module) -> float:
    """The active adapter config's ``gate_lr_multiplier`` (DiselConfig's default when it has none)."""
    configs = getattr(model, "peft_config", None)
    if configs is None and hasattr(model, "module"):  # DDP / accelerate wrappers
        configs = getattr(model.module, "peft_config", None)
    if isinstance(configs, dict):
        active = getattr(model, "active_adapter", None)
        if isinstance(active, list):
            active = active[0] if active else None
        cfg = configs.get(active) if isinstance(active, str) else None
        cfg = cfg if cfg is not None else next(iter(configs.values()), None)
        mult = getattr(cfg, "gate_lr_multiplier", None)
        if mult is not None:
            return float(mult)
    return float(DiselConfig.__dataclass_fields__["gate_lr_multiplier"].default)


def trainable_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in model.modules():
        if isinstance(m, DiselGate):
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def apply_gate_recipe(
    optimizer: torch.optim.Optimizer, model: nn.Module, gate_lr: float | None = None
) -> bool:
    """Move ``model``'s gate parameters out of ``optimizer``'s groups into one group at ``gate_lr`` (default:
    the base group's lr x ``gate_lr_multiplier``) with no weight decay. Call it before the first step (and
    before a scheduler is built on the optimizer). Returns whether anything moved; idempotent."""
    gates = {id(p) for p in trainable_gate_parameters(model)}
    if not gates or any(g.get("name") == GROUP_NAME for g in optimizer.param_groups):
        return False
    moved: list[nn.Parameter] = []
    base_lr = None
    for group in optimizer.param_groups:
        inside = [p for p in group["params"] if id(p) in gates]
        if inside:
            base_lr = group["lr"] if base_lr is None else base_lr
            moved += inside
            group["params"] = [p for p in group["params"] if id(p) not in gates]
    if not moved:
        return False
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    lr = gate_lr if gate_lr is not None else float(base_lr) * gate_lr_multiplier(model)
    group: dict[str, Any] = {"params": moved, "lr": lr, "name": GROUP_NAME}
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = 0.0
    optimizer.add_param_group(group)
    return True


def install_trainer_hook() -> None:
    """Make every ``transformers.Trainer`` apply :func:`apply_gate_recipe` to the optimizer it builds
    (idempotent; a no-op for models without DISeL gates). ``trainer.gate_lr`` overrides the gate lr."""
    import transformers

    trainer = transformers.Trainer
    if getattr(trainer.create_optimizer, "_disel_gate_recipe", False):
        return
    original = trainer.create_optimizer

    def create_optimizer(self: Any, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = original(self) if model is None else original(self, model)
        target = self.model if model is None else model
        if apply_gate_recipe(optimizer, target, getattr(self, "gate_lr", None)):
            g = next(g for g in optimizer.param_groups if g.get("name") == GROUP_NAME)
            logger.info("disel: DISeL gates in their own optimizer group (lr %.3g, no weight decay)", g["lr"])
        return optimizer

    create_optimizer._disel_gate_recipe = True  # type: ignore[attr-defined]
    create_optimizer.__doc__ = original.__doc__
    trainer.create_optimizer = create_optimizer  # type: ignore[method-assign]
