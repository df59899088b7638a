"""Configuration of Queryable LoRA (seed paper 2605.08423), reconstructed from its abstract.

Per adapted layer l the update is ``delta(x) = scaling * U_l R_b(x) D_l x``: D_l (r x d_in, PEFT's lora_A)
and U_l (d_out x r, lora_B) are the layer's own factors; ``R_b = sum_m alpha_m S_m`` is an r x r operator
routed from a memory of M atoms S_m shared by all layers. Layers are grouped in blocks of consecutive layers;
each block computes one routing alpha per sequence. docs/queryable.md lists every reconstruction choice.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any

from peft import LoraConfig

from ..model_card import REQUIRES_HINT, PeftTypeName, write_model_card

# A str with .value/.name like PEFT's PeftType members (transformers and PEFT read peft_type.value)
PEFT_TYPE = PeftTypeName("QUERYABLE")


@dataclass
class QueryableConfig(LoraConfig):
    num_atoms: int = field(default=8, metadata={"help": "Number M of shared r x r update atoms."})
    top_k: int = field(
        default=2, metadata={"help": "Atoms kept per routing (top-k softmax); 1 <= top_k <= num_atoms."}
    )
    block_size: int = field(
        default=1,
        metadata={"help": "Consecutive transformer layers that share one routing decision (a block)."},
    )
    key_dim: int = field(default=16, metadata={"help": "Width of the routing queries and atom keys."})
    use_block_summary: bool = field(
        default=True,
        metadata={"help": "Add an attention summary over earlier blocks' queries to each block's query."},
    )
    prior_dim: int | None = field(
        default=None,
        metadata={
            "help": (
                "Width of a frozen instruction embedding; if set, a linear map of it gives a log-prior over atoms "
                "added to the routing logits (instruction regularisation). Set the embedding per batch with "
                "disel.methods.queryable.instruction_prior(model, embedding)."
            )
        },
    )
    atom_init_noise: float = field(
        default=0.02,
        metadata={
            "help": "Atoms start as identity plus this much Gaussian noise, so routing starts as LoRA."
        },
    )

    # Written into adapter_config.json for whoever opens it after a failed load; read back and ignored.
    requires: InitVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "requires": REQUIRES_HINT}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's save (``adapter_config.json``), then the adapter's model card (README.md)."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory)

    def __post_init__(self, requires: str | None = None) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE

        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"QueryableConfig.{name}={getattr(self, name)!r} is invalid: {fix}.")

        for name in ("num_atoms", "top_k", "block_size", "key_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "use a positive integer")
        if self.top_k > self.num_atoms:
            raise bad("top_k", f"it cannot exceed num_atoms={self.num_atoms}")
        if self.prior_dim is not None and (not isinstance(self.prior_dim, int) or self.prior_dim < 1):
            raise bad("prior_dim", "use a positive integer or None")
        if not isinstance(self.atom_init_noise, (int, float)) or self.atom_init_noise < 0:
            raise bad("atom_init_noise", "use a number >= 0")
        if self.rank_pattern:
            raise bad("rank_pattern", "all layers share r x r atoms, so they must have the same rank r")
        if self.use_dora:
            raise bad("use_dora", "Queryable LoRA routes plain LoRA factors; leave use_dora off")
        if self.init_lora_weights is not True:
            raise bad("init_lora_weights", "keep the default True so the model starts as the base model")
