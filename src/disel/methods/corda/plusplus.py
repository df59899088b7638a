"""CorDA++: per-layer covariance selection and cross-layer rank allocation by one compactness metric.

The paper's abstract names the two strategies and says both use "a metric that reflects the compactness of
task-specific principal components"; the formulas below are our reconstruction (see docs/corda.md).

Spectrum. For a layer with weight ``W`` (out x in) and covariance ``C``, CorDA decomposes
``W·Ĉ = U Σ Vᵀ`` with ``Ĉ = C + 0.01·mean(diag C)·I`` (the damping PEFT starts with). Let
``p_i = σ_i² / Σ_j σ_j²`` be the share of the context-weighted energy ``‖W Ĉ‖_F²`` in direction ``i``.

Compactness. ``κ(k) = Σ_{i≤k} p_i`` = 1 − (relative Eckart–Young error of the best rank-k approximation of
``W Ĉ``): how much of the layer's data-weighted behaviour lives in its ``k`` principal directions.
  IPM (adapt the top r):    k = r      → the share the trainable adapter covers.
  KPM (freeze all but the bottom r): k = m − r → the share the frozen residual keeps (m = min(in, out)).
Higher is better in both modes.

Selection: each layer takes the candidate covariance with the largest ``κ`` at the base rank.
Allocation: ranks ``r_l ∈ [r_min, r_max]`` maximise ``Σ_l κ_l(k_l(r_l))`` subject to
``Σ_l r_l·(in_l + out_l) = budget`` (LoRA parameters), solved exactly by dynamic programming over the
budget in units of the gcd of the per-layer costs (a multiple-choice knapsack with equality).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import UserError

DAMP = 0.01
MAX_DP_UNITS = 4_000_000


def layer_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as (out, in), also for GPT-2's transposed ``Conv1D``."""
    w = module.weight.detach().float()
    if type(module).__name__ == "Conv1D":
        w = w.T
    return w


@torch.no_grad()
def energy_spectrum(weight: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``p_i = σ_i² / Σ σ_j²`` of ``W Ĉ`` (descending), in float64."""
    c = cov.double().to(weight.device)
    c = c + torch.eye(c.shape[0], dtype=c.dtype, device=c.device) * (c.diagonal().mean() * DAMP)
    s = torch.linalg.svdvals(weight.double() @ c)
    e = s.pow(2)
    total = e.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(e, 1.0 / e.numel()).cpu()
    return (e / total).cpu()


def compactness(p: torch.Tensor, rank: int, mode: str) -> float:
    """``κ``: share of energy in the top ``rank`` (IPM) or top ``m − rank`` (KPM) directions."""
    m = p.numel()
    k = rank if mode == "ipm" else m - rank
    k = max(0, min(m, k))
    return float(p[:k].sum())


@dataclass
class Selection:
    chosen: dict[str, int]  # layer -> candidate index
    scores: dict[str, list[float]]  # layer -> κ of each candidate


def select_covariances(
    weights: Mapping[str, torch.Tensor],
    candidates: Mapping[str, Sequence[torch.Tensor]],
    rank: int,
    mode: str,
) -> Selection:
    """Per layer, the candidate covariance with the largest compactness at ``rank``."""
    chosen, scores = {}, {}
    for name, w in weights.items():
        sc = [compactness(energy_spectrum(w, c), min(rank, min(w.shape)), mode) for c in candidates[name]]
        scores[name] = sc
        chosen[name] = int(np.argmax(sc))
    return Selection(chosen, scores)


@dataclass
class Allocation:
    ranks: dict[str, int]
    budget: int  # requested LoRA parameters
    spent: int  # parameters the allocation uses
    objective: float  # Σ κ_l at the chosen ranks


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    mode: str,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> Allocation:
    """Ranks maximising the summed compactness under ``Σ r_l·cost_l = budget`` (exactly, when reachable).

    ``costs[l]`` is the LoRA parameter count per rank (in + out). When no allocation spends the budget
    exactly, the largest reachable spend below it is used (``Allocation.spent`` says which).
    """
    names = list(spectra)
    if not names:
        raise UserError("CorDA++ found no target layers: set target_modules to layers the model has.")
    if min_rank < 1:
        raise UserError(
            f"min_rank={min_rank} is invalid: use 1 or more (PEFT needs a rank per target layer)."
        )
    caps = {n: min(spectra[n].numel(), max_rank or spectra[n].numel()) for n in names}
    for n in names:
        if caps[n] < min_rank:
            raise UserError(
                f"max_rank={max_rank} is below min_rank={min_rank} for layer {n}: raise max_rank."
            )
    floor_cost = sum(min_rank * costs[n] for n in names)
    if budget < floor_cost:
        raise UserError(
            f"budget={budget} parameters is below the {floor_cost} that rank {min_rank} in every layer needs: "
            "raise the budget or lower min_rank."
        )
    g = 0
    for n in names:
        g = math.gcd(g, int(costs[n]))
    units = {n: int(costs[n]) // g for n in names}
    cap_units = budget // g
    if cap_units > MAX_DP_UNITS:  # coarsen so the table stays small; exactness is then only approximate
        scale = math.ceil(cap_units / MAX_DP_UNITS)
        g *= scale
        units = {n: max(1, round(costs[n] / g)) for n in names}
        cap_units = budget // g
    neg = -np.inf
    dp = np.full(cap_units + 1, neg)
    dp[0] = 0.0
    choice = np.zeros((len(names), cap_units + 1), dtype=np.int32)
    for li, n in enumerate(names):
        p = spectra[n].double()
        m = p.numel()
        new = np.full(cap_units + 1, neg)
        best_r = np.zeros(cap_units + 1, dtype=np.int32)
        u = units[n]
        for r in range(min_rank, caps[n] + 1):
            shift = r * u
            if shift > cap_units:
                break
            gain = compactness(p, r, mode) if m else 0.0
            cand = np.full(cap_units + 1, neg)
            cand[shift:] = dp[: cap_units + 1 - shift] + gain
            better = cand > new
            new = np.where(better, cand, new)
            best_r = np.where(better, r, best_r)
        dp, choice[li] = new, best_r
    reachable = np.flatnonzero(np.isfinite(dp))
    if reachable.size == 0:
        raise UserError(f"budget={budget} parameters cannot be spent with ranks in [{min_rank}, {max_rank}].")
    b = int(reachable[-1])
    objective = float(dp[b])
    ranks: dict[str, int] = {}
    for li in range(len(names) - 1, -1, -1):
        r = int(choice[li, b])
        ranks[names[li]] = r
        b -= r * units[names[li]]
    ranks = {n: ranks[n] for n in names}
    spent = sum(ranks[n] * int(costs[n]) for n in names)
    return Allocation(ranks=ranks, budget=int(budget), spent=spent, objective=objective)
