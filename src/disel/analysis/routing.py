"""Routing diagnostics: which atoms each block of a Queryable LoRA model uses, per domain."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..methods.queryable.model import record_routing


@torch.no_grad()
def routing_usage(
    model: nn.Module,
    tokenizer: Any,
    domains: Mapping[str, Sequence[str]],
    max_length: int = 128,
    adapter: str | None = None,
) -> dict[str, dict[int, list[float]]]:
    """Mean routing weight of every atom, per block, over each domain's texts (one text per forward).

    Returns ``{domain: {block: [mean alpha_m for m in atoms]}}``; each list sums to 1.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out: dict[str, dict[int, list[float]]] = {}
    for name, texts in domains.items():
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)[
                "input_ids"
            ]
            if len(ids) < 1:
                continue
            with record_routing(model) as rec:
                model(input_ids=torch.tensor([ids], device=dev))
            for ad, block, alpha in rec:
                if adapter is not None and ad != adapter:
                    continue
                sums[block] = sums.get(block, 0) + alpha.double().sum(0).cpu()
                counts[block] = counts.get(block, 0) + alpha.shape[0]
        if not counts:
            raise UserError(f"domain {name!r} gave no routing decision: pass non-empty texts.")
        out[name] = {b: (sums[b] / counts[b]).tolist() for b in sorted(counts)}
    model.train(was_training)
    return out


def plot_routing(usage: Mapping[str, Mapping[int, Sequence[float]]], path: str | Path) -> Path:
    """One heat map per domain: blocks (rows) x atoms (columns), mean routing weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import save_figure

    names = list(usage)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        blocks = sorted(usage[name])
        grid = torch.tensor([usage[name][b] for b in blocks])
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, aspect="auto", cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("atom")
        ax.set_ylabel("block")
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean routing weight")
    return save_figure(fig, path, dpi=110, bbox_inches="tight")
