"""What a sandboxed program sees and can do, per isolation level; a non-root evaluator; a machine
without user namespaces (refusal)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from disel.evaluation import sandbox as sb
from disel.evaluation.humaneval import load_problems, task_for

SANDBOX_PY = Path(sb.__file__).resolve()
KERNEL_REFUSALS = ("unshare:", "namespaces without a user namespace need root")
REPO_SRC = SANDBOX_PY.parents[2]

# An unjudged program that reports what it can see and do, as one JSON line.
INSPECT = textwrap.dedent(
    """
    import json, os, socket
    def can_write(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            os.unlink(path)
            return True
        except OSError:
            return False
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1)
        net = "connected"
    except OSError as e:
        net = type(e).__name__
    st = os.statvfs("/tmp")
    print(json.dumps({
        "uid": os.getuid(), "gid": os.getgid(), "cap_eff": status["CapEff"].strip(),
        "cap_bnd": status["CapBnd"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
        "root": sorted(os.listdir("/")), "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
        "writable": {p: can_write(p) for p in ("/x", "/usr/x", "/tmp/x", "/dev/x")},
        "net": net, "ifaces": [n for _, n in socket.if_nameindex()],
        "tmp_mb": st.f_blocks * st.f_frsize >> 20, "cwd": os.getcwd(), "home": os.environ.get("HOME"),
        "evaluator_visible": os.path.exists("/proc/%d" % %EVALUATOR%),
    }))
    """
).replace("%EVALUATOR%", str(os.getpid()))


@pytest.mark.parametrize("level", ["userns", "rootns"])
def test_program_sees_a_private_root_no_network_and_holds_no_privilege(level):
    python, why = sb._probe(level)
    if not python:
        if why.startswith(KERNEL_REFUSALS):
            pytest.skip(f"{level} unavailable here: {why}")
        pytest.fail(f"the {level} sandbox is broken: {why}")
    r = sb.run_program(INSPECT, timeout=10, disk_mb=8, isolation=level)
    assert r.status == "exited" and r.returncode == 0, r
    seen = json.loads(r.stdout_tail.strip().splitlines()[-1])
    assert seen["uid"] != 0 and seen["gid"] != 0
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert set(seen["root"]) <= {
        "usr",
        "bin",
        "sbin",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "dev",
        "proc",
        "tmp",
    } | {os.path.realpath(sys.base_prefix).split("/")[1]}
    assert "home" not in seen["root"] and "etc" not in seen["root"] and "work" not in seen["root"]
    assert len(seen["pids"]) == 1  # itself only: the init and the judge are hidden (hidepid)
    assert seen["writable"] == {"/x": False, "/usr/x": False, "/tmp/x": True, "/dev/x": False}
    assert seen["net"] != "connected" and seen["ifaces"] == ["lo"]
    assert 0 < seen["tmp_mb"] <= 8 and seen["cwd"] == seen["home"] == "/tmp"
    assert seen["evaluator_visible"] is False


def test_root_always_gets_a_namespace_sandbox():
    """As root (CI) the kernel lets us build namespaces: the automatic choice must be a strong level."""
    if os.geteuid() != 0:
        pytest.skip("not root")
    level, _ = sb.select_isolation()
    assert level in ("userns", "rootns")


CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("standalone_sandbox", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sb
    spec.loader.exec_module(sb)
    rows = json.loads(sys.stdin.read())
    python, why = sb._probe("userns")
    out = {"python": python, "why": why, "bases": sorted(sb._cgroup_bases())}
    if python:
        lim = sb._Limits(timeout=5.0, memory_mb=256, max_procs=16, disk_mb=8)
        res = [sb._run_task(sb.Task(**t), lim, "userns", python) for t in rows]
        out["results"] = [(r.status, r.reason, r.stdout_tail[-300:]) for r in res]
    print(json.dumps(out))
    """
)


def _unprivileged_python() -> str | None:
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(cand):
            continue
        probe = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", cand, "-I", "-S", "-c", "pass"],
            capture_output=True,
            cwd="/",
        )
        if probe.returncode == 0:
            return cand
    return None


