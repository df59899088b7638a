"""The run directory: the one description of what ``disel train`` writes and everything else reads.

::

    RUN_DIR/run.json                 {"run_id", "method", "rank", "seed", "model", "task", "status", "config", ...}
    RUN_DIR/checkpoint-<step>/       Trainer checkpoints (PEFT adapter, or a full model for "full")
    RUN_DIR/checkpoint-<step>/original_base_lora/  where a method's native adapter only loads onto a rewritten base (CorDA
                                     rewrites the base weights to a residual), the same update as a plain
                                     adapter for the ORIGINAL base model: what evaluation and analysis load
    RUN_DIR/final/                   final adapter or full model + tokenizer files (with export/ likewise)

``disel eval``, ``disel gates``, ``disel compact`` and sweeps read runs only through this module.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import UserError
from .utils.io import read_json

RUN_FILE = "run.json"
FINAL_DIR = "final"
# The plain adapter for the original base, beside a native checkpoint that needs a rewritten base.
EXPORT_DIR = "original_base_lora"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

PathLike = str | os.PathLike[str]


def is_run_dir(path: PathLike) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def read_run_file(run_dir: PathLike) -> dict[str, Any] | None:
    """``run.json`` of a run directory, or None when it is missing or unreadable (a run to start anew)."""
    p = Path(run_dir) / RUN_FILE
    if not p.is_file():
        return None
    try:
        return read_json(p)
    except ValueError:
        return None


def read_run(run_dir: PathLike) -> dict[str, Any]:
    """``run.json`` of a run directory; a :class:`UserError` when it is missing or unreadable."""
    info = read_run_file(run_dir)
    if info is None:
        raise UserError(
            f"{run_dir} has no readable {RUN_FILE}: pass a run directory written by `disel train`."
        )
    return info


def checkpoint_step(path: PathLike) -> int | None:
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(run_dir: PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. The Trainer writes ``trainer_state.json`` last, so a checkpoint
    without it was cut short by a crash and is not used."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir() and (p / "trainer_state.json").is_file():
            out.append((step, p))
    return sorted(out)


def remove_incomplete_checkpoints(run_dir: PathLike) -> list[Path]:
    """Delete ``checkpoint-*`` directories that a crash cut short; returns them."""
    d = Path(run_dir)
    removed = []
    complete = {p for _, p in checkpoints(d)}
    if d.is_dir():
        for p in d.iterdir():
            if checkpoint_step(p) is not None and p.is_dir() and p not in complete:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def loadable(saved: PathLike) -> Path:
    """What to load of a saved checkpoint or ``final/``: its export for the original base when it has one."""
    p = Path(saved)
    return p / EXPORT_DIR if (p / EXPORT_DIR).is_dir() else p


def evaluation_points(run_dir: PathLike) -> list[tuple[int | None, Path]]:
    """``(step, dir)`` of every ``checkpoint-<step>`` (by step), then ``final`` (step None), as loadable dirs."""
    d = Path(run_dir)
    out: list[tuple[int | None, Path]] = []
    for c in d.iterdir():
        step = checkpoint_step(c)
        if step is not None and c.is_dir():
            out.append((step, c))
    out.sort(key=lambda x: x[0] or 0)
    if (d / FINAL_DIR).is_dir():
        out.append((None, d / FINAL_DIR))
    return [(step, loadable(p)) for step, p in out]


def adapter_dir(path: PathLike) -> tuple[Path, dict[str, Any]]:
    """An adapter directory from an adapter path or a run directory (its ``final/``), and the run's run.json."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"adapter path {p} does not exist; give a PEFT adapter directory or a run directory.")
    run: dict[str, Any] = {}
    if is_run_dir(p):
        run = read_run(p)
        if not (p / "adapter_config.json").exists():
            p = loadable(p / FINAL_DIR)
    if not (p / "adapter_config.json").exists():
        raise UserError(
            f"{p} has no adapter_config.json; give an adapter directory (or a run directory with final/)."
        )
    return p, run
