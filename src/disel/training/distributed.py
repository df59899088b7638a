"""Process-rank helpers: the same ``disel train`` runs alone, under ``torchrun`` or ``accelerate launch``.

Only the main process (global rank 0) writes the run directory's own files and the results store; the
Trainer itself already restricts checkpoint writing to the processes that should save.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from ..errors import UserError

# torchrun sets RANK / WORLD_SIZE; mpirun (accelerate's multi-CPU launcher) sets one of the others
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int(_RANK_VARS, 0)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int(_WORLD_VARS, 1)


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started this one alone.

    ``accelerate launch --cpu --num_processes N`` (and ``--num_processes N`` or a ``MULTI_CPU`` config on a
    machine without GPUs) runs its simple launcher: without ``--mpirun_hostfile`` it starts one process, with
    a rendezvous address (MASTER_ADDR / MASTER_PORT, set only for N > 1) but no rank and world size.
    """
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    rendezvous = bool(os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"))
    ranked = any(os.environ.get(name, "").strip() for name in (*_WORLD_VARS, *_RANK_VARS))
    if launched_by_accelerate and rendezvous and not ranked:
        raise UserError(
            "accelerate launch started this process alone although more were asked for (its CPU launcher, "
            "used for --cpu, a MULTI_CPU config or --num_processes without GPUs, starts one process unless "
            "it runs mpirun): on CPU launch with `accelerate launch --multi_gpu --num_processes N` (gloo DDP) "
            "or torchrun."
        )


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
