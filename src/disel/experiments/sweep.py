"""`disel sweep`: a grid of training runs that survives being killed.

The grid is the cartesian product of the config's ``grid:`` lists, e.g.
``grid: {method: [lora, disel], method_options.rank: [8, 16], seed: [0, 1, 2]}`` (any dotted config field
works; ``method``, ``rank`` and ``seed`` are short for ``method.name``, ``method.rank``, ``training.seed``).
Each run gets a deterministic id from its grid values and lives in ``output.dir/<run_id>``.

Crash safety: a finished run is recorded once in the results store (SQLite: each record is one
transaction, so a kill leaves all of it or none) and in its ``run.json``; a rerun of the same sweep skips
finished runs and resumes an unfinished one from its newest complete Trainer checkpoint.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..training.config import Config, canonical_key, with_overrides

_SHORT = {"method.name": None, "method.rank": "r", "training.seed": "s"}


@dataclass
class SweepSummary:
    total: int
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    eval_skipped_reason: str | None = None


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "x"


def run_id_for(values: dict[str, Any]) -> str:
    """``{method.name: lora, method.rank: 8, training.seed: 0, training.lr: 1e-4}`` -> ``lora-r8-s0-lr1e-04``."""
    parts = []
    if "method.name" in values:
        parts.append(_slug(values["method.name"]))
    if "method.rank" in values:
        parts.append(f"r{_slug(values['method.rank'])}")
    if "training.seed" in values:
        parts.append(f"s{_slug(values['training.seed'])}")
    for k, v in values.items():
        if k in _SHORT:
            continue
        parts.append(f"{_slug(k.split('.')[-1])}{_slug(v)}")
    return "-".join(parts) or "run"


def expand_grid(cfg: Config) -> list[Config]:
    """One validated config per grid point, each with its own run id under ``output.dir``."""
    if cfg.output.run_dir:
        raise UserError(
            "output.run_dir cannot be used in a sweep: set output.dir (runs go to output.dir/<run_id>)."
        )
    grid = {canonical_key(k): v for k, v in (cfg.grid or {}).items()}
    keys = list(grid)
    points = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    configs, seen = [], set()
    for point in points:
        values = dict(zip(keys, point))
        base_values = {
            "method.name": cfg.method.name,
            "method.rank": cfg.method.rank,
            "training.seed": cfg.training.seed,
        }
        ident = {**base_values, **values}
        rid = run_id_for(ident)
        if rid in seen:
            raise UserError(f"The grid gives the run id {rid!r} twice: make the grid values distinct.")
        seen.add(rid)
        overrides: list[tuple[str, Any]] = list(values.items())
        overrides += [("output.run_id", rid), ("grid", None)]
        try:
            configs.append(with_overrides(cfg, overrides))
        except UserError as e:
            raise UserError(f"grid point {values}: {e}") from e
    return configs


def _evaluate(
    run_cfg: Config, store: Any, summary: SweepSummary, evaluate: Callable[..., Any] | None
) -> None:
    if not run_cfg.eval:
        return
    if store.has("eval", run_cfg.run_id):
        return
    if evaluate is None:
        try:
            from ..evaluation import evaluate_run as evaluate  # type: ignore[attr-defined]
        except ImportError:
            evaluate = None
        if evaluate is None:
            if summary.eval_skipped_reason is None:
                summary.eval_skipped_reason = (
                    "disel.evaluation.evaluate_run is not available in this install: evaluation skipped "
                    "(run `disel eval RUN_DIR` later)."
                )
                print(f"[disel] {summary.eval_skipped_reason}", file=sys.stderr, flush=True)
            return
    evaluate(run_cfg.run_dir, run_cfg.eval, store)
    summary.evaluated.append(run_cfg.run_id)


def run_sweep(
    cfg: Config,
    *,
    progress: bool = True,
    evaluate: Callable[..., Any] | None = None,
    run_eval: bool = True,
    train_fn: Callable[..., Any] | None = None,
) -> SweepSummary:
    """Train (and evaluate) every grid point not yet finished; see the module docstring."""
    from tqdm.auto import tqdm

    from ..results import ResultsStore
    from ..training.runner import read_run_file

    if train_fn is None:
        from ..training.runner import train as train_fn

    runs = expand_grid(cfg)
    store = ResultsStore(cfg.results_path)
    summary = SweepSummary(total=len(runs))

    def finished(rc: Config) -> bool:
        rec = store.latest("run", rc.run_id, step=None)
        if rec is not None and rec.get("status") == "finished":
            return True
        info = read_run_file(rc.run_dir)
        if info is not None and info.get("status") == "finished":
            # Killed between run.json and the store write: record the run now, without retraining it.
            store.put("run", rc.run_id, _record_from_run_file(rc, info))
            return True
        return False

    done = {rc.run_id for rc in runs if finished(rc)}
    bar = tqdm(total=len(runs), initial=len(done), desc="sweep runs", unit="run", disable=not progress)
    try:
        for rc in runs:
            if rc.run_id in done:
                summary.skipped.append(rc.run_id)
            else:
                bar.set_postfix_str(rc.run_id)
                train_fn(rc, store=store, progress=progress)
                summary.trained.append(rc.run_id)
                bar.update(1)
            if run_eval:
                _evaluate(rc, store, summary, evaluate)
    finally:
        bar.close()
    return summary


def _record_from_run_file(rc: Config, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": rc.method.name,
        "rank": rc.method.rank,
        "seed": rc.training.seed,
        "run_dir": str(Path(rc.run_dir).resolve()),
        "status": "finished",
        "train_loss": info.get("train_loss"),
        "wall_seconds": info.get("wall_seconds"),
        "config": rc.to_dict(),
        "global_step": info.get("global_step"),
        "resumed_from": info.get("resumed_from"),
    }
