"""Evaluation: target-task metrics and retention (forgetting) measurements."""

from .lm import greedy_generate, token_nll

__all__ = ["greedy_generate", "token_nll"]
