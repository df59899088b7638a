"""SIGTERM and Ctrl-C reaching the evaluator: every program killed at once, no cgroup or directory left,
no partial result, a non-zero exit."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from disel.evaluation import sandbox as sb
from disel.evaluation.humaneval import load_problems

SRC = Path(sb.__file__).resolve().parents[2]
HANG = "    while True:\n        pass\n"


def live_processes(marker: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if marker in cmd and state != "Z":
                out.append(f"{pid}: {cmd[:100]}")
    return out


def start_and_signal(argv: list[str], signum: int, tmpdir: Path, want_running: int = 2):
    """Start the evaluator, wait until ``want_running`` programs run, send ``signum``, collect."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC), "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marker = f"disel-sandbox-worker {proc.pid}"
    end = time.monotonic() + 90
    while len(live_processes(marker)) < want_running:
        if proc.poll() is not None or time.monotonic() > end:
            out, err = proc.communicate()
            pytest.fail(f"programs never started (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    before = {"dirs": os.listdir(tmpdir), "cgroups": cgroups_of(proc.pid)}
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    return proc, out, err, time.monotonic() - sent, before


def cgroups_of(pid: int) -> list[str]:
    pat = f"disel-sandbox-{pid}-*"
    return glob.glob(f"/sys/fs/cgroup/*/{pat}") + glob.glob(f"/sys/fs/cgroup/*/**/{pat}", recursive=True)


def nothing_left(pid: int, tmpdir: Path) -> None:
    assert live_processes(f"disel-sandbox-worker {pid}") == []
    assert live_processes(f"disel-sandbox-launcher {pid}") == []
    pat = f"disel-sandbox-{pid}-*"
    assert (
        glob.glob(f"/sys/fs/cgroup/*/{pat}") + glob.glob(f"/sys/fs/cgroup/*/**/{pat}", recursive=True) == []
    )
    assert os.listdir(tmpdir) == []


@pytest.fixture
def hanging_samples(tmp_path):
    probs = load_problems(6)
    path = tmp_path / "hang.jsonl"
    path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": HANG}) + "\n" for p in probs))
    tmpdir = Path(tempfile.mkdtemp(prefix="disel-test-tmp-", dir="/tmp"))
    tmpdir.chmod(0o711)
    yield path, tmpdir
    shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_stops_everything_on_sigterm_and_ctrl_c(hanging_samples, signum, code):
    samples, tmpdir = hanging_samples
    argv = [sys.executable, "-m", "disel.cli", "eval-code", str(samples), "--json", "--timeout", "60"]
    proc, out, err, took, before = start_and_signal(argv, signum, tmpdir)
    assert bool(before["cgroups"]) == bool(sb._cgroup_bases())  # they existed while programs ran
    assert proc.returncode == code, err
    assert out == ""  # no partial result
    assert took < 15  # not the 60 s timeout
    assert ("no result was written" in err) if signum == signal.SIGTERM else ("interrupted" in err)
    nothing_left(proc.pid, tmpdir)


WEAK_RUN = textwrap.dedent(  # the sandbox module alone (no torch import: a quick start)
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("standalone_sandbox", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sb
    spec.loader.exec_module(sb)
    hang = sb.Task("def f():\\n    while True:\\n        pass\\n", "def check(c):\\n    c()\\n", "f")
    sb.run_programs([hang] * 6, timeout=60, isolation="weak")
    print("finished")
    """
)


@pytest.mark.slow
def test_sigterm_removes_the_weak_sandbox_directories(hanging_samples):
    """The weak sandbox keeps a directory per program on the host: SIGTERM removes them all."""
    python, why = sb._probe("weak")
    if not python:
        if "could not be started" in why:
            pytest.skip(f"weak sandbox unavailable here: {why}")
        pytest.fail(f"the weak sandbox is broken: {why}")
    _, tmpdir = hanging_samples
    argv = [sys.executable, "-c", WEAK_RUN, sb.__file__]
    proc, out, err, took, before = start_and_signal(argv, signal.SIGTERM, tmpdir)
    assert len(before["dirs"]) >= 2  # one directory per running program, in the TMPDIR
    assert proc.returncode != 0 and "finished" not in out, err
    assert "SandboxInterrupted" in err and took < 15
    nothing_left(proc.pid, tmpdir)
