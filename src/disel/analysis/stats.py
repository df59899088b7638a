"""Statistics of recorded gates: per depth band, module type and rank; per-sequence domain scores; AUROC.

Depth bands split the distinct block indices seen into thirds (early / middle / late), as in the paper's
figures 4 and 5. Histograms are normalised to sum to one over [0, 1] and pool every (token, rank) value of
the modules in a group, so a group's mean equals the mean of its histogram's underlying values exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .sites import GateSite

BANDS = ("early", "middle", "late")

# Per-sequence domain scores (see docs/gates.md):
#   "mean": mean gate over the sequence's masked tokens, all ranks and all gated modules;
#   "mid_late": the same over the modules of the middle and late depth bands only (early gates stay
#               closed for every domain, so they add noise and no signal).
SCORES = ("mean", "mid_late")


def band_of(position: int, n_layers: int) -> str:
    """Band of the ``position``-th (0-based) of ``n_layers`` distinct blocks: thirds, early first."""
    if n_layers <= 0:
        return "all"
    return BANDS[min(2, (3 * position) // n_layers)]


def short_labels(mtypes: Iterable[str]) -> dict[str, str]:
    """Shortest trailing dotted suffix that still tells the module types apart (``self_attn.q_proj`` -> ``q_proj``)."""
    mtypes = sorted(set(mtypes))
    out = {}
    for m in mtypes:
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            cand = ".".join(parts[-k:])
            if sum(1 for o in mtypes if o == cand or o.endswith("." + cand)) == 1:
                out[m] = cand
                break
        else:
            out[m] = m
    return out


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve that ``positive`` scores rank above ``negative`` ones.

    Computed as the Mann-Whitney U statistic over average ranks (ties count one half), i.e. the probability
    that a random positive scores higher than a random negative.
    """
    pos = torch.as_tensor(list(positive), dtype=torch.float64)
    neg = torch.as_tensor(list(negative), dtype=torch.float64)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score.")
    allv = torch.cat([pos, neg])
    order = torch.argsort(allv, stable=True)
    sorted_v = allv[order]
    ranks = torch.empty_like(allv)
    i, n = 0, allv.numel()
    while i < n:  # average ranks over ties (1-based)
        j = i
        while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = pos.numel(), neg.numel()
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@dataclass
class ModuleStats:
    """Exact running statistics of one gate module: per-rank tensors over the masked tokens."""

    site: GateSite
    count: int  # masked tokens seen
    sum: torch.Tensor  # (r,)
    sumsq: torch.Tensor  # (r,)
    min: torch.Tensor  # (r,)
    max: torch.Tensor  # (r,)
    hist: torch.Tensor  # (r, bins) int64
    below: torch.Tensor  # (n_thresholds, r) count of g < t
    above: torch.Tensor  # (n_thresholds, r) count of g > t

    @property
    def r(self) -> int:
        return int(self.sum.numel())

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def std(self) -> torch.Tensor:
        m = self.mean()
        return (self.sumsq / max(self.count, 1) - m * m).clamp(min=0).sqrt()

    def quantile(self, q: float) -> torch.Tensor:
        """Per-rank ``q``-quantile estimated from the histogram (upper edge of the bin reaching ``q``)."""
        bins = self.hist.shape[1]
        cdf = self.hist.cumsum(1).double() / max(self.count, 1)
        idx = (cdf < q - 1e-12).sum(1).clamp(max=bins - 1)
        return ((idx + 1).double() / bins).clamp(max=1.0)


