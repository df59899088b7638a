"""Configuration of DISeL (Dynamic Input-Sensitive LoRA).

DISeL multiplies each rank-one LoRA component by an input-dependent sigmoid gate:

    delta(x) = scaling * U (g(x) * (D x)),   g(x) = sigmoid(W_g x + b_g)

with D = ``lora_A`` (r x d_in), U = ``lora_B`` (d_out x r), W_g (r x d_in) and b_g (r). U starts at zero
(so the model starts as the base model) and b_g starts negative (so the gates start nearly closed).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from peft import LoraConfig

from ..model_card import REQUIRES_HINT, PeftTypeName, write_model_card

# A str with .value/.name like PEFT's PeftType members (transformers and PEFT read peft_type.value)
PEFT_TYPE = PeftTypeName("DISEL")

_LORA_VARIANT_FIELDS = {
    "use_dora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}


@dataclass
class DiselConfig(LoraConfig):
    """A :class:`peft.LoraConfig` with the fields of DISeL's gates.

    Every LoRA field keeps its meaning (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ...).
    The gate fields are below; ``docs/config.md`` explains what each does to the trade-off between
    adapting to the new task and keeping the base model's behaviour.
    """

    gate_bias_init: float = field(
        default=-3.0,
        metadata={
            "help": (
                "Initial value of every gate bias b_g. sigmoid(-3) ~ 0.047: the gates start nearly closed. "
                "More negative keeps more of the base model (use -5 or -7 on small data sets)."
            )
        },
    )
    gate_weight_init: Literal["kaiming", "zero"] = field(
        default="kaiming",
        metadata={
            "help": (
                "Initialisation of the gate weight W_g. 'kaiming' (default, Kaiming-uniform) makes the gate input "
                "dependent from the start; 'zero' removes the input dependence at init (ablation only)."
            )
        },
    )
    gate_logit_scale: bool = field(
        default=False,
        metadata={
            "help": (
                "Divide the gate's input term W_g x by sqrt(d_in) before adding b_g, which keeps gate logits of "
                "wide layers in the same range as narrow ones."
            )
        },
    )
    gate_bottleneck: int | None = field(
        default=None,
        metadata={
            "help": (
                "If set, the gate becomes sigmoid(W_g P x + b_g) with P of shape (bottleneck x d_in): fewer gate "
                "parameters for wide layers. 8 to 32 is typical. None (default) uses a full r x d_in gate."
            )
        },
    )
    gate_lr_multiplier: float = field(
        default=5.0,
        metadata={
            "help": (
                "Learning rate of the gate parameters divided by the LoRA learning rate (5.0 as in the paper's 7B "
                "runs). Higher opens more gates (more plasticity), lower keeps more closed (more retention)."
            )
        },
    )
    static_rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Written by `disel compact`: module name (pattern, matched like rank_pattern) -> k, meaning the "
                "first k rank components of that module's adapter are ungated (gate = 1, a plain LoRA part); "
                "its gate only computes the other r - k rows. Empty (default): every component is gated."
            )
        },
    )

    # Written into adapter_config.json (see :meth:`to_dict`) for whoever opens it after a failed load; read
    # back and ignored. An init-only variable, so it is no option of the method.
    requires: InitVar[str | None] = None

    def static_rank_for(self, module_name: str) -> int:
        """Number of ungated leading components of the adapter on ``module_name`` (0 if none)."""
        if not self.static_rank_pattern or not module_name:
            return 0
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(self.static_rank_pattern), module_name)
        return int(self.static_rank_pattern.get(key, 0))

    def __post_init__(self, requires: str | None = None) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._validate_gate_fields()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "requires": REQUIRES_HINT}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's save (``adapter_config.json``), then the adapter's model card (README.md): PEFT saves the
        config after writing its own card, so every ``PeftModel.save_pretrained`` ends with disel's card."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory)

    def _validate_gate_fields(self) -> None:
        def bad(name: str, value: object, fix: str) -> ValueError:
            return ValueError(f"DiselConfig.{name}={value!r} is invalid: {fix}.")

        if isinstance(self.gate_bias_init, bool) or not isinstance(self.gate_bias_init, (int, float)):
            raise bad("gate_bias_init", self.gate_bias_init, "use a number such as -3.0")
        if not math.isfinite(self.gate_bias_init):
            raise bad("gate_bias_init", self.gate_bias_init, "use a finite number such as -3.0")
        self.gate_bias_init = float(self.gate_bias_init)
        if self.gate_weight_init not in ("kaiming", "zero"):
            raise bad("gate_weight_init", self.gate_weight_init, "use 'kaiming' (default) or 'zero'")
        if not isinstance(self.gate_logit_scale, bool):
            raise bad("gate_logit_scale", self.gate_logit_scale, "use True or False")
        if self.gate_bottleneck is not None and (
            isinstance(self.gate_bottleneck, bool)
            or not isinstance(self.gate_bottleneck, int)
            or self.gate_bottleneck < 1
        ):
            raise bad("gate_bottleneck", self.gate_bottleneck, "use a positive integer such as 16, or None")
        if (
            isinstance(self.gate_lr_multiplier, bool)
            or not isinstance(self.gate_lr_multiplier, (int, float))
            or not math.isfinite(self.gate_lr_multiplier)
            or self.gate_lr_multiplier <= 0
        ):
            raise bad("gate_lr_multiplier", self.gate_lr_multiplier, "use a positive number such as 5.0")
        self.gate_lr_multiplier = float(self.gate_lr_multiplier)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", self.r, "use a positive integer rank such as 16")
        for name, neutral in _LORA_VARIANT_FIELDS.items():
            value = getattr(self, name, neutral)
            if value not in (neutral, False, None):
                raise bad(name, value, "DISeL gates plain LoRA components; leave LoRA variants off")
        if self.init_lora_weights is not True:
            raise bad(
                "init_lora_weights",
                self.init_lora_weights,
                "DISeL must start as the base model, so keep the default True (up-projection = 0)",
            )
        if not isinstance(self.static_rank_pattern, dict):
            raise bad("static_rank_pattern", self.static_rank_pattern, "use a dict of module name -> int")
        max_r = max([self.r, *[v for v in (self.rank_pattern or {}).values() if isinstance(v, int)]])
        for key, k in self.static_rank_pattern.items():
            if (
                not isinstance(key, str)
                or isinstance(k, bool)
                or not isinstance(k, int)
                or not 0 <= k <= max_r
            ):
                raise bad(
                    "static_rank_pattern",
                    {key: k},
                    f"map module names to a number of ungated components between 0 and the rank ({max_r})",
                )
        if self.layers_to_transform is not None and self.target_modules is None:
            raise bad("target_modules", None, "name the modules to adapt, e.g. 'all-linear'")
