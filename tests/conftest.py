"""Fixtures shared by several test modules, and the guard that keeps the test suite out of the checkout.

* Every test (and every module- or session-scoped fixture) runs in a temporary working directory, so a
  command that writes to its default location (``disel eval`` -> ``results/``, ``runs/``, ...) writes there,
  never into the checkout. Tests find the repository's files from ``Path(__file__)``, not from the cwd.
* A session guard fails the session when it wrote into the checkout: any path under the repository that
  the test process itself wrote (an audit hook sees its writes), and new paths that only a pipeline run
  makes (``results/``, ``runs/``, ... at the top, ``*.sqlite`` anywhere: what subprocesses write, from
  ``git status`` at the start and the end). Other people's concurrent edits and outputs in the same tree
  are never flagged. ``DISEL_NO_CHECKOUT_GUARD=1`` turns it off.
* ``tiny_tok`` / ``tiny_models``: the tiny tokenizer and tiny random models (built from configs, no
  download), with each (arch, task) saved once per session for tests that load a base from disk.
* ``run_assets(n_train)``: a directory with that tiny Llama (``llama/``) and an instruction data set
  (``inst.jsonl``: "Add i and i." -> "It is 2i.") for tests that run ``disel train``/``sweep``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from disel.utils.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]

# -- the working directory -------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _session_cwd(tmp_path_factory) -> Iterator[Path]:
    """Session and module fixtures run in a scratch directory too (they are set up before ``_test_cwd``)."""
    mp = pytest.MonkeyPatch()
    cwd = tmp_path_factory.mktemp("cwd")
    mp.chdir(cwd)
    yield cwd
    mp.undo()


@pytest.fixture(autouse=True)
def _test_cwd(tmp_path, monkeypatch) -> Path:
    """Each test runs in its own ``tmp_path``: nothing it writes to a relative path lands in the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the checkout guard ----------------------------------------------------------------------------
#
# Two witnesses, neither of which can blame other people working in the same tree at the same time:
# * an audit hook sees every file THIS process (the tests and the library code they call) opens for
#   writing, creates, renames or copies to: any such path under the checkout that exists at the end;
# * `git status`, for what subprocesses (the CLI, torchrun) write: paths that did not exist at the start
#   and that only a pipeline run makes, the CLI's default output directories at the top of the checkout
#   (``results/``, ``runs/``, ...) and results stores (``*.sqlite``) anywhere. Other new files (a JSON, a
#   figure) are not taken from git status: someone's benchmark run in the same tree writes those too.

