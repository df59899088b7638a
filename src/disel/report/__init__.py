"""Reports from a results store: the accuracy-vs-retention trade-off, retention over checkpoints, a table.

- ``tradeoff.png`` (the paper's figures 2 and 3): x = retention score, y = target score, one point per
  method x rank (mean +- std over seeds, each run at its best-target checkpoint, as the paper selects
  checkpoints), the base model's retention as a vertical line;
- ``retention_over_steps.png`` (figure 6): retention score against training step, one line per run;
- ``summary.md`` / ``summary.json``: the table behind the trade-off plot, and notes: a run evaluated without
  a target (its retention is shown at its final checkpoint, and it is left out of the trade-off plot) and
  a run whose evaluation is incomplete (its ``eval_plan`` lists checkpoints or metrics that have no record
  yet: each such run is named with what is missing, and counted in the table's last column); then every
  run's target and retention score at each checkpoint (:func:`checkpoint_paths`: what ``disel demo``'s
  paths are compared with).

All files are written atomically.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..results import ResultsStore
from ..utils.io import atomic_write_json, atomic_write_text, save_figure

# the record kinds disel.evaluation.runner writes per run (named here so a report does not import torch)
PLAN_KIND = "eval_plan"
UNIT_KIND = "eval_unit"


@dataclass
class Row:
    method: str
    rank: int | None
    n: int
    target_mean: float | None  # None: no run of the row was evaluated with a target
    target_std: float | None
    retention_mean: float | None
    retention_std: float | None
    retention_delta_mean: float | None
    incomplete: int = 0  # runs of the row whose evaluation is incomplete
    no_target: list[str] = field(default_factory=list)  # runs evaluated without a target


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


def _key(rec: dict[str, Any]) -> str:
    """A record's run key (the store's key column; ``run_id`` is the run's name)."""
    return str(rec.get("run_key") or rec["run_id"])


def _step_label(step: int | None) -> str:
    return "final" if step is None else f"checkpoint-{step}"


def evaluation_status(store: ResultsStore) -> dict[str, dict[str, Any]]:
    """Per run key with an ``eval_plan``: ``{"run_id", "run_dir", "units_key", "missing": {checkpoint:
    [units]}}``; a checkpoint is missing units when some have no record yet (``["combined"]`` when every unit
    is there but its "eval" record is not)."""
    plans: dict[str, dict[str, Any]] = {}
    for plan in store.records(kind=PLAN_KIND):
        plans[_key(plan)] = plan  # later plans replace earlier ones
    units_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in store.records(kind=UNIT_KIND):
        units_of[_key(r)].append(r)
    evals_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in store.records(kind="eval"):
        evals_of[_key(r)].append(r)
    status: dict[str, dict[str, Any]] = {}
    for key, plan in plans.items():
        unit_keys = plan.get("unit_keys") or {}
        done = {
            (r["step"], r.get("unit"))
            for r in units_of[key]
            if unit_keys.get(r.get("unit")) == r.get("unit_key")
        }
        combined = {r["step"] for r in evals_of[key] if r.get("units_key") == plan["units_key"]}
        missing: dict[str, list[str]] = {}
        for ck in plan.get("checkpoints") or []:
            step = ck.get("step")
            if step in combined:
                continue
            lacking = [u for u in unit_keys if (step, u) not in done]
            missing[_step_label(step)] = lacking or ["combined"]
        status[key] = {
            "run_id": plan.get("run_id"),
            "run_dir": plan.get("run_dir"),
            "units_key": plan["units_key"],
            "missing": missing,
        }
    return status


def incomplete_runs(store: ResultsStore) -> dict[str, dict[str, list[str]]]:
    """``{run key: {checkpoint: [missing units]}}`` of every run whose evaluation is incomplete."""
    return {k: v["missing"] for k, v in evaluation_status(store).items() if v["missing"]}


def _plural(units: list[str], total: int) -> str:
    return "all metrics" if len(units) >= total > 1 else ", ".join(units)


