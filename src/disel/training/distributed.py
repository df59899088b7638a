"""Process-rank helpers: the same ``disel train`` runs alone, under ``torchrun`` or ``accelerate launch``.

Only the main process (global rank 0) writes the run directory's own files and the results store; the
Trainer itself already restricts checkpoint writing to the processes that should save.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


def global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return global_rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def trainable_hash(model: nn.Module) -> str:
    """SHA-256 over the names and values of the trainable parameters: equal across ranks that stay in sync."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
