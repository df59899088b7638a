"""Evaluation: target-task metrics and retention (forgetting) measurements.

Importing the package is cheap (no torch): its public names load on first use, so the code sandbox's
worker processes (``python -m disel.evaluation.sandbox``) do not pay for torch. Heavy dependencies
(lm-eval, datasets, peft loaders) are imported only when an evaluation runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "greedy_generate": ".lm",
    "token_nll": ".lm",
    "best_checkpoint": ".runner",
    "evaluate_model": ".runner",
    "evaluate_run": ".runner",
    "load_spec": ".runner",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
