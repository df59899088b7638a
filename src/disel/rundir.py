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

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError
from .utils.io import read_json

RUN_FILE = "run.json"
FINAL_DIR = "final"
LOCK_FILE = ".disel.lock"  # held (flock) by the one process working in the run dir
# Written last into every checkpoint, after its files are on disk: a checkpoint without it is incomplete.
CHECKPOINT_STATE = "disel_state.json"
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


def checkpoint_problem(path: PathLike) -> str | None:
    """Why a checkpoint cannot be resumed from (None if it can): its files must all be there and readable.

    ``disel_state.json`` is written last (after the Trainer's files, which are fsync'd first), so a kill at
    any point of a checkpoint write leaves a checkpoint that this rejects."""
    p = Path(path)
    step = checkpoint_step(p)
    try:
        state = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
        ours = json.loads((p / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (ValueError, OSError) as e:
        return f"a state file is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or state.get("global_step") != step or ours.get("global_step") != step:
        return "its state files disagree with its step"
    weights = _weight_files(p)
    if not weights:
        return "it holds no weights"
    bad = next((f.name for f in weights if not _safetensors_ok(f)), None)
    return f"{bad} is truncated or corrupt" if bad else None


def _weight_files(p: Path) -> list[Path]:
    """The safetensors weight files of a saved adapter or model (sharded ones included)."""
    named = [p / f for f in ("adapter_model.safetensors", "model.safetensors") if (p / f).is_file()]
    return named + sorted(p.glob("model-*.safetensors"))


def _weights_ok(p: Path) -> bool:
    files = _weight_files(p)
    return bool(files) and all(_safetensors_ok(f) for f in files)


def _safetensors_ok(path: Path) -> bool:
    """The header parses and the file is as long as the header says (a cheap check, no tensor is read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size >= 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(run_dir: PathLike, log: Callable[[str], None] | None = None) -> list[tuple[int, Path]]:
    """Complete, readable checkpoints, oldest first (see :func:`checkpoint_problem`); ``log`` hears why each
    other one is skipped."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        step = checkpoint_step(p)
        if step is None or not p.is_dir():
            continue
        problem = checkpoint_problem(p)
        if problem is None:
            out.append((step, p))
        elif log is not None:
            log(f"skipping {p.name}: {problem}.")
    return sorted(out)


def remove_stale_temp_files(run_dir: PathLike) -> list[Path]:
    """Remove what killed atomic writes left (``.NAME.*.tmp`` files and folders, ``.final.tmp``)."""
    d = Path(run_dir)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


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
        if (
            step is not None and c.is_dir() and _weights_ok(loadable(c))
        ):  # a checkpoint a crash cut short: not
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


# --------------------------------------------------------------------------------------------------
# One process per run dir


class RunBusy(Exception):
    """The run dir is held by another live process (``pid``)."""

    def __init__(self, run_dir: Path, owner: str):
        super().__init__(f"{run_dir} is in use by {owner}")
        self.run_dir, self.owner = run_dir, owner


@contextlib.contextmanager
def run_lock(
    run_dir: PathLike, wait: bool = False, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold ``RUN_DIR/.disel.lock`` for the block: one process per run dir at a time.

    The lock is an ``flock`` on the file, so the kernel releases it when its owner dies (kill -9 included);
    the file keeps the owner's pid and host, so a lock left by a dead process is taken over with a message.
    ``wait=False`` raises :class:`RunBusy` when another live process holds it; ``wait=True`` blocks.
    """
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd) or "another process"
            if not wait:
                raise RunBusy(d, owner) from None
            if log is not None:
                log(f"{d} is in use by {owner}: waiting for it.")
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = _read_owner(fd)
        if previous and log is not None:
            log(f"taking over the lock of {d} left by {previous}, which is no longer running.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.time():.0f}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean release leaves no owner behind
    finally:
        os.close(fd)  # releases the flock


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def lock_owner(run_dir: PathLike) -> str | None:
    """Who holds the run dir's lock now (None if nobody)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_owner(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
