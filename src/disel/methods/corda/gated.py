"""``disel+corda``: DISeL whose down-projections start on CorDA's directions, while the model starts as the base.

CorDA (KPM) puts its adapter on the right singular directions of ``W Ĉ`` with the smallest singular values,
``v_iᵀ Ĉ⁻¹`` (rows of PEFT's ``lora_A``): input directions the knowledge-to-keep data barely excites through
``W``. Here those rows (normalised, then scaled to the norm of DISeL's usual random rows) become DISeL's
down-projection ``A``; ``B`` stays zero and the gates start closed, so the model computes exactly the base at
initialisation and the base weight is never rewritten (no residual, nothing to export). IPM takes the top
directions of the task data instead. Settings: ``method.options`` (:class:`DiselCordaOptions` and DISeL's) (see docs/corda.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ..registry import MethodOptions, get_method
from .core import MODES, calibration_source, resolve_targets
from .covariance import get_covariances, materialize
from .plusplus import DAMP, layer_weight


@torch.no_grad()
def corda_directions(weight: torch.Tensor, cov: torch.Tensor, r: int, mode: str) -> torch.Tensor:
    """Unit rows ``v_iᵀ Ĉ⁻¹ / ‖v_iᵀ Ĉ⁻¹‖`` of CorDA's adapter: the bottom ``r`` (KPM) or top ``r`` (IPM).

    ``W Ĉ = U Σ Vᵀ`` with ``Ĉ = C + δ·mean(diag C)·I``; ``δ`` starts at PEFT's 0.01 and doubles until
    ``Ĉ`` inverts accurately, as PEFT does. Returns ``min(r, min(out, in))`` rows, in PEFT's order.
    """
    w = weight.double()
    c = cov.double().to(w.device)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    damp = DAMP
    while True:
        c_hat = c + eye * (c.diagonal().mean().clamp_min(1e-12) * damp)
        inv = torch.linalg.inv(c_hat)
        if torch.dist(c_hat @ inv, eye) < 0.05 or damp > 1e6:
            break
        damp *= 2
    _, _, vh = torch.linalg.svd(w @ c_hat, full_matrices=False)
    k = min(r, vh.shape[0])
    rows = (vh[:k] if mode == "ipm" else vh[vh.shape[0] - k :]) @ inv
    return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()


@dataclass
class DiselCordaOptions:
    """``disel+corda``'s own options, beside DISeL's (``DiselConfig`` fields)."""

    mode: str = "kpm"  # "kpm": directions the knowledge to keep barely excites; "ipm": the task's top ones
    cache_dir: str | None = None
    progress: bool = True


def build_disel_corda(model: nn.Module, o: MethodOptions) -> nn.Module:
    """DISeL (built exactly as the ``disel`` method) with ``A`` set from CorDA directions of the calibration data."""
    s = asdict(DiselCordaOptions(**o.pick(DiselCordaOptions)))
    mode = str(s["mode"]).lower()
    if mode not in MODES:
        raise UserError(
            f"disel+corda mode={s.get('mode')!r} is invalid: use 'kpm' (keep knowledge) or 'ipm' (task)."
        )
    targets = resolve_targets(model, o)
    source, field_name = calibration_source(o, mode)
    batches = materialize(source, field_name)
    cs = get_covariances(
        model, targets, batches, cache_dir=s.get("cache_dir"), progress=bool(s.get("progress", True))
    )
    dirs = {n: corda_directions(layer_weight(m), cs.pooled(n), o.rank, mode) for n, m in targets.items()}

    peft_model = get_method("disel").build(model, o)
    inner = peft_model.base_model.model
    placed = []
    with torch.no_grad():
        for n, d in dirs.items():
            layer = inner.get_submodule(n)
            lora_a = getattr(layer, "lora_A", None)
            if lora_a is None or "default" not in lora_a:
                continue  # not adapted by DISeL (e.g. excluded through DISeL's options)
            a = lora_a["default"].weight
            k = min(d.shape[0], a.shape[0])
            # Keep DISeL's usual step sizes: the new rows get the mean norm of the random rows they replace.
            norm = a.float().norm(dim=1).mean()
            a[:k] = (d[:k] * norm).to(device=a.device, dtype=a.dtype)
            placed.append(n)
    if not placed:
        raise UserError(
            "disel+corda found no DISeL layer among the CorDA targets: use the same target_modules for both."
        )
    peft_model._disel_corda_info = {
        "mode": mode,
        "calibration_data": field_name,
        "layers": sorted(placed),
        "cache_key": cs.key,
        "cache_hit": cs.from_cache,
        "calibration_tokens": list(cs.tokens),
    }
    return peft_model


def disel_corda_info(model: nn.Module) -> dict[str, Any]:
    info = getattr(model, "_disel_corda_info", None)
    if info is None:
        raise UserError(
            "This model was not built with the 'disel+corda' method: build it with "
            "disel.methods.build_model(model, 'disel+corda', ...)."
        )
    return dict(info)
