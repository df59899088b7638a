"""Training: the config, data formatting, optimizer groups, the Trainer glue and the run."""

from typing import Any

from .optim import build_optimizer, param_groups, with_disel_optimizer

__all__ = ["DiselTrainer", "build_optimizer", "param_groups", "with_disel_optimizer"]


def __getattr__(name: str) -> Any:
    if name == "DiselTrainer":
        from . import optim

        return optim.DiselTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