def incomplete_warnings(store: ResultsStore, status: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One line per run whose evaluation is incomplete, naming the missing checkpoints and metrics."""
    status = evaluation_status(store) if status is None else status
    plans = {_key(p): p for p in store.records(kind=PLAN_KIND)}
    lines = []
    for key, st in status.items():
        if not st["missing"]:
            continue
        total = len((plans.get(key) or {}).get("unit_keys") or {})
        parts = [f"{ck} ({_plural(units, total)})" for ck, units in st["missing"].items()]
        where = st.get("run_dir") or key
        lines.append(
            f"run {key}: evaluation incomplete, missing {'; '.join(parts)}; its numbers use only the finished "
            f"checkpoints (rerun `disel eval {where}` to finish it)"
        )
    return lines


def best_evals(store: ResultsStore) -> list[dict[str, Any]]:
    """One eval record per run: the checkpoint with the best target score (ties: the later one); a run
    evaluated without a target gets its final checkpoint (else its latest step), with ``no_target`` set.

    Where a run has an evaluation plan, only the records of that plan count, and ``incomplete`` says whether
    checkpoints of it are missing."""
    runs = {_key(r): r for r in store.records(kind="run")}
    status = evaluation_status(store)
    by_run = _current_evals(store)  # later records of a step replace earlier ones
    out = []
    for run_id, recs in by_run.items():
        scored = [r for r in recs.values() if r.get("target_score") is not None]
        if scored:
            best = None
            for r in sorted(scored, key=lambda r: (r.get("step") is None, r.get("step") or 0)):
                if best is None or r["target_score"] >= best["target_score"]:
                    best = r
            no_target = False
        else:
            best = recs[None] if None in recs else recs[max(k for k in recs if k is not None)]
            no_target = True
        run = runs.get(run_id, {})
        out.append(
            {
                **best,
                "run_key": run_id,
                "method": best.get("method") or run.get("method", "?"),
                "rank": best.get("rank", run.get("rank")),
                "seed": _seed_of(run_id, runs, best),
                "no_target": no_target,
                "incomplete": bool((status.get(run_id) or {}).get("missing")),
            }
        )
    return out


def _current_evals(store: ResultsStore) -> dict[str, dict[Any, dict[str, Any]]]:
    """``{run key: {step: eval record}}`` of the records of each run's current plan (the latest per step)."""
    status = evaluation_status(store)
    by_run: dict[str, dict[Any, dict[str, Any]]] = defaultdict(dict)
    for rec in store.records(kind="eval"):
        st = status.get(_key(rec))
        if st is not None and rec.get("units_key") != st["units_key"]:
            continue  # a record of an earlier evaluation spec
        by_run[_key(rec)][rec.get("step")] = rec
    return by_run


def checkpoint_paths(store: ResultsStore) -> list[dict[str, Any]]:
    """Every run's scores at each checkpoint in step order (``final`` last), sorted by method, rank, seed:
    ``[{"run_key", "run_id", "run_dir", "method", "rank", "seed", "points": [{"checkpoint", "step",
    "target_score", "retention_score"}]}]``."""
    runs = {_key(r): r for r in store.records(kind="run")}
    out = []
    for key, recs in _current_evals(store).items():
        run = runs.get(key, {})
        any_rec = next(iter(recs.values()))
        steps = sorted(recs, key=lambda s: (s is None, s or 0))
        out.append(
            {
                "run_key": key,
                "run_id": any_rec.get("run_id", run.get("run_id")),
                "run_dir": any_rec.get("run_dir", run.get("run_dir")),
                "method": any_rec.get("method") or run.get("method"),
                "rank": any_rec.get("rank", run.get("rank")),
                "seed": _seed_of(key, runs, any_rec),
                "points": [
                    {
                        "checkpoint": _step_label(s),
                        "step": s,
                        "target_score": recs[s].get("target_score"),
                        "retention_score": recs[s].get("retention_score"),
                    }
                    for s in steps
                ],
            }
        )
    return sorted(out, key=lambda r: (str(r["method"]), r["rank"] or 0, str(r["seed"]), r["run_key"]))


def checkpoint_table(paths: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`checkpoint_paths` (full precision, for comparing runs number by number)."""
    lines = [
        "## Every checkpoint",
        "",
        "| run | checkpoint | target | retention |",
        "|---|---|---:|---:|",
    ]
    for r in paths:
        for pt in r["points"]:
            t, rt = pt["target_score"], pt["retention_score"]
            lines.append(
                f"| {r['run_id']} | {pt['checkpoint']} | {'–' if t is None else repr(float(t))} | "
                f"{'–' if rt is None else repr(float(rt))} |"
            )
    return "\n".join(lines) + "\n"


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(store: ResultsStore) -> list[Row]:
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for rec in best_evals(store):
        groups[(str(rec["method"]), rec["rank"])].append(rec)
    rows = []
    for (method, rank), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        t = _mean_std([float(r["target_score"]) for r in recs if r.get("target_score") is not None])
        rt = _mean_std([float(r["retention_score"]) for r in recs if r.get("retention_score") is not None])
        deltas = [float(r["retention_delta"]) for r in recs if r.get("retention_delta") is not None]
        rows.append(
            Row(
                method,
                rank,
                len(recs),
                *t,
                *rt,
                sum(deltas) / len(deltas) if deltas else None,
                incomplete=sum(bool(r.get("incomplete")) for r in recs),
                no_target=sorted(str(r["run_key"]) for r in recs if r.get("no_target")),
            )
        )
    return rows


def base_scores(store: ResultsStore) -> dict[str, dict[str, Any]]:
    return {_key(r): r for r in store.records(kind="base_eval")}


def _model_label(base_id: str) -> str:
    """A base model's short name: the hub id as it is, a local directory by its last component."""
    name = base_id.removeprefix("base:")
    return Path(name).name if os.path.isabs(name) else name


def _num(v: Any) -> str:
    return f"{float(v):.4f}" if isinstance(v, int | float) else "–"


def _pm(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.4f} ± {std or 0.0:.4f}"


def markdown_table(
    rows: list[Row], base: dict[str, dict[str, Any]], warnings: list[str] | None = None
) -> str:
    lines = [
        "| method | rank | seeds | target (mean ± std) | retention (mean ± std) | Δ retention vs base "
        "| incomplete runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b_id, b in base.items():
        lines.append(
            f"| base ({_model_label(b_id)}) | – | – | {_num(b.get('target_score'))} | "
            f"{_num(b.get('retention_score'))} | 0 | – |"
        )
    notes = []
    for r in rows:
        delta = f"{r.retention_delta_mean:+.4f}" if r.retention_delta_mean is not None else "–"
        target = _pm(r.target_mean, r.target_std)
        if r.no_target:
            target = (
                "– (no target)" if r.target_mean is None else f"{target} ({len(r.no_target)} without target)"
            )
            label = f"{r.method}" + (f" r{r.rank}" if r.rank is not None else "")
            notes.append(
                f"{label}: target missing for {', '.join(r.no_target)} (evaluated without a target): retention "
                "only, at the final checkpoint, and not in the trade-off plot"
            )
        lines.append(
            f"| {r.method} | {r.rank if r.rank is not None else '–'} | {r.n} | {target} | "
            f"{_pm(r.retention_mean, r.retention_std)} | {delta} | {r.incomplete or '–'} |"
        )
    notes += list(warnings or [])
    if notes:
        lines += ["", *(f"- {n}." if not n.endswith(".") else f"- {n}" for n in notes)]
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
        rs = sorted((r for r in rs if r.target_mean is not None), key=lambda r: r.rank or 0)
        if not rs:
            continue
        ax.errorbar(
            [float("nan") if r.retention_mean is None else r.retention_mean for r in rs],
            [r.target_mean for r in rs],
            xerr=[r.retention_std or 0.0 for r in rs],
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
                    (r.retention_mean or 0.0, r.target_mean),
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    out = _save_png(fig, path)
    plt.close(fig)
    return out


def retention_series(store: ResultsStore) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for rec in store.records(kind="eval"):
        if rec.get("step") is not None and rec.get("retention_score") is not None:
            series[_key(rec)][int(rec["step"])] = float(rec["retention_score"])  # later records win
    return {k: sorted(v.items()) for k, v in sorted(series.items())}


def _methods_of(store: ResultsStore) -> dict[str, str]:
    """Run key -> method: the eval records' own, else the "run" record's, else the key's first part."""
    runs = {_key(r): r.get("method") for r in store.records(kind="run")}
    out: dict[str, str] = {}
    for rec in store.records(kind="eval"):
        k = _key(rec)
        out[k] = str(rec.get("method") or runs.get(k) or str(rec["run_id"]).split("-")[0])
    return out


def plot_retention_over_steps(
    store: ResultsStore, base: dict[str, dict[str, Any]], path: Path
) -> Path | None:
    series = retention_series(store)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method_of = _methods_of(store)
    methods = sorted({method_of.get(k, k.split("-")[0]) for k in series})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for run_id, pts in series.items():
            if method_of.get(run_id, run_id.split("-")[0]) != method:
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
    results: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write the plots and tables for ``results`` (a store file or directory) into ``out_dir``; ``log``
    gets the notes of the table (a target missing, an incomplete evaluation), one line each."""
    store = open_store(results)
    out = Path(out_dir) if out_dir else store.path.parent / "report"
    rows = summarize(store)
    base = base_scores(store)
    if not rows and not base:
        raise UserError(
            f"{str(store.path)!r} has no eval or base_eval records: run `disel eval` or a sweep with eval."
        )
    status = evaluation_status(store)
    warnings = incomplete_warnings(store, status)
    table = markdown_table(rows, base, warnings)
    paths = checkpoint_paths(store)
    summary = {
        "rows": [asdict(r) for r in rows],
        "base": base,
        "incomplete": {k: v["missing"] for k, v in status.items() if v["missing"]},
        "warnings": warnings,
        "checkpoints": paths,
    }
    files = {
        "table": atomic_write_text(
            out / "summary.md", table + ("\n" + checkpoint_table(paths) if paths else "")
        ),
        "json": atomic_write_json(out / "summary.json", summary, indent=2),
        "tradeoff": plot_tradeoff(rows, base, out / "tradeoff.png"),
    }
    steps = plot_retention_over_steps(store, base, out / "retention_over_steps.png")
    if steps is not None:
        files["retention_over_steps"] = steps
    if log is not None:
        for line in table.splitlines():
            if line.startswith("- "):
                log(line[2:])
    return files


__all__ = [
    "best_evals",
    "checkpoint_paths",
    "checkpoint_table",
    "evaluation_status",
    "incomplete_runs",
    "incomplete_warnings",
    "make_report",
    "markdown_table",
    "open_store",
    "summarize",
]
