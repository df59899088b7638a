"""Queryable LoRA layer: LoRA factors around an r x r operator routed from a shared memory of atoms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from .._input_dependent import NonMergeableVariant

MERGE_ERROR = (
    "Queryable LoRA adapters cannot be merged: the routed operator depends on each input, so there is no fixed "
    "weight update to add; keep the adapter unmerged."
)


class AtomMemory(nn.Module):
    """The memory shared by every layer of one adapter: atoms, their keys and the query maps."""

    def __init__(
        self,
        r: int,
        num_atoms: int,
        key_dim: int,
        top_k: int,
        use_block_summary: bool,
        prior_dim: int | None,
        atom_init_noise: float,
    ) -> None:
        super().__init__()
        self.r, self.num_atoms, self.key_dim, self.top_k = r, num_atoms, key_dim, top_k
        eye = torch.eye(r).expand(num_atoms, r, r).clone()
        self.atoms = nn.Parameter(eye + atom_init_noise * torch.randn(num_atoms, r, r))
        self.keys = nn.Parameter(torch.randn(num_atoms, key_dim) / math.sqrt(key_dim))
        self.query = nn.Linear(r, key_dim)
        self.summary = nn.Linear(key_dim, key_dim, bias=False) if use_block_summary else None
        self.prior = nn.Linear(prior_dim, num_atoms) if prior_dim is not None else None

    def route(
        self, state: torch.Tensor, previous: list[torch.Tensor], prior_input: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, query, logits) for pooled low-rank states ``state`` of shape (batch, r)."""
        q = self.query(state)
        if self.summary is not None and previous:
            mem = torch.stack(previous, dim=1)  # (batch, blocks, key_dim)
            att = torch.softmax(torch.einsum("bk,bnk->bn", q, mem) / math.sqrt(self.key_dim), dim=-1)
            q = q + self.summary(torch.einsum("bn,bnk->bk", att, mem))
        logits = q @ self.keys.T / math.sqrt(self.key_dim)
        if self.prior is not None and prior_input is not None:
            logits = logits + F.log_softmax(self.prior(prior_input.to(logits.dtype)), dim=-1)
        top, idx = logits.topk(self.top_k, dim=-1)
        alpha = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
        return alpha, q, logits


@dataclass
class RoutingContext:
    """Per-forward state shared by the layers of one model: routing of each block, earlier blocks' queries."""

    alpha: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    queries: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    prior_input: torch.Tensor | None = None
    record: list[tuple[str, int, torch.Tensor]] | None = None  # (adapter, block, alpha) when recording

    def reset(self) -> None:
        self.alpha.clear()
        self.queries.clear()


def _pool(h: torch.Tensor) -> torch.Tensor:
    return h.mean(dim=-2) if h.ndim >= 3 else h


def routed_delta(module: QueryableLinear, adapter: str, x: torch.Tensor) -> torch.Tensor:
    ctx: RoutingContext = module._routing_ctx
    memory: AtomMemory = module.lora_memory[adapter]
    h = module.lora_A[adapter](module.lora_dropout[adapter](x))
    key = (adapter, module.block_index)
    alpha = ctx.alpha.get(key)
    if alpha is None or alpha.shape[0] != h.shape[0]:
        previous = ctx.queries.setdefault(adapter, [])
        alpha, q, _ = memory.route(_pool(h), previous, ctx.prior_input)
        ctx.alpha[key] = alpha
        previous.append(q)
        if ctx.record is not None:
            ctx.record.append((adapter, module.block_index, alpha.detach()))
    op = torch.einsum("bm,mij->bij", alpha, memory.atoms)  # (batch, r, r)
    if h.ndim >= 3:
        routed = torch.einsum("btj,bij->bti", h, op)
    else:
        routed = torch.einsum("bj,bij->bi", h, op)
    return module.lora_B[adapter](routed) * module.scaling[adapter]


class QueryableVariant(NonMergeableVariant):
    merge_error = MERGE_ERROR

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: Any = None, **kwargs: Any) -> None:
        if config is None or not hasattr(config, "num_atoms"):
            raise TypeError("The Queryable LoRA layer needs a QueryableConfig.")
        lora_A = module.lora_A[adapter_name]
        memory = AtomMemory(
            module.r[adapter_name],
            config.num_atoms,
            config.key_dim,
            config.top_k,
            config.use_block_summary,
            config.prior_dim,
            float(config.atom_init_noise),
        )
        module.lora_memory[adapter_name] = memory.to(device=lora_A.weight.device, dtype=lora_A.weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return result + routed_delta(module, active_adapter, x)


class QueryableLinear(lora_layer.Linear):
    adapter_layer_names: tuple[str, ...] = (*LoraLayer.adapter_layer_names, "lora_memory")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if "lora_memory" not in self._modules:
            self.lora_memory = nn.ModuleDict({})
        if not hasattr(self, "_routing_ctx"):
            self._routing_ctx = RoutingContext()
            self.block_index = 0
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self) -> dict[tuple[str, ...], type[LoraVariant] | None]:
        return {(): QueryableVariant}

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Queryable LoRA routes whole sequences per block, so mixed batches (adapter_names=...) are not "
                "supported; run one adapter per batch with set_adapter."
            )
        super()._check_forward_args(x, *args, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise TypeError(MERGE_ERROR)

    def __repr__(self) -> str:
        return "queryable." + super().__repr__().removeprefix("lora.")
