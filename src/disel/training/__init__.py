"""Training components: optimizer groups and Trainer glue."""

from .optim import DiselTrainer, build_optimizer, param_groups, with_disel_optimizer

__all__ = ["DiselTrainer", "build_optimizer", "param_groups", "with_disel_optimizer"]
