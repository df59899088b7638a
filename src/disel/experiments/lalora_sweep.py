"""Lambda sweep: the learning/forgetting curve (target metric vs retention) that LaLoRA's lambda traces.

Training goes through the shared training core (:func:`disel.training.fit.fit`: the Trainer glue of
``disel train``, the model's ``_disel_regularizers`` added to the loss) on batches already in memory, so the
curve can be drawn without writing run directories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..utils.io import atomic_write_json, save_figure


def batch_rows(batches: Sequence[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """The rows of model-ready batches (tensors of equal width) as examples: dicts of int lists."""
    rows: list[dict[str, list[int]]] = []
    for b in batches:
        keys = [k for k in ("input_ids", "attention_mask", "labels") if k in b]
        cols = {k: (b[k].tolist() if torch.is_tensor(b[k]) else [list(r) for r in b[k]]) for k in keys}
        rows += [{k: cols[k][i] for k in keys} for i in range(len(cols["input_ids"]))]
    return rows


def train_plain(
    model: nn.Module,
    batches: Sequence[dict[str, Any]],
    steps: int,
    lr: float = 1e-3,
    gate_lr: float | None = None,
    progress: bool = False,
    *,
    warmup_steps: int = 0,
    seed: int = 0,
    method: str | None = None,
) -> list[float]:
    """``steps`` optimizer steps on the rows of ``batches`` (epochs cycled, batches of the first's size),
    through the shared training core :func:`disel.training.fit.fit`: the task loss plus every regulariser,
    DISeL's groups, warmup then cosine, gradients clipped to 1; ``method`` adds its Trainer callbacks.

    Returns the task losses (without the penalty), one per step.
    """
    from ..training.fit import fit

    if steps < 1 or not batches:
        raise UserError(f"train_plain needs steps >= 1 and at least one batch (got steps={steps}).")
    rows = batch_rows(batches)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    result = fit(
        model,
        rows,
        steps=steps,
        batch_size=len(batches[0]["input_ids"]),
        lr=lr,
        gate_lr=gate_lr,
        warmup_steps=warmup_steps,
        seed=seed,
        method=method,
        pad_token_id=pad if isinstance(pad, int) else 0,
        progress=progress,
    )
    return result.losses


def lambda_sweep(
    make_model: Callable[[float], nn.Module],
    lams: Sequence[float],
    train_batches: Sequence[dict[str, Any]],
    evaluate: Callable[[nn.Module], dict[str, float]],
    steps: int,
    lr: float = 1e-3,
    label: str = "lalora",
    out_dir: str | Path | None = None,
    x_key: str = "target",
    y_key: str = "retention",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train a fresh ``make_model(lam)`` for each ``lam`` and evaluate it; returns one point per lambda.

    ``evaluate(model)`` returns metrics including ``x_key`` (target) and ``y_key`` (retention). With
    ``out_dir`` the points go to ``lambda_sweep.json`` and the curve to ``lambda_sweep.png``.
    """
    points: list[dict[str, Any]] = []
    for lam in tqdm(list(lams), desc=f"sweep {label}", disable=not progress):
        model = make_model(float(lam))
        losses = train_plain(model, train_batches, steps=steps, lr=lr)
        metrics = dict(evaluate(model))
        for k in (x_key, y_key):
            if k not in metrics:
                raise UserError(
                    f"evaluate() returned no {k!r} metric; return a dict with {x_key!r} and {y_key!r}."
                )
        reg = getattr(model, "_lalora", None)
        points.append(
            {
                "label": label,
                "lam": float(lam),
                **metrics,
                "final_train_loss": losses[-1],
                "distance": reg.distance() if reg is not None else None,
            }
        )
    if out_dir is not None:
        write_sweep(points, out_dir, x_key=x_key, y_key=y_key)
    return points


def write_sweep(
    points: list[dict[str, Any]],
    out_dir: str | Path,
    x_key: str = "target",
    y_key: str = "retention",
    name: str = "lambda_sweep",
    title: str = "LaLoRA: learning vs forgetting",
    x_label: str | None = None,
    y_label: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.png`` (one line per label, points annotated with lambda)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = atomic_write_json(out / f"{name}.json", points)
    ppath = plot_sweep(points, out / f"{name}.png", x_key, y_key, title, x_label, y_label)
    return jpath, ppath


def plot_sweep(
    points: list[dict[str, Any]],
    path: str | Path,
    x_key: str = "target",
    y_key: str = "retention",
    title: str = "LaLoRA: learning vs forgetting",
    x_label: str | None = None,
    y_label: str | None = None,
) -> Path:
    """Draw the curve(s) (matplotlib Agg) and write them to ``path`` as a PNG, atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    labels = list(dict.fromkeys(p["label"] for p in points))
    for label in labels:
        pts = sorted((p for p in points if p["label"] == label), key=lambda p: p["lam"])
        xs = [p[x_key] for p in pts]
        ys = [p[y_key] for p in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"λ={p['lam']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_label or x_key)
    ax.set_ylabel(y_label or y_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
