"""Where a gate sits in a model: its module, block index, module type and adapter, from its name."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class GateSite:
    """Where a gate sits: the adapted module's name, its block index (None if not in a numbered block),
    its module type (the path after the block index, e.g. ``self_attn.q_proj``) and the adapter name."""

    gate_name: str
    module: str
    layer: int | None
    mtype: str
    adapter: str


def parse_gate_name(gate_name: str) -> GateSite:
    """Split ``...layers.3.self_attn.q_proj.lora_gate.default`` into its parts."""
    module, _, adapter = gate_name.rpartition(".lora_gate.")
    if not module:
        module, adapter = gate_name, ""
    module = module.removeprefix("base_model.model.")
    matches = list(_LAYER_RE.finditer(f".{module}."))
    if matches:
        m = matches[-1]
        layer = int(m.group(1))
        mtype = f".{module}."[m.end() :].strip(".") or module
    else:
        layer, mtype = None, module
    return GateSite(gate_name, module, layer, mtype, adapter)
