"""disel: fine-tune pretrained models without catastrophic forgetting.

``import disel`` registers DISeL with PEFT, so ``peft.get_peft_model(model, disel.DiselConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work like for any PEFT adapter.

The import itself is cheap: the public names below load on first use, and the PEFT types are registered
the moment PEFT is imported (see :mod:`disel.methods.peft_registration`).
"""

from __future__ import annotations

import importlib
from typing import Any

from .methods import peft_registration as _peft_registration

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "DiselConfig": "disel.methods.gated_lora",
    "DiselGate": "disel.methods.gated_lora",
    "DiselLinear": "disel.methods.gated_lora",
    "DiselModel": "disel.methods.gated_lora",
    "QueryableConfig": "disel.methods.queryable",
    "force_gates": "disel.methods.gated_lora.utils",
    "gate_parameters": "disel.methods.gated_lora.utils",
    "iter_gates": "disel.methods.gated_lora.utils",
    "DiselTrainer": "disel.training.optim",
    "build_optimizer": "disel.training.optim",
    "merge_static": "disel.analysis.compact",
}

_SUBPACKAGES = frozenset(
    {"analysis", "assets", "data", "evaluation", "experiments", "loading", "methods", "report", "results"}
    | {"rundir", "training", "utils", "errors", "testing", "testing_tokenizers"}
)

__all__ = sorted([*_LAZY, "__version__"])

_peft_registration.install()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if name in _SUBPACKAGES:  # ``disel.training.with_disel_optimizer`` without importing disel.training
            return importlib.import_module(f"disel.{name}")
        raise AttributeError(f"module 'disel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
