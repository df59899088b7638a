"""Evaluation: target-task metrics and retention (forgetting) measurements.

Heavy dependencies (lm-eval, datasets, peft loaders) are imported only when an evaluation runs.
"""

from .lm import greedy_generate, token_nll
from .runner import best_checkpoint, evaluate_model, evaluate_run, load_spec

__all__ = ["best_checkpoint", "evaluate_model", "evaluate_run", "greedy_generate", "load_spec", "token_nll"]
