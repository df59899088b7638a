"""Reports from a results store: the accuracy-vs-retention trade-off, retention over checkpoints, a table.

- ``tradeoff.png`` (the paper's figures 2 and 3): x = retention score, y = target score, one point per
  method x rank (mean +- std over seeds, each run at its best-target checkpoint, as the paper selects
  checkpoints), the base model's retention as a vertical line;
- ``retention_over_steps.png`` (figure 6): retention score against training step, one line per run;
- ``summary.md`` / ``summary.json``: the table behind the trade-off plot.

All files are written atomically.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..results import ResultsStore
from ..utils.io import atomic_write_json, atomic_write_text, save_figure


@dataclass
class Row:
    method: str
    rank: int | None
    n: int
    target_mean: float
    target_std: float
    retention_mean: float
    retention_std: float
    retention_delta_mean: float | None


def open_store(path: str | os.PathLike[str]) -> ResultsStore:
    p = Path(path)
    if p.is_dir():
        if not (p / "results.sqlite").is_file():
            raise UserError(
                f"{str(p)!r} holds no results.sqlite: pass a results store file or its directory."
            )
    elif not p.is_file():
        raise UserError(f"Results store {str(p)!r} does not exist: pass a .sqlite file or its directory.")
    return ResultsStore(p)


def _seed_of(run_id: str, runs: dict[str, dict[str, Any]], rec: dict[str, Any]) -> Any:
    run = runs.get(run_id, {})
    return rec.get("seed", run.get("seed", run_id))


def best_evals(store: ResultsStore) -> list[dict[str, Any]]:
    """One eval record per run: the checkpoint with the best target score (ties: the later one)."""
    runs = {r["run_id"]: r for r in store.records(kind="run")}
    best: dict[str, dict[str, Any]] = {}
    for rec in store.records(kind="eval"):
        if rec.get("target_score") is None or rec.get("retention_score") is None:
            continue
        cur = best.get(rec["run_id"])
        if cur is None or rec["target_score"] >= cur["target_score"]:
            best[rec["run_id"]] = rec
    out = []
    for run_id, rec in best.items():
        run = runs.get(run_id, {})
        out.append(
            {
                **rec,
                "method": rec.get("method", run.get("method", "?")),
                "rank": rec.get("rank", run.get("rank")),
                "seed": _seed_of(run_id, runs, rec),
            }
        )
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(store: ResultsStore) -> list[Row]:
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for rec in best_evals(store):
        groups[(rec["method"], rec["rank"])].append(rec)
    rows = []
    for (method, rank), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        t = _mean_std([float(r["target_score"]) for r in recs])
        rt = _mean_std([float(r["retention_score"]) for r in recs])
        deltas = [float(r["retention_delta"]) for r in recs if r.get("retention_delta") is not None]
        rows.append(Row(method, rank, len(recs), *t, *rt, sum(deltas) / len(deltas) if deltas else None))
    return rows


def base_scores(store: ResultsStore) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in store.records(kind="base_eval")}


def _model_label(base_id: str) -> str:
    """A base model's short name: the hub id as it is, a local directory by its last component."""
    name = base_id.removeprefix("base:")
    return Path(name).name if os.path.isabs(name) else name


def markdown_table(rows: list[Row], base: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | rank | seeds | target (mean ± std) | retention (mean ± std) | Δ retention vs base |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b_id, b in base.items():
        lines.append(
            f"| base ({_model_label(b_id)}) | – | – | {b.get('target_score', float('nan')):.4f} | "
            f"{b.get('retention_score', float('nan')):.4f} | 0 |"
        )
    for r in rows:
        delta = f"{r.retention_delta_mean:+.4f}" if r.retention_delta_mean is not None else "–"
        lines.append(
            f"| {r.method} | {r.rank if r.rank is not None else '–'} | {r.n} | "
            f"{r.target_mean:.4f} ± {r.target_std:.4f} | {r.retention_mean:.4f} ± {r.retention_std:.4f} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def _save_png(fig: Any, path: Path) -> Path:
    return save_figure(fig, path, bbox_inches="tight")


def plot_tradeoff(rows: list[Row], base: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_method: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r.rank or 0)
        ax.errorbar(
            [r.retention_mean for r in rs],
            [r.target_mean for r in rs],
            xerr=[r.retention_std for r in rs],
            yerr=[r.target_std for r in rs],
            marker="o",
            capsize=3,
            linestyle="-",
            label=method,
        )
        for r in rs:
            if r.rank is not None:
                ax.annotate(
                    f"r{r.rank}",
                    (r.retention_mean, r.target_mean),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    for b_id, b in base.items():
        if b.get("retention_score") is not None:
            ax.axvline(
                float(b["retention_score"]),
                color="gray",
                linestyle="--",
                label=f"base ({_model_label(b_id)})",
            )
    ax.set_xlabel("retention score (higher keeps more of the base model)")
    ax.set_ylabel("target score")
    ax.set_title("Fine-tuning accuracy vs retention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save_png(fig, path)
    plt.close(fig)
    return out


def retention_series(store: ResultsStore) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for rec in store.records(kind="eval"):
        if rec.get("step") is not None and rec.get("retention_score") is not None:
            series[rec["run_id"]][int(rec["step"])] = float(rec["retention_score"])  # later records win
    return {k: sorted(v.items()) for k, v in sorted(series.items())}


def plot_retention_over_steps(
    store: ResultsStore, base: dict[str, dict[str, Any]], path: Path
) -> Path | None:
    series = retention_series(store)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["run_id"]: r for r in store.records(kind="run")}
    methods = sorted({runs.get(k, {}).get("method", k.split("-")[0]) for k in series})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for run_id, pts in series.items():
            if runs.get(run_id, {}).get("method", run_id.split("-")[0]) != method:
                continue
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", label=run_id)
        for b in base.values():
            if b.get("retention_score") is not None:
                ax.axhline(float(b["retention_score"]), color="gray", linestyle="--")
        ax.set_title(method)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("retention score")
    out = _save_png(fig, path)
    plt.close(fig)
    return out


def make_report(
    results: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """Write the plots and tables for ``results`` (a store file or directory) into ``out_dir``."""
    store = open_store(results)
    out = Path(out_dir) if out_dir else store.path.parent / "report"
    rows = summarize(store)
    base = base_scores(store)
    if not rows and not base:
        raise UserError(
            f"{str(store.path)!r} has no eval or base_eval records: run `disel eval` or a sweep with eval."
        )
    files = {
        "table": atomic_write_text(out / "summary.md", markdown_table(rows, base)),
        "json": atomic_write_json(
            out / "summary.json", {"rows": [asdict(r) for r in rows], "base": base}, indent=2
        ),
        "tradeoff": plot_tradeoff(rows, base, out / "tradeoff.png"),
    }
    steps = plot_retention_over_steps(store, base, out / "retention_over_steps.png")
    if steps is not None:
        files["retention_over_steps"] = steps
    return files


__all__ = ["best_evals", "make_report", "markdown_table", "open_store", "summarize"]
