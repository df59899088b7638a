"""Record DISeL's post-sigmoid gate values during ordinary forward passes.

``GateRecorder`` hangs a forward hook on every :class:`~disel.DiselGate` and folds each batch into running
sums, exact threshold counts and fixed-bin histograms per gate module and rank, so memory does not grow with
the number of sequences. It also keeps, per sequence, the mean gate of each module over the masked tokens:
that small matrix (sequences x modules) is what the per-sequence domain score is computed from.

    with GateRecorder(model) as rec:
        for batch, mask in batches:
            rec.set_mask(mask)          # (batch, seq) bool: which tokens count (e.g. response tokens)
            model(**batch)
    stats = rec.stats()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods.gated_lora.layer import DiselGate
from ..methods.gated_lora.utils import iter_gates
from .sites import GateSite, parse_gate_name
from .stats import GateStats

__all__ = ["GateRecorder", "GateSite", "parse_gate_name"]


@dataclass
class _Acc:
    """Running statistics of one gate module (all tensors float64/int64 on CPU)."""

    r: int
    bins: int
    thresholds: tuple[float, ...]
    count: int = 0
    sum: torch.Tensor = field(init=False)
    sumsq: torch.Tensor = field(init=False)
    min: torch.Tensor = field(init=False)
    max: torch.Tensor = field(init=False)
    hist: torch.Tensor = field(init=False)
    below: torch.Tensor = field(init=False)  # (len(thresholds), r): count of g < t
    above: torch.Tensor = field(init=False)  # (len(thresholds), r): count of g > t

    def __post_init__(self) -> None:
        r, nt = self.r, len(self.thresholds)
        self.sum = torch.zeros(r, dtype=torch.float64)
        self.sumsq = torch.zeros(r, dtype=torch.float64)
        self.min = torch.full((r,), float("inf"), dtype=torch.float64)
        self.max = torch.full((r,), float("-inf"), dtype=torch.float64)
        self.hist = torch.zeros(r, self.bins, dtype=torch.int64)
        self.below = torch.zeros(nt, r, dtype=torch.int64)
        self.above = torch.zeros(nt, r, dtype=torch.int64)

    def add(self, g: torch.Tensor) -> None:
        """Fold ``g`` (n, r), already masked, into the statistics."""
        if g.shape[0] == 0:
            return
        g64 = g.detach().to(torch.float64)
        self.count += g64.shape[0]
        self.sum += g64.sum(0).cpu()
        self.sumsq += (g64 * g64).sum(0).cpu()
        self.min = torch.minimum(self.min, g64.min(0).values.cpu())
        self.max = torch.maximum(self.max, g64.max(0).values.cpu())
        idx = (g64 * self.bins).floor().clamp_(0, self.bins - 1).long()
        idx = idx + torch.arange(self.r, device=idx.device) * self.bins
        self.hist += (
            torch.bincount(idx.reshape(-1), minlength=self.r * self.bins).view(self.r, self.bins).cpu()
        )
        for i, t in enumerate(self.thresholds):
            self.below[i] += (g64 < t).sum(0).cpu()
            self.above[i] += (g64 > t).sum(0).cpu()


class GateRecorder:
    """Context manager that records the gates of ``model`` on every forward pass inside the block.

    ``bins``: fixed histogram bins on [0, 1]. ``thresholds``: values t for which the exact number of gate
    values below and above t is counted per rank (compaction uses these, so its decisions are exact, not
    histogram estimates). ``adapter``: record only the gates of this adapter (default: all).
    The token mask is given per batch with :meth:`set_mask` (None: every token counts).
    """

    def __init__(
        self,
        model: nn.Module,
        bins: int = 50,
        thresholds: Sequence[float] = (),
        adapter: str | None = None,
        per_sequence: bool = True,
    ):
        if bins < 1:
            raise ValueError(f"bins={bins} is invalid: use a positive number of histogram bins such as 50.")
        self.model = model
        self.bins = int(bins)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.per_sequence = per_sequence
        self.sites: dict[str, GateSite] = {}
        self._gates: dict[str, DiselGate] = {}
        for name, gate in iter_gates(model):
            site = parse_gate_name(name)
            if adapter is not None and site.adapter != adapter:
                continue
            self.sites[name] = site
            self._gates[name] = gate
        if not self._gates:
            raise ValueError("GateRecorder found no DISeL gate in the model; is a DISeL adapter loaded?")
        self._acc = {n: _Acc(g.r, self.bins, self.thresholds) for n, g in self._gates.items()}
        self._order = {n: i for i, n in enumerate(self._gates)}
        self._mask: torch.Tensor | None = None
        self._batch_sum: torch.Tensor | None = None  # (batch, modules): sum over masked tokens of mean_r g
        self._batch_tokens: torch.Tensor | None = None  # (batch,)
        self._seq_means: list[torch.Tensor] = []
        self._seq_tokens: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> GateRecorder:
        for name, gate in self._gates.items():
            self._handles.append(gate.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (gates regain their fast path) and flush the pending batch."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._flush()

    # -- masks -----------------------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor | None) -> None:
        """The tokens that count for the next forward pass: bool (batch, seq) or (n,), or None for all.

        Also closes the previous batch's per-sequence record.
        """
        self._flush()
        self._mask = None if mask is None else mask.bool()

    def _flush(self) -> None:
        if self._batch_sum is not None and self._batch_tokens is not None:
            tokens = self._batch_tokens.clamp(min=1).unsqueeze(1)
            self._seq_means.append((self._batch_sum / tokens).float())
            self._seq_tokens.append(self._batch_tokens.clone())
        self._batch_sum = None
        self._batch_tokens = None

    # -- the hook --------------------------------------------------------------------------------------
    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._record(name, output)

        return hook

    @torch.no_grad()
    def _record(self, name: str, g: torch.Tensor) -> None:
        lead = g.shape[:-1]
        mask = self._mask
        if mask is None:
            mask = torch.ones(lead, dtype=torch.bool, device=g.device)
        elif tuple(mask.shape) != tuple(lead):
            raise ValueError(
                f"GateRecorder mask has shape {tuple(mask.shape)} but the gate {name} saw tokens of shape "
                f"{tuple(lead)}; pass a mask shaped like the batch's input_ids (batch, seq)."
            )
        mask = mask.to(g.device)
        self._acc[name].add(g[mask])
        if not self.per_sequence:
            return
        if g.dim() == 2:  # (n, r): each row is its own sequence
            g, mask = g.unsqueeze(1), mask.unsqueeze(1)
        elif g.dim() > 3:
            g, mask = g.flatten(1, -2), mask.flatten(1)
        batch = g.shape[0]
        if self._batch_sum is None:
            self._batch_sum = torch.zeros(batch, len(self._gates), dtype=torch.float64)
            self._batch_tokens = mask.sum(1).cpu().long()
        per_token = g.double().mean(-1) * mask
        self._batch_sum[:, self._order[name]] += per_token.sum(1).cpu()

    # -- results ---------------------------------------------------------------------------------------
    def stats(self):
        """A :class:`~disel.analysis.stats.GateStats` snapshot of everything recorded so far."""
        self._flush()
        seq = torch.cat(self._seq_means) if self._seq_means else torch.zeros(0, len(self._gates))
        tok = torch.cat(self._seq_tokens) if self._seq_tokens else torch.zeros(0, dtype=torch.long)
        return GateStats.from_accumulators(
            self.sites, self._acc, self.bins, self.thresholds, seq_means=seq, seq_tokens=tok
        )