class GateStats:
    """Gate statistics of one recording (one domain), by module and rank, with grouping helpers."""

    def __init__(
        self,
        modules: dict[str, ModuleStats],
        bins: int,
        thresholds: tuple[float, ...],
        seq_means: torch.Tensor,
        seq_tokens: torch.Tensor,
    ):
        self.modules = modules
        self.bins = bins
        self.thresholds = thresholds
        self.seq_means = seq_means  # (sequences, modules) in the order of self.modules
        self.seq_tokens = seq_tokens  # (sequences,)
        layers = sorted({m.site.layer for m in modules.values() if m.site.layer is not None})
        self._band = {layer: band_of(i, len(layers)) for i, layer in enumerate(layers)}
        self.labels = short_labels(m.site.mtype for m in modules.values())

    @classmethod
    def from_accumulators(cls, sites, accs, bins, thresholds, seq_means, seq_tokens) -> GateStats:
        modules = {
            name: ModuleStats(
                sites[name],
                a.count,
                a.sum.clone(),
                a.sumsq.clone(),
                a.min.clone(),
                a.max.clone(),
                a.hist.clone(),
                a.below.clone(),
                a.above.clone(),
            )
            for name, a in accs.items()
        }
        return cls(modules, bins, thresholds, seq_means, seq_tokens)

    # -- grouping --------------------------------------------------------------------------------------
    def band(self, name: str) -> str:
        layer = self.modules[name].site.layer
        return "all" if layer is None else self._band[layer]

    def label(self, name: str) -> str:
        return self.labels[self.modules[name].site.mtype]

    def bands(self) -> list[str]:
        present = {self.band(n) for n in self.modules}
        return [b for b in (*BANDS, "all") if b in present]

    def module_types(self) -> list[str]:
        return sorted({self.label(n) for n in self.modules})

    def group(self, band: str | None = None, mtype: str | None = None, rank: int | None = None) -> dict:
        """Pooled statistics of the modules in ``band`` and of type ``mtype`` (short label), optionally one
        ``rank`` index: ``{"count", "mean", "hist"}`` with a normalised histogram (list of ``bins`` floats)."""
        hist = torch.zeros(self.bins, dtype=torch.float64)
        total, count = 0.0, 0
        for name, m in self.modules.items():
            if band is not None and self.band(name) != band:
                continue
            if mtype is not None and self.label(name) != mtype:
                continue
            if rank is not None:
                if rank >= m.r:
                    continue
                hist += m.hist[rank].double()
                total += float(m.sum[rank])
                count += m.count
            else:
                hist += m.hist.sum(0).double()
                total += float(m.sum.sum())
                count += m.count * m.r
        norm = (hist / count).tolist() if count else [0.0] * self.bins
        return {"count": count, "mean": total / count if count else float("nan"), "hist": norm}

    def frac_below(self, name: str, t: float) -> torch.Tensor:
        """Exact per-rank fraction of values < ``t`` (``t`` must be one of the recorded thresholds)."""
        m = self.modules[name]
        return m.below[self._tidx(t)].double() / max(m.count, 1)

    def frac_above(self, name: str, t: float) -> torch.Tensor:
        """Exact per-rank fraction of values > ``t`` (``t`` must be one of the recorded thresholds)."""
        m = self.modules[name]
        return m.above[self._tidx(t)].double() / max(m.count, 1)

    def _tidx(self, t: float) -> int:
        for i, x in enumerate(self.thresholds):
            if math.isclose(x, t, rel_tol=0, abs_tol=1e-12):
                return i
        raise ValueError(f"threshold {t} was not recorded; pass it in GateRecorder(thresholds=...).")

    # -- per-sequence scores ---------------------------------------------------------------------------
    def sequence_scores(self, kind: str = "mid_late") -> torch.Tensor:
        """One score per recorded sequence with at least one masked token (see :data:`SCORES`)."""
        if kind not in SCORES:
            raise ValueError(f"score kind {kind!r} is unknown: use one of {', '.join(SCORES)}.")
        keep = self.seq_tokens > 0
        seq = self.seq_means[keep].double()
        if seq.numel() == 0:
            return torch.zeros(0, dtype=torch.float64)
        names = list(self.modules)
        weights = torch.tensor([self.modules[n].r for n in names], dtype=torch.float64)
        if kind == "mid_late":
            sel = torch.tensor([self.band(n) in ("middle", "late", "all") for n in names])
            if sel.any():
                weights = weights * sel
        return (seq * weights).sum(1) / weights.sum()

    # -- export ----------------------------------------------------------------------------------------
    def summary(self, per_rank: bool = True) -> dict:
        """JSON-ready summary: overall, by band, by module type, by band x type, and per module."""
        out: dict = {
            "bins": self.bins,
            "sequences": int((self.seq_tokens > 0).sum()),
            "tokens": max((m.count for m in self.modules.values()), default=0),
            "overall": _short(self.group()),
            "by_band": {b: self.group(band=b) for b in self.bands()},
            "by_type": {t: _short(self.group(mtype=t)) for t in self.module_types()},
            "by_band_type": {
                b: {t: _short(self.group(band=b, mtype=t)) for t in self.module_types()} for b in self.bands()
            },
            "modules": {},
        }
        adapters = {m.site.adapter for m in self.modules.values()}
        for name, m in self.modules.items():
            entry = {
                "layer": m.site.layer,
                "band": self.band(name),
                "type": self.label(name),
                "adapter": m.site.adapter,
                "r": m.r,
                "tokens": m.count,
                "mean": float(m.mean().mean()) if m.count else None,
            }
            if per_rank and m.count:
                entry["rank_mean"] = [round(float(v), 6) for v in m.mean()]
                entry["rank_min"] = [round(float(v), 6) for v in m.min]
                entry["rank_max"] = [round(float(v), 6) for v in m.max]
                entry["rank_p01"] = [round(float(v), 4) for v in m.quantile(0.01)]
                entry["rank_p99"] = [round(float(v), 4) for v in m.quantile(0.99)]
            key = m.site.module if len(adapters) == 1 else f"{m.site.module}@{m.site.adapter}"
            out["modules"][key] = entry
        return out


def _short(group: dict) -> dict:
    return {"count": group["count"], "mean": group["mean"]}
