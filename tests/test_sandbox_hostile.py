"""Hostile HumanEval completions, each scored in one run next to honest ones, for every isolation level
this machine offers. A hostile row returns the right answer only if its attack worked, so a row scoring
1.0 means the sandbox failed; a row scoring 0 must also leave nothing behind (processes, files, sockets).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from disel.evaluation import sandbox as sb
from disel.evaluation.humaneval import load_problems, task_for

TIMEOUT = 3.0
LIMITS = {"timeout": TIMEOUT, "memory_mb": 256, "disk_mb": 16, "max_procs": 32}
WORKED = "    if not globals().get('_WORKED'):\n        return None\n"


def sandbox_processes(markers: list[str]) -> list[str]:
    """Command lines of live processes that carry one of ``markers`` (a scan of /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(m in cmd for m in markers):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def our_sandbox_markers(evaluator_pid: int) -> list[str]:
    return [f"disel-sandbox-launcher {evaluator_pid}", f"disel-sandbox-worker {evaluator_pid}"]


def leftover_cgroups(evaluator_pid: int) -> list[str]:
    pat = f"disel-sandbox-{evaluator_pid}-*"
    return glob.glob(f"/sys/fs/cgroup/*/{pat}") + glob.glob(f"/sys/fs/cgroup/*/**/{pat}", recursive=True)


def hostile_rows(probs, marker: str, sentinel: str, outside: str, port: int) -> dict[str, tuple[int, str]]:
    """name -> (problem index, completion)."""

    def attack(i: int, code: str) -> tuple[int, str]:
        return i, WORKED + probs[i]["canonical_solution"] + "\n\n" + code + "\n"

    me = os.getpid()
    return {
        "SystemExit(0)": (10, "    raise SystemExit(0)\n"),
        "os._exit(0)": (11, "    import os\n    os._exit(0)\n"),
        "atexit hook": (12, "    import atexit, os\n    atexit.register(os._exit, 0)\n    return None\n"),
        "exit at import": (13, "    return None\n\nraise SystemExit(0)\n"),
        "infinite loop": (14, "    while True:\n        pass\n"),
        "signal-ignoring loop": (
            15,
            "    import signal\n    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "        signal.signal(s, signal.SIG_IGN)\n    while True:\n        pass\n",
        ),
        "fork bomb": (
            16,
            "    return None\n\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        ),
        "memory hog": (17, "    x = []\n    while True:\n        x.append(b'x' * 10**7)\n"),
        "huge stdout": (18, "    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n"),
        "posix fork+setsid daemon": attack(
            19,
            "import posix, sys\n"
            "if posix.fork() == 0:\n"
            "    posix.setsid()\n"
            "    if posix.fork() == 0:\n"
            "        posix.execv(sys.executable, [sys.executable, '-S', '-c',\n"
            f"                    'import time\\nwhile True: time.sleep(0.05)', '{marker}'])\n"
            "    posix._exit(0)\n"
            "_WORKED = False\n",
        ),
        "posix.kill(getppid())": attack(
            20,
            "import posix, time\n"
            f"targets = {{posix.getppid(), 1, 2, 3, 4, {me}}} - {{posix.getpid()}}\n"
            "alive = set()\n"
            "for t in targets:\n"
            "    try:\n        posix.kill(t, 0)\n        alive.add(t)\n    except OSError:\n        pass\n"
            "for t in targets:\n"
            "    try:\n        posix.kill(t, 9)\n    except OSError:\n        pass\n"
            "time.sleep(0.2)\n"
            "for t in alive:\n"
            "    try:\n        posix.kill(t, 0)\n    except ProcessLookupError:\n        _WORKED = True\n"
            "    except OSError:\n        pass\n",
        ),
        "unlink via /proc/<ppid>/cwd": attack(
            21,
            "import posix\n"
            f"names = ['{sentinel}']\n"
            f"for pid in (posix.getppid(), 1, 2, 3, {me}):\n"
            f"    names += ['/proc/%d/cwd/{os.path.basename(sentinel)}' % pid, '/proc/%d/root{sentinel}' % pid]\n"
            "for n in names:\n"
            "    try:\n        posix.unlink(n)\n        _WORKED = True\n    except OSError:\n        pass\n",
        ),
        "rewrite other tasks' programs": attack(
            22,
            "import glob, os\n"
            "me = os.getcwd()\n"
            "paths = glob.glob('/tmp/disel-sandbox-*/program.py') + glob.glob('/proc/*/cwd/program.py')\n"
            "paths += glob.glob('/proc/*/root/tmp/program.py') + glob.glob('/proc/*/cwd/*.py')\n"
            "for root, dirs, files in os.walk('/'):\n"
            "    if root.startswith(('/proc', '/sys', '/usr', '/lib', me)):\n"
            "        dirs[:] = []\n"
            "        continue\n"
            "    paths += [os.path.join(root, f) for f in files if f.endswith('.py')][:50]\n"
            "for p in paths:\n"
            "    try:\n"
            "        with open(p, 'a') as f:\n"
            "            f.write('\\ncheck = lambda c: None\\n')\n"
            "        _WORKED = True\n"
            "    except OSError:\n        pass\n",
        ),
        "network to a local listener": attack(
            23,
            "import socket\n"
            "try:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    s.sendall(b'hello')\n"
            "    _WORKED = True\n"
            "except OSError:\n    pass\n",
        ),
        "write outside the temp dir": attack(
            24,
            "import os\n"
            f"for p in ['{outside}', '/{marker}', '/usr/{marker}', '/dev/{marker}', '/proc/1/cwd/{marker}',\n"
            f"          '/proc/{me}/cwd/{marker}', os.path.expanduser('~root/{marker}')]:\n"
            "    try:\n"
            "        with open(p, 'w') as f:\n"
            "            f.write('x')\n"
            "        _WORKED = True\n"
            "    except OSError:\n        pass\n",
        ),
        "forks each allocating memory": attack(
            25,
            "import os, time\n"
            "r, w = os.pipe()\n"
            "kids = []\n"
            "for i in range(4):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        b = b'x' * (200 << 20)\n"
            "        os.write(w, b'1')\n"
            "        time.sleep(1.0)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n"
            "os.close(w)\n"
            "got = b''\n"
            "while True:\n"
            "    c = os.read(r, 4)\n"
            "    if not c:\n        break\n"
            "    got += c\n"
            "st = [os.waitpid(k, 0)[1] for k in kids]\n"
            "_WORKED = len(got) == 4 and not any(st)\n",
        ),
        "many files filling disk": attack(
            26,
            "n = k = 0\n"
            "try:\n"
            "    while True:\n"
            "        with open('f%d' % n, 'wb') as f:\n"
            "            f.write(b'x' * (1 << 20))\n"
            "        n += 1\n"
            "except OSError:\n    pass\n"
            "try:\n"
            "    while k < 300000:\n"
            "        open('e%d' % k, 'w').close()\n"
            "        k += 1\n"
            "except OSError:\n    pass\n"
            "_WORKED = n > 32 or k >= 300000\n",
        ),
        "always-equal object": (
            27,
            "    class E:\n        def __eq__(self, o):\n            return True\n"
            "        def __ne__(self, o):\n            return False\n        __hash__ = object.__hash__\n"
            "    return E()\n",
        ),
        "always-equal int subclass": (
            28,
            "    class E(int):\n        def __eq__(self, o):\n            return True\n"
            "        def __ne__(self, o):\n            return False\n        __hash__ = int.__hash__\n"
            "    return E(987654321)\n",
        ),
        "forge the pass token": attack(
            29,
            "import gc, os, re\n"
            "cands = {'0' * 32}\n"
            "for o in gc.get_objects():\n"
            "    items = list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, (list, tuple)) else []\n"
            "    cands.update(x for x in items if isinstance(x, str) and re.fullmatch('[0-9a-f]{32}', x))\n"
            "for fd in range(256):\n"
            "    if fd in (3, 4):\n        continue\n"
            "    for c in cands:\n"
            "        try:\n            os.write(fd, (c + '\\n').encode())\n        except OSError:\n            break\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n        fds = os.listdir('/proc/%s/fd' % pid)\n    except OSError:\n        fds = []\n"
            "    for fd in fds:\n"
            "        try:\n"
            "            with open('/proc/%s/fd/%s' % (pid, fd), 'w') as f:\n"
            "                f.write('0' * 32 + '\\n')\n"
            "        except OSError:\n            pass\n"
            "    try:\n        open('/proc/%s/mem' % pid, 'rb').read(1)\n        _WORKED = True\n"
            "    except OSError:\n        pass\n",
        ),
    }


HONEST = {
    "honest 0": (0, None),
    "honest 1": (1, None),
    "honest wrong": (2, "    return 12345\n"),
    "honest 3": (3, None),
}
EXPECT = {  # rows whose outcome is known exactly, beyond "not passed"
    "infinite loop": ("timeout", ""),
    "signal-ignoring loop": ("timeout", ""),
    "huge stdout": ("failed", "MiB of output"),
    "forks each allocating memory": ("failed", "memory limit"),
    "always-equal object": ("failed", "not plain data"),
    "SystemExit(0)": ("failed", "SystemExit"),
    "os._exit(0)": ("failed", "exited during a call"),
    "exit at import": ("failed", "ended before"),
}


def hostile_names() -> list[str]:
    return list(hostile_rows(load_problems(), "m", "/s", "/o", 9))


WEAK_SAFE = {  # what the weak sandbox still guarantees (no namespaces: network and files stay reachable)
    "SystemExit(0)",
    "os._exit(0)",
    "atexit hook",
    "exit at import",
    "always-equal object",
    "always-equal int subclass",
    "forge the pass token",
    "posix fork+setsid daemon",
    "fork bomb",
    "huge stdout",
}


KERNEL_REFUSALS = ("unshare:", "namespaces without a user namespace need root")


def require(level: str) -> None:
    """Skip where the kernel (or the missing root) refuses this level; any other failure is a bug."""
    python, why = sb._probe(level)
    if python:
        return
    environmental = why.startswith(KERNEL_REFUSALS) or (level == "weak" and "could not be started" in why)
    if environmental:
        pytest.skip(f"{level} sandbox unavailable here: {why}")
    pytest.fail(f"the {level} sandbox is broken: {why}")


@pytest.fixture
def scene(tmp_path, monkeypatch):
    """A sentinel in the evaluator's cwd, a listening socket, a private TMPDIR, a unique marker."""
    work = tmp_path / "evaluator-cwd"
    work.mkdir()
    (work / "sentinel.txt").write_text("keep me")
    monkeypatch.chdir(work)
    # a TMPDIR the weak sandbox's program uid can reach (pytest's own is private to root)
    tmpdir = Path(tempfile.mkdtemp(prefix="disel-test-tmp-", dir="/tmp"))
    tmpdir.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    marker = f"disel-hostile-{os.getpid()}-{id(tmp_path)}"
    yield_value = {
        "work": work,
        "tmpdir": tmpdir,
        "listener": listener,
        "marker": marker,
        "sentinel": str(work / "sentinel.txt"),
        "outside": str(work / "outside.txt"),
    }
    try:
        yield yield_value
    finally:
        listener.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def run_battery(scene, isolation: str, names: set[str] | None = None) -> dict[str, sb.ExecResult]:
    """All rows (hostile and honest) in one run, as ``score_completions`` does: name -> result."""
    probs = load_problems()
    rows = hostile_rows(
        probs, scene["marker"], scene["sentinel"], scene["outside"], scene["listener"].getsockname()[1]
    )
    rows = {k: v for k, v in rows.items() if names is None or k in names}
    rows.update({k: (i, probs[i]["canonical_solution"] if c is None else c) for k, (i, c) in HONEST.items()})
    tasks = [task_for(probs[i], c) for i, c in rows.values()]
    results = sb.run_programs(tasks, workers=2, isolation=isolation, **LIMITS)
    assert {r.isolation for r in results} == {isolation}
    return dict(zip(rows, results))


def pass_at_1(results: dict[str, sb.ExecResult], names) -> float:
    names = list(names)
    return sum(results[n].passed for n in names) / len(names)


def assert_honest_rows_unchanged(results: dict[str, sb.ExecResult]) -> None:
    assert [results[k].status for k in sorted(HONEST)] == ["passed", "passed", "passed", "failed"]


def assert_nothing_left(scene, allow_network: bool = False) -> None:
    assert sandbox_processes([scene["marker"], *our_sandbox_markers(os.getpid())]) == []
    assert leftover_cgroups(os.getpid()) == []
    assert (scene["work"] / "sentinel.txt").read_text() == "keep me"
    assert sorted(os.listdir(scene["work"])) == ["sentinel.txt"]  # no outside.txt, no marker files
    assert os.listdir(scene["tmpdir"]) == []
    for p in (f"/{scene['marker']}", f"/usr/{scene['marker']}", f"/root/{scene['marker']}"):
        assert not os.path.exists(p), p
    if not allow_network:
        with pytest.raises(TimeoutError):
            scene["listener"].accept()


@pytest.mark.slow
@pytest.mark.parametrize("level", ["userns", "rootns", "userns-no-cgroups"])
def test_hostile_completions_score_zero_and_leave_nothing(scene, level, monkeypatch):
    isolation = level.split("-")[0]
    if level.endswith("no-cgroups"):  # memory and processes capped by the init's poll and rlimits only
        monkeypatch.setattr(sb, "_CGROUPS_ENABLED", [False])
    require(isolation)
    # a plain infinite loop meets the same wall-clock kill at every level: run it once
    names = None if level == "userns" else set(hostile_names()) - {"infinite loop"}
    results = run_battery(scene, isolation, names)
    hostile = [k for k in results if k not in HONEST]
    assert {k: results[k].reason for k in hostile if results[k].passed} == {}
    assert pass_at_1(results, hostile) == 0.0
    assert_honest_rows_unchanged(results)
    for name, (status, why) in EXPECT.items():  # each known case fails for its own reason
        if name not in results:
            continue
        assert results[name].status == status and why in results[name].reason, (name, results[name])
    for name, r in results.items():  # nothing outlives its timeout by more than 10 s
        assert r.seconds < TIMEOUT + 10, (name, r.seconds)
    assert_nothing_left(scene)


@pytest.mark.slow
def test_weak_sandbox_still_proves_passes_and_cleans_up(scene):
    """Without namespaces (explicit request only) exit tricks, equality tricks, forged tokens and
    orphaned processes still score 0 and nothing survives; as root each program has its own uid."""
    require("weak")
    names = set(WEAK_SAFE)
    if not sb._cgroup_bases():  # without a cgroup nothing finds a process that left the session
        names.discard("posix fork+setsid daemon")
    results = run_battery(scene, "weak", names)
    assert pass_at_1(results, names) == 0.0
    assert_honest_rows_unchanged(results)
    assert_nothing_left(scene, allow_network=True)
