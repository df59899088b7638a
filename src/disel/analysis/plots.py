"""Figures of gate statistics (matplotlib, Agg backend): the paper's figures 4 and 5 for any adapter.

* :func:`plot_domains`: one panel per depth band, one normalised histogram per domain (figure 4).
* :func:`plot_modules`: one panel per depth band, one normalised histogram per module type, for one
  domain (figure 5).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..utils.io import save_figure
from .stats import GateStats


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_grid(plt, n: int, title: str):
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), sharey=True, squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _draw(ax, group: dict, bins: int, label: str) -> None:
    edges = [i / bins for i in range(bins + 1)]
    ax.stairs(group["hist"], edges, label=f"{label} (mean {group['mean']:.3f})", linewidth=1.5)


def _finish(fig: Any, axes: Any, bands: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Titles, log scale and legends of the depth-band panels, then write the PNG."""
    for ax, band in zip(axes, bands):
        ax.set_title(f"{band} layers")
        ax.set_xlabel("gate value")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of (token, rank) values")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_domains(
    stats: Mapping[str, GateStats], path: str | os.PathLike[str], target: str | None = None
) -> None:
    """Histograms of gate values per domain, one panel per depth band; saves a PNG at ``path``."""
    plt = _plt()
    first = next(iter(stats.values()))
    bands = first.bands()
    title = "Gate values by domain and depth" + (f" (fine-tuning domain: {target})" if target else "")
    fig, axes = _panel_grid(plt, len(bands), title)
    for ax, band in zip(axes, bands):
        for name, st in stats.items():
            _draw(ax, st.group(band=band), st.bins, name + (" *" if name == target else ""))
    _finish(fig, axes, bands, path)


def plot_modules(stats: GateStats, path: str | os.PathLike[str], domain: str = "") -> None:
    """Histograms of gate values per module type, one panel per depth band; saves a PNG at ``path``."""
    plt = _plt()
    bands = stats.bands()
    fig, axes = _panel_grid(
        plt, len(bands), "Gate values by module type and depth" + (f" ({domain})" if domain else "")
    )
    for ax, band in zip(axes, bands):
        for mtype in stats.module_types():
            g = stats.group(band=band, mtype=mtype)
            if g["count"]:
                _draw(ax, g, stats.bins, mtype)
    _finish(fig, axes, bands, path)
