"""disel: fine-tune pretrained models without catastrophic forgetting.

``import disel`` registers DISeL with PEFT, so ``peft.get_peft_model(model, disel.DiselConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work like for any PEFT adapter.
"""

from .analysis.compact import merge_static
from .methods.gated_lora import DiselConfig, DiselGate, DiselLinear, DiselModel
from .methods.gated_lora.utils import force_gates, gate_parameters, iter_gates
from .methods.queryable import QueryableConfig  # registers the QUERYABLE PEFT type too
from .training.optim import DiselTrainer, build_optimizer

__version__ = "0.1.0"

__all__ = [
    "DiselConfig",
    "DiselGate",
    "DiselLinear",
    "DiselModel",
    "DiselTrainer",
    "QueryableConfig",
    "__version__",
    "build_optimizer",
    "force_gates",
    "gate_parameters",
    "iter_gates",
    "merge_static",
]