# Caches and environments tooling creates anywhere: never an output of a test.
_NEVER_FLAGGED_PARTS = frozenset(
    {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".venv", ".git", ".hypothesis"}
)
_DEFAULT_OUTPUT_DIRS = frozenset(
    {"results", "runs", "out", "outputs", "demo_out", "wandb", "mlruns", "lightning_logs"}
)
_STORE_SUFFIXES = frozenset({".sqlite", ".sqlite3", ".sqlite-journal", ".sqlite-wal", ".sqlite-shm"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_GUARD_KEY = pytest.StashKey[frozenset[str]]()


def _never_flagged(rel: str) -> bool:
    parts = PurePosixPath(rel.rstrip("/")).parts
    return bool(set(parts) & _NEVER_FLAGGED_PARTS) or any(p.endswith(".egg-info") for p in parts)


class _WriteAudit:
    """Records the paths under ``repo`` this process writes to (a ``sys.addaudithook`` hook)."""

    def __init__(self, repo: Path) -> None:
        self.prefix = str(repo) + os.sep
        self.paths: set[str] = set()
        self.active = False

    def _add(self, path: Any, only_new: bool = False) -> None:
        if path is None or isinstance(path, int):
            return
        p = os.path.abspath(os.fsdecode(path))
        if p.startswith(self.prefix) and not (only_new and os.path.exists(p)):
            self.paths.add(p)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        try:
            if event == "open":
                path, mode, flags = args
                if (any(c in mode for c in "wax+")) if isinstance(mode, str) else (flags or 0) & _WRITE_FLAGS:
                    self._add(path)
            elif event == "os.mkdir":
                self._add(args[0], only_new=True)  # os.makedirs(exist_ok=True) of an existing dir is no write
            elif event == "sqlite3.connect":
                self._add(args[0])
            elif event in ("os.rename", "shutil.copyfile", "shutil.copytree", "os.symlink", "os.link"):
                self._add(args[1])
        except Exception:  # an audit hook must never break the code it watches
            pass

    def written(self) -> list[str]:
        """The recorded paths that still exist, relative to the repository."""
        rels = (os.path.relpath(p, self.prefix) for p in self.paths if os.path.lexists(p))
        return sorted(r for r in rels if not _never_flagged(r))


_AUDIT = _WriteAudit(REPO)


def _untracked_paths(repo: Path) -> frozenset[str] | None:
    """Untracked and ignored paths of ``repo`` (new directories as ``dir/``), or None without git."""
    if shutil.which("git") is None:
        return None
    cmd = [
        "git",
        "-C",
        str(repo),
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
        "--ignored=matching",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None  # not a git checkout (e.g. an unpacked sdist): nothing to compare
    return frozenset(e[3:] for e in proc.stdout.split("\0") if e[:3] in ("?? ", "!! "))


def is_pipeline_output(path: str) -> bool:
    """Whether a path new under the checkout is one only a pipeline run makes (see above)."""
    p = PurePosixPath(path.rstrip("/"))
    if not p.parts or _never_flagged(path):
        return False
    return p.parts[0] in _DEFAULT_OUTPUT_DIRS or p.suffix.lower() in _STORE_SUFFIXES


def new_outputs(before: frozenset[str], after: frozenset[str]) -> list[str]:
    """Paths in ``after`` that were not there (nor inside a directory that was there) ``before``."""
    old_dirs = tuple(p for p in before if p.endswith("/"))
    return sorted(p for p in after - before if not p.startswith(old_dirs) and is_pipeline_output(p))


def _guard_enabled() -> bool:
    return not os.environ.get("DISEL_NO_CHECKOUT_GUARD")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _guard_enabled():
        return
    snapshot = _untracked_paths(REPO)
    if snapshot is not None:
        session.config.stash[_GUARD_KEY] = snapshot
    if not getattr(sys, "_disel_checkout_audit", False):  # audit hooks cannot be removed: add it once
        sys.addaudithook(_AUDIT)
        sys._disel_checkout_audit = True  # type: ignore[attr-defined]
    _AUDIT.paths.clear()
    _AUDIT.active = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _guard_enabled():
        return
    _AUDIT.active = False
    found = {p: "written by the test process" for p in _AUDIT.written()}
    before = session.config.stash.get(_GUARD_KEY, None)
    after = _untracked_paths(REPO) if before is not None else None
    if before is not None and after is not None:
        for p in new_outputs(before, after):
            found.setdefault(p, "new since the session started")
    if not found:
        return
    msg = (
        f"the test session wrote into the checkout {REPO}: write to tmp_path instead (tests run in a "
        "temporary cwd; look for paths built from the repository or the package). "
        + "; ".join(f"{p} ({why})" for p, why in sorted(found.items()))
        + ". If a path is not the tests' doing (someone's own run in this tree), rerun with "
        "DISEL_NO_CHECKOUT_GUARD=1."
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "checkout guard: FAILED", red=True, bold=True)
        reporter.write_line(msg, red=True)
    else:
        print(msg)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- threads ---------------------------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for a single test."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for a whole module, so module-scoped fixtures (models built once) use it too."""
    with torch_threads(1):
        yield


# -- tiny models -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tok() -> Any:
    """The tiny offline tokenizer (128 tokens; pad 0): shared, do not mutate it."""
    from disel.testing_tokenizers import tiny_tokenizer

    return tiny_tokenizer(128)


class TinyModels:
    """Tiny random models by (arch, task) with the tiny tokenizer's vocabulary.

    ``model(arch, task)`` builds a fresh model (the same weights on every call: seeded);
    ``saved(arch, task)`` is a directory holding that model and the tokenizer, written once per session:
    load it, never write into it.
    """

    def __init__(self, root: Path, tokenizer: Any) -> None:
        self.root = root
        self.tokenizer = tokenizer
        self._saved: dict[tuple[str, str | None], Path] = {}

    def model(self, arch: str = "llama", task: str | None = None, **config_overrides: Any) -> Any:
        from disel.testing import tiny_model

        vocab = len(self.tokenizer)
        return tiny_model(arch, task, vocab_size=vocab, **config_overrides)  # type: ignore[arg-type]

    def saved(self, arch: str = "llama", task: str | None = None) -> Path:
        key = (arch, task)
        if key not in self._saved:
            d = self.root / f"{arch}-{task or 'default'}"
            self.model(arch, task).save_pretrained(d)
            self.tokenizer.save_pretrained(d)
            self._saved[key] = d
        return self._saved[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tok) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"), tiny_tok)


@pytest.fixture(scope="session")
def run_assets(tmp_path_factory, tiny_models) -> Callable[[int], Path]:
    """``run_assets(n)``: a directory (made once per ``n``, read-only by convention) holding ``llama/`` (the
    saved tiny Llama with its tokenizer) and ``inst.jsonl`` (``n`` instruction rows "Add i and i." ->
    "It is 2i.")."""
    made: dict[int, Path] = {}

    def get(n_train: int) -> Path:
        if n_train not in made:
            root = tmp_path_factory.mktemp(f"run-assets-{n_train}")
            (root / "llama").symlink_to(tiny_models.saved("llama"), target_is_directory=True)
            with open(root / "inst.jsonl", "w") as f:
                for i in range(n_train):
                    f.write(
                        json.dumps({"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."}) + "\n"
                    )
            made[n_train] = root
        return made[n_train]

    return get


# -- kernels ---------------------------------------------------------------------------------------


@pytest.fixture
def count_fused(monkeypatch):
    """Counts calls of the fused kernel, so a test can tell which path actually ran."""
    calls = {"n": 0}
    from disel.methods.gated_lora import kernels

    real = kernels.fused_gated_update

    def spy(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_gated_update", spy)
    return calls