@pytest.mark.slow
def test_non_root_evaluator_gets_the_user_namespace_sandbox(tmp_path):
    """The evaluator as an ordinary user (nobody): self-mapped user namespace, the program in a nested one,
    no cgroups (so the init's memory poll and RLIMIT_NPROC do the capping)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become another user")
    python = _unprivileged_python()
    if python is None:
        pytest.skip("no interpreter the nobody user can run")
    probs = load_problems()
    canon = task_for(probs[0], probs[0]["canonical_solution"])
    net = task_for(
        probs[1],
        "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        + probs[1]["canonical_solution"],
    )
    forkmem = task_for(
        probs[2],
        "    import os, time\n    kids = [os.fork() for _ in range(3)]\n"
        "    if 0 in kids:\n        b = b'x' * (150 << 20)\n        time.sleep(1)\n        os._exit(0)\n"
        "    if any(os.waitpid(k, 0)[1] for k in kids):\n        return None\n"
        + probs[2]["canonical_solution"],
    )
    unjudged = sb.Task("import os\nprint(os.getuid(), len(os.listdir('/proc')))\n")
    rows = [
        {"program": t.program, "tests": t.tests, "entry_point": t.entry_point} for t in (canon, net, forkmem)
    ]
    rows.append({"program": unjudged.program})
    # nobody must be able to read the module: the checkout may sit in a private directory (mktemp -d)
    readable = Path(tempfile.mkdtemp(prefix="disel-sandbox-src-", dir="/tmp"))
    readable.chmod(0o755)
    module = readable / "sandbox.py"
    shutil.copyfile(SANDBOX_PY, module)
    module.chmod(0o644)
    try:
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                python,
                "-I",
                "-S",
                "-c",
                CHILD,
                str(module),
            ],
            input=json.dumps(rows),
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
    finally:
        shutil.rmtree(readable, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["python"] is None:
        if out["why"].startswith("unshare:"):
            pytest.skip(f"unprivileged user namespaces are disabled here: {out['why']}")
        pytest.fail(f"the userns sandbox is broken for a normal user: {out['why']}")
    assert out["bases"] == []  # nobody may not create cgroups here
    (s0, _, _), (s1, _, _), (s2, why2, _), (s3, _, printed) = out["results"]
    assert s0 == "passed"
    assert s1 == "failed" and s2 == "failed" and "memory limit" in why2
    assert s3 == "exited" and printed.split()[0] == "1000"  # a non-zero uid inside, though nobody outside


NO_USERNS = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
WEAK_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("standalone_sandbox", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sb
    spec.loader.exec_module(sb)
    print(json.dumps({level: sb._probe(level) for level in ("userns", "rootns", "weak")}))
    """
)


@pytest.mark.slow
def test_refuses_to_run_code_where_the_kernel_offers_no_namespaces(tmp_path):
    """A real machine without user namespaces (max_user_namespaces=0) where we look like root but own one
    uid only: every level fails and the CLI refuses in one sentence; even the weak sandbox cannot start
    (it would have to run the program as root)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare to build that machine")
    probs = load_problems(1)
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        json.dumps({"task_id": probs[0]["task_id"], "completion": probs[0]["canonical_solution"]})
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_SRC)}
    machine = ["unshare", "--user", "--map-root-user", "sh", "-c", NO_USERNS, "sh", sys.executable]
    proc = subprocess.run(
        [*machine, "-m", "disel.cli", "eval-code", str(samples), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if "unshare failed" in proc.stderr:
        pytest.skip(f"cannot build a user namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("disel eval-code: error: Refusing to run generated code"), err
    assert "userns: unshare" in err and "--weak-sandbox" in err and "sysctl" in err
    assert err.count(". ") == 0 and err.endswith(".")  # one sentence
    weak = subprocess.run(
        [*machine, "-I", "-S", "-c", WEAK_CHILD, str(SANDBOX_PY)], capture_output=True, text=True, timeout=120
    )
    assert weak.returncode == 0, weak.stderr
    probes = json.loads(weak.stdout)
    assert {level: python for level, (python, _) in probes.items()} == {
        "userns": None,
        "rootns": None,
        "weak": None,
    }
    assert probes["weak"][1]  # and says why: it has no non-root uid to run the program as
