"""`disel sweep`: a grid of training runs that survives being killed.

The grid is the cartesian product of the config's ``grid:`` lists, e.g.
``grid: {method: [lora, disel], method_options.rank: [8, 16], seed: [0, 1, 2]}`` (any dotted config field
works; ``method``, ``rank`` and ``seed`` are short for ``method.name``, ``method.rank``, ``training.seed``).
Each run gets a deterministic id from its grid values and lives in ``output.dir/<run_id>``.

``grid:`` may also be a list of such mappings ("blocks"): the sweep is the union of their products, for
settings that go together and a product cannot express (each seed with its own data file, each method with
its own learning rate). In a block, a list is an axis and any other value is a setting shared by the
block's runs: it is applied but takes no part in the run id (method, rank and seed always do), e.g.
``grid: [{method: [lora, disel], seed: 0, data.train: s0.jsonl}, {method: [lora, disel], seed: 1,
data.train: s1.jsonl}]``; a list-valued setting is written as an axis of one value (``[[q_proj, v_proj]]``).
Two points with the same run id are an error.

Crash safety: a finished run is recorded once in the results store (SQLite: each record is one
transaction, so a kill leaves all of it or none), keyed by its run key (name + hash of its fingerprint and
run dir), and in its ``run.json``; a rerun of the same sweep skips finished runs, resumes an unfinished one
from its newest complete checkpoint and finishes the missing evaluation units. Another sweep with other
settings on the same dir or store trains its own runs (beside them, see ``claim_run_dir``); two sweeps at
once share the work through the run dirs' locks.
"""

from __future__ import annotations

import itertools
import re
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
    blocks = cfg.grid if isinstance(cfg.grid, list) else [cfg.grid or {}]
    base_values = {
        "method.name": cfg.method.name,
        "method.rank": cfg.method.rank,
        "training.seed": cfg.training.seed,
    }
    configs, seen = [], set()
    for block in blocks:
        block = {canonical_key(k): v for k, v in block.items()}
        # a mapping grid: every value is an axis; a block of a list: lists are axes, other values settings
        listed = isinstance(cfg.grid, list)
        axes = {k: v for k, v in block.items() if not listed or isinstance(v, list)}
        settings = {k: v for k, v in block.items() if k not in axes}
        keys = list(axes)
        for point in itertools.product(*(axes[k] for k in keys)) if keys else [()]:
            values = dict(zip(keys, point))
            ident = {**base_values, **{k: v for k, v in settings.items() if k in _SHORT}, **values}
            rid = run_id_for(ident)
            if rid in seen:
                raise UserError(f"The grid gives the run id {rid!r} twice: make the grid values distinct.")
            seen.add(rid)
            overrides: list[tuple[str, Any]] = [*settings.items(), *values.items()]
            overrides += [("output.run_id", rid), ("grid", None)]
            try:
                configs.append(with_overrides(cfg, overrides))
            except UserError as e:
                raise UserError(f"grid point { ({**settings, **values}) }: {e}") from e
    return configs


def _evaluate(
    run_cfg: Config, store: Any, summary: SweepSummary, evaluate: Callable[..., Any] | None
) -> None:
    """Evaluate a run's missing units (every one of them on the first call; none when all are done)."""
    if not run_cfg.eval:
        return
    if evaluate is None:
        from ..evaluation import evaluate_run as evaluate
    evaluate(run_cfg.run_dir, run_cfg.eval, store)
    summary.evaluated.append(run_cfg.run_id)


def sweep_id(cfg: Config) -> str:
    """Which sweep records came from: the output dir and a hash of the base config and its grid."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{Path(cfg.output.dir).resolve()}#{digest}"


def run_sweep(
    cfg: Config,
    *,
    progress: bool = True,
    evaluate: Callable[..., Any] | None = None,
    run_eval: bool = True,
    train_fn: Callable[..., Any] | None = None,
    wait_seconds: float = 2.0,
) -> SweepSummary:
    """Train (and evaluate) every grid point not yet finished; see the module docstring.

    The whole grid is validated before anything trains. A run whose dir another process holds (a second
    sweep on the same dir) is left to it and come back to at the end, when that process has let go: each run
    is trained once, whatever the number of sweeps."""
    import time

    from tqdm.auto import tqdm

    from ..results import ResultsStore
    from ..rundir import lock_owner
    from ..training.config import run_key
    from ..training.runner import claim_run_dir, read_run_file

    if train_fn is None:
        from ..training.runner import train as train_fn

    runs = [claim_run_dir(rc) for rc in expand_grid(cfg)]  # every grid point valid before any training
    store = ResultsStore(cfg.results_path)
    summary = SweepSummary(total=len(runs))
    sid = sweep_id(cfg)

    def finished(rc: Config) -> bool:
        info = read_run_file(rc.run_dir)
        return (
            info is not None
            and info.get("status") == "finished"
            and info.get("fingerprint") == rc.fingerprint()
        )

    def step(rc: Config) -> bool:
        """Train/evaluate ``rc`` unless another process holds it; True when done with it."""
        if lock_owner(rc.run_dir) is not None:
            return False
        if finished(rc) and store.latest("run", run_key(rc)) is not None:
            summary.skipped.append(rc.run_id)
        else:
            bar.set_postfix_str(rc.run_id)
            try:
                train_fn(rc, store=store, progress=progress, sweep=sid)
            except UserError as e:
                if "is in use by" in str(e):  # taken by another sweep between the check and the lock
                    return False
                raise
            summary.trained.append(rc.run_id)
        bar.update(1)
        if run_eval:
            _evaluate(rc, store, summary, evaluate)
        return True

    bar = tqdm(total=len(runs), desc="sweep runs", unit="run", disable=not progress)
    try:
        pending = [rc for rc in runs if not step(rc)]
        while pending:  # held by another process: wait for it to let go, then finish (or skip) them
            time.sleep(wait_seconds)
            pending = [rc for rc in pending if not step(rc)]
    finally:
        bar.close()
    return summary
