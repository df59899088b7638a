"""Run untrusted (model-generated) Python code: kernel namespaces, cgroups, and a pass that must be proven.

How a pass is proven
--------------------
A judged task has untrusted ``program`` text (prompt + completion) and trusted ``tests`` (prompt + the
problem's ``check``). They never share a process:

- the *worker* (fresh interpreter, ``python -I -S``) executes the program, then answers calls of its entry
  point, one at a time, over a pair of pipes;
- the *judge* (a trusted process) executes the tests and calls ``check(candidate)`` where ``candidate``
  sends the arguments to the worker and returns its answer. Values cross the boundary as plain data only
  (None, bool, int, float, complex, str, bytes, list, tuple, dict, set), so an object whose ``__eq__``
  always says True never reaches an assert, and the worker never sees the tests;
- only after ``check`` returns does the judge write the run's secret token to a result pipe that exists
  only in the trusted processes. The evaluator counts a pass iff it reads that token. The worker's exit
  status never counts: ``SystemExit(0)``, ``os._exit(0)`` or an ``atexit`` hook just end the worker, the
  judge's pending call fails and no token is written.

The worker never holds the token: it is an ``execve`` of a fresh interpreter (no memory shared with the
trusted processes), gets only its own pipes (every other descriptor is closed before ``execve``), and
the trusted processes are non-dumpable, so neither ``/proc/<pid>/mem`` nor ``/proc/<pid>/fd`` nor
``ptrace`` reaches them from the worker's uid, which holds no capabilities (and ``hidepid`` hides them).
So reading memory with ``ctypes`` or ``gc`` finds nothing to forge with: the secret is in other processes.

Isolation (``isolation="userns"``, the default wherever the kernel allows it)
----------------------------------------------------------------------------
Every program gets new user, PID, network, mount, IPC and UTS namespaces. The trusted init of the PID
namespace builds a new root and ``pivot_root``\\ s into it: a read-only tmpfs holding read-only binds of
``/usr``, ``/lib*``, ``/bin``, ``/sbin`` and the interpreter's prefix, five device nodes, a fresh
``/proc`` (``hidepid``), and a private size-limited tmpfs ``/tmp`` (cwd and HOME; nothing else is
writable). The network namespace has only a down loopback: no connection can be made. When the init
exits, the kernel kills every process left in the namespace, so nothing outlives the program (daemons
made with ``fork`` + ``setsid`` included). The worker runs as uid 1000 of its namespace, mapped to an
unprivileged host uid (an unused high uid when the evaluator is root, the evaluator's own uid otherwise,
then through a nested user namespace), with every capability dropped and ``no_new_privs`` set.

Limits: wall time (the evaluator kills the sandbox), and when cgroups are writable one cgroup per
program caps total memory (all processes and the tmpfs together) and the number of processes; without
cgroups the init polls the namespace's total memory every 20 ms and ``RLIMIT_NPROC`` counts only the
program's own uid inside its user namespace. ``RLIMIT_AS`` / ``RLIMIT_CPU`` / ``RLIMIT_FSIZE`` apply per
process too.

``isolation="rootns"`` is the same without the user namespace (root only: the kernel refuses user
namespaces but root may still create the others); the program runs as an unused high host uid.
``isolation="weak"`` (only on explicit request) has no namespaces: see :func:`select_isolation`.

What a determined program could still do: exploit a kernel bug (the kernel is the trust boundary: no
seccomp filter); read the exposed system directories; burn its own time until the timeout; and, where
the evaluator is an ordinary user, kill the judge (same host uid), which only fails its own task. In the
weak sandbox run by an ordinary user it has that user's rights, so it can tamper with anything the user
owns, this evaluator and its source included: results of such a run can be faked.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import sys
import time

# The part of this file up to the marker below is also executed on its own by the sandbox launcher
# (``python -I -S``, standard library only, nothing imported that it does not need), before and inside
# the namespaces. It must stay importable by that interpreter and free of evaluator-only imports.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_MOVE, _MS_REC, _MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 8192, 16384, 1 << 18, 1 << 21, 1 << 24
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_SECUREBITS = 1, 4, 24, 28
_PR_SET_NO_NEW_PRIVS = 38
# NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE and their locks
_SECUREBITS = 0b11101111
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185}
_INNER_PROGRAM_ID = 1000  # the program's uid/gid inside its user namespace
_DEVICES = ("null", "zero", "full", "random", "urandom")

# Plain-data codec and framing, shared by the judge (exec'd below) and the worker (part of its source).
_CODEC_SRC = r"""
_MAX_FRAME = 16 << 20

def _blob(out, tag, raw):
    out.append(tag + len(raw).to_bytes(4, "big"))
    out.append(raw)

def _enc(v, out, depth=0):
    if depth > 200:
        raise ValueError("value nested too deeply")
    d = depth + 1
    if v is None:
        out.append(b"n")
    elif v is True:
        out.append(b"t")
    elif v is False:
        out.append(b"f")
    elif isinstance(v, int):
        _blob(out, b"i", format(int.__index__(v), "x").encode())
    elif isinstance(v, float):
        _blob(out, b"r", float.hex(float(v)).encode())
    elif isinstance(v, complex):
        _blob(out, b"c", (float.hex(v.real) + " " + float.hex(v.imag)).encode())
    elif isinstance(v, str):
        _blob(out, b"s", str.encode(v, "utf-8", "surrogatepass"))
    elif isinstance(v, (bytes, bytearray)):
        _blob(out, b"y", bytes(v))
    elif isinstance(v, dict):
        items = list(dict.items(v))
        out.append(b"d" + len(items).to_bytes(4, "big"))
        for k, x in items:
            _enc(k, out, d)
            _enc(x, out, d)
    else:
        for kind, tag in ((tuple, b"u"), (list, b"l"), (frozenset, b"z"), (set, b"S")):
            if isinstance(v, kind):
                items = list(kind.__iter__(v))
                out.append(tag + len(items).to_bytes(4, "big"))
                for x in items:
                    _enc(x, out, d)
                return
        raise TypeError("a %s is not plain data (None, bool, int, float, complex, str, bytes, list, "
                        "tuple, dict, set)" % type(v).__name__)

_KINDS = {b"u": tuple, b"l": list, b"z": frozenset, b"S": set}

def _dec_at(b, i, depth):
    if depth > 200:
        raise ValueError("malformed value")
    t = b[i:i + 1]
    i += 1
    if t == b"n":
        return None, i
    if t == b"t":
        return True, i
    if t == b"f":
        return False, i
    head = b[i:i + 4]
    if len(head) != 4:
        raise ValueError("malformed value")
    n = int.from_bytes(head, "big")
    i += 4
    if t in (b"i", b"r", b"c", b"s", b"y"):
        raw = b[i:i + n]
        if len(raw) != n:
            raise ValueError("malformed value")
        i += n
        if t == b"i":
            return int(raw.decode("ascii"), 16), i
        if t == b"r":
            return float.fromhex(raw.decode("ascii")), i
        if t == b"c":
            re_, im = raw.decode("ascii").split(" ")
            return complex(float.fromhex(re_), float.fromhex(im)), i
        if t == b"s":
            return raw.decode("utf-8", "surrogatepass"), i
        return bytes(raw), i
    if t == b"d":
        out = {}
        for _ in range(n):
            k, i = _dec_at(b, i, depth + 1)
            out[k], i = _dec_at(b, i, depth + 1)
        return out, i
    if t in _KINDS:
        items = []
        for _ in range(n):
            x, i = _dec_at(b, i, depth + 1)
            items.append(x)
        return _KINDS[t](items), i
    raise ValueError("malformed value")

def _dec(b):
    v, i = _dec_at(b, 0, 0)
    if i != len(b):
        raise ValueError("malformed value")
    return v

def _read_exact(fd, n):
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)

def _send(fd, obj):
    out = []
    _enc(obj, out)
    data = b"".join(out)
    if len(data) > _MAX_FRAME:
        raise ValueError("value too large to send")
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        view = view[os.write(fd, view):]

def _recv(fd):
    head = _read_exact(fd, 8)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > _MAX_FRAME:
        raise ValueError("frame too large")
    body = _read_exact(fd, n)
    return None if body is None else _dec(body)
"""

# The worker: a fresh interpreter. Reads the program from fd 3, runs it, then serves calls (fd 3 in, fd 4
# out). Everything here may be subverted by the program; nothing here is trusted by the judge.
_WORKER_SRC = (
    "import os, sys\n"
    + _CODEC_SRC
    + r"""
def _disel_worker():
    if sys.argv[-1] == "weak":  # no namespaces: at least keep other same-uid programs out of this one
        try:
            import ctypes
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
        except Exception:
            pass
    msg = _recv(3)
    if msg is None:
        return
    src, entry = msg["program"], msg.get("entry")

    def hook(*exc):  # source lines in tracebacks, without importing linecache up front
        import linecache
        linecache.cache["program.py"] = (len(src), None, src.splitlines(True), "program.py")
        sys.__excepthook__(*exc)

    sys.excepthook = hook
    g = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
    exec(compile(src, "program.py", "exec"), g)
    if entry is None:
        return
    fn = g.get(entry)
    if not callable(fn):
        _send(4, {"error": "the program defines no function %r" % entry})
        return
    _send(4, {"ready": True})
    while True:
        req = _recv(3)
        if req is None:
            return
        try:
            out = {"ok": fn(*req["a"], **req["k"])}
            try:
                _send(4, out)
                continue
            except (TypeError, ValueError) as e:
                out = {"error": "the answer cannot be sent: %s" % e}
        except BaseException as e:
            out = {"error": ("%s: %s" % (type(e).__name__, e))[:2000]}
        _send(4, out)

_disel_worker()
"""
)

_codec: dict = {"os": os}
exec(compile(_CODEC_SRC, "<disel sandbox codec>", "exec"), _codec)


class _SetupError(Exception):
    """A sandbox layer could not be set up; the program is not run."""


class _Libc:
    """The few libc calls the standard library lacks, raising _SetupError with errno text."""

    def __init__(self) -> None:
        import ctypes

        self._ct = ctypes
        self._c = ctypes.CDLL(None, use_errno=True)
        self.machine = os.uname().machine

    def _ok(self, ret: int, what: str) -> None:
        if ret != 0:
            raise _SetupError(f"{what}: {os.strerror(self._ct.get_errno())}")

    def prctl(self, op: int, arg: int, what: str = "prctl") -> None:
        self._ok(self._c.prctl(op, self._ct.c_ulong(arg), 0, 0, 0), what)

    def unshare(self, flags: int) -> None:
        self._ok(self._c.unshare(flags), "unshare")

    def mount(self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        ret = self._c.mount(enc(src), enc(dst), enc(fstype), self._ct.c_ulong(flags), enc(data))
        self._ok(ret, f"mount {fstype or src or ''} on {dst}")

    def umount2(self, path: str, flags: int) -> None:
        self._ok(self._c.umount2(path.encode(), flags), f"umount {path}")

    def sethostname(self, name: str) -> None:
        self._ok(self._c.sethostname(name.encode(), len(name)), "sethostname")

    def pivot_root(self) -> None:
        """Make the cwd the root (``pivot_root(".", ".")`` then detach the old root stacked on it)."""
        nr = _SYS_PIVOT_ROOT.get(self.machine)
        if nr is None:  # unknown architecture: move the new root over "/" and chroot into it
            self.mount(".", "/", None, _MS_MOVE, None)
            os.chroot(".")
        else:
            self._ok(self._c.syscall(nr, b".", b"."), "pivot_root")
            self.umount2(".", _MNT_DETACH)
        os.chdir("/")

    def drop_bounding_set(self) -> None:
        """Empty bounding set and locked securebits: no exec can ever grant a capability again."""
        for cap in range(64):
            if self._c.prctl(_PR_CAPBSET_DROP, self._ct.c_ulong(cap), 0, 0, 0) != 0:
                if self._ct.get_errno() == 22:  # EINVAL: past the last capability
                    break
                raise _SetupError(f"dropping capability {cap}: {os.strerror(self._ct.get_errno())}")
        self.prctl(_PR_SET_SECUREBITS, _SECUREBITS, "securebits")

    def capset_zero(self) -> None:
        header = (self._ct.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (self._ct.c_uint32 * 6)()
        nr = _SYS_CAPSET.get(self.machine)
        ret = self._c.syscall(nr, header, data) if nr is not None else self._c.capset(header, data)
        self._ok(ret, "capset")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _close_fds_except(keep) -> None:
    """Close every descriptor above 2 but ``keep``."""
    lo = 3
    for fd in sorted(k for k in set(keep) if k >= 3):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


def _report(fd: int, line: str) -> None:
    """A line on the result pipe (only trusted processes hold it)."""
    with contextlib.suppress(OSError):
        os.write(fd, (line.replace("\n", " ")[:4000] + "\n").encode())


def _mount_flags_of(path: str) -> int:
    """Flags of the mount holding ``path`` that a remount inside a user namespace must keep."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC)):
        if f & st:
            flags |= ms
    if f & os.ST_NOATIME:
        flags |= _MS_NOATIME
    elif f & os.ST_RELATIME:
        flags |= _MS_RELATIME
    else:
        flags |= _MS_STRICTATIME
    if f & os.ST_NODIRATIME:
        flags |= _MS_NODIRATIME
    return flags


def _bind(libc: _Libc, src: str, dst: str, readonly: bool, device: bool = False) -> None:
    try:
        libc.mount(src, dst, None, _MS_BIND, None)
        recursive = False
    except _SetupError:  # submounts the user namespace may not uncover: bind them along
        libc.mount(src, dst, None, _MS_BIND | _MS_REC, None)
        recursive = True
    targets = [dst]
    if recursive:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
        targets += [p for p in points if p.startswith(dst.rstrip("/") + "/")]
    for t in targets:  # device nodes keep the host's flags (nodev only if /dev itself has it)
        flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _mount_flags_of(t)
        flags |= (_MS_RDONLY if readonly else 0) | (_MS_NOEXEC if device else _MS_NODEV)
        libc.mount(None, t, None, flags, None)


def _open_binds(paths) -> list:
    """Resolve the exposed paths while still host root/user: ``(path, "link", target)`` or
    ``(path, "dir", O_PATH fd)``; the unprivileged namespace root may not be able to look them up."""
    out = []
    for src in paths:
        if os.path.islink(src):
            out.append((src, "link", os.readlink(src)))
        elif os.path.isdir(src):
            out.append((src, "dir", os.open(src, os.O_PATH | os.O_DIRECTORY)))
    return out


def _setup_root(cfg: dict, libc: _Libc) -> bool:
    """Build and enter the program's root; returns whether a /proc could be mounted."""
    os.umask(0o022)
    root = cfg["mountpoint"]
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates back to the host
    libc.mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for src, kind, ref in cfg["_opened_binds"]:
        dst = root + src
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if kind == "link":
            os.symlink(ref, dst)
        else:
            os.makedirs(dst, exist_ok=True)
            _bind(libc, f"/proc/self/fd/{ref}", dst, readonly=True)
            os.close(ref)
    os.makedirs(root + "/dev")
    for name in _DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _bind(libc, f"/dev/{name}", f"{root}/dev/{name}", readonly=False, device=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "0"), ("stdout", "1"), ("stderr", "2")):
        os.symlink(target if name == "fd" else f"/proc/self/fd/{target}", f"{root}/dev/{name}")
    os.makedirs(root + "/tmp")
    lim, owner = cfg["limits"], cfg["ids"]["tmp_owner"]
    opts = f"size={lim['disk_mb']}m,nr_inodes={lim['disk_inodes']},mode=0700,uid={owner},gid={owner}"
    libc.mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts)
    os.makedirs(root + "/proc")
    have_proc = False
    for popts in ("hidepid=invisible,subset=pid", "hidepid=2", None):
        try:
            libc.mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, popts)
            have_proc = True
            break
        except _SetupError:
            continue
    os.chdir(root)
    libc.pivot_root()
    libc.mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
    with contextlib.suppress(_SetupError):
        libc.sethostname("sandbox")
    return have_proc


def _set_identity(libc: _Libc, how: str, uid: int, has_proc: bool, setgroups: bool) -> None:
    """Leave root for good: ``setuid`` to ``uid``, or a nested user namespace (uid 1000, host uid
    unchanged), or nothing (weak sandbox run by a normal user); then no capability, no_new_privs."""
    if how == "nested" and has_proc:
        # /proc/self of a non-dumpable process belongs to root; this process execs next anyway, and
        # nothing else with its uid can name it (its own PID namespace, the init and judge trusted)
        libc.prctl(_PR_SET_DUMPABLE, 1)
        libc.unshare(_CLONE_NEWUSER)
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{_INNER_PROGRAM_ID} 0 1\n")
        _write_file("/proc/self/gid_map", f"{_INNER_PROGRAM_ID} 0 1\n")
    if how != "none":
        libc.drop_bounding_set()
    if how == "setuid":
        if setgroups:
            os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if 0 in os.getresuid() or 0 in os.getresgid():
            raise _SetupError("still root after setuid")
    if how != "none":
        libc.capset_zero()  # securebits keep them across setuid: clear them explicitly
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def _limit(which: int, value: int) -> None:
    import resource

    resource.setrlimit(which, (value, value))


def _worker_exec(cfg: dict, libc: _Libc, rfd: int, wfd: int, has_proc: bool) -> None:
    """Child side of the worker: descriptors, identity, limits, then exec a fresh interpreter."""
    try:
        import fcntl
        import resource

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        r, w = fcntl.fcntl(rfd, fcntl.F_DUPFD, 10), fcntl.fcntl(wfd, fcntl.F_DUPFD, 10)
        os.dup2(r, 3)
        os.dup2(w, 4)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(5, os.sysconf("SC_OPEN_MAX"))
        ids, lim = cfg["ids"], cfg["limits"]
        _set_identity(libc, ids["worker"], ids["worker_uid"], has_proc, ids["setgroups"])
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        with contextlib.suppress(OSError):  # the OOM killer takes the program first, not the judge
            _write_file("/proc/self/oom_score_adj", "1000")
        mem = lim["memory_mb"] << 20
        _limit(resource.RLIMIT_AS, mem)
        _limit(resource.RLIMIT_NPROC, lim["max_procs"])
        _limit(resource.RLIMIT_CPU, lim["cpu_seconds"])
        _limit(resource.RLIMIT_FSIZE, lim["disk_mb"] << 20)
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_NOFILE, 256)
        _limit(resource.RLIMIT_MEMLOCK, 0)
        _limit(resource.RLIMIT_MSGQUEUE, 0)
        os.chdir(cfg["worker_cwd"])
        env = {"PATH": "/usr/bin:/bin", "HOME": cfg["worker_cwd"], "TMPDIR": cfg["worker_cwd"]}
        env["LANG"] = "C.UTF-8"
        py = cfg["python"]
        tail = "weak" if cfg["level"] == "weak" else "ns"
        argv = [py, "-I", "-S", "-B", "-c", _WORKER_SRC, "disel-sandbox-worker", cfg["evaluator"], tail]
        os.execve(py, argv, env)
    except BaseException as e:  # noqa: BLE001 - report whatever stopped the start, then die
        try:
            os.write(2, f"disel sandbox: the program could not be started: {e}\n".encode())
        finally:
            os._exit(126)


def _judge(cfg: dict, libc: _Libc, to_w: int, from_w: int) -> None:
    """Trusted: run the tests against the worker's answers; write the token only if check returns."""
    import resource
    import traceback

    res = cfg["fd_result"]
    code = 1
    try:
        _close_fds_except((to_w, from_w, res))
        ids = cfg["ids"]
        if ids["judge"] == "setuid":
            _set_identity(libc, "setuid", ids["judge_uid"], False, ids["setgroups"])
        libc.prctl(_PR_SET_DUMPABLE, 0)  # after any uid change, which resets it
        lim = cfg["limits"]
        _limit(resource.RLIMIT_AS, lim["memory_mb"] << 20)
        _limit(resource.RLIMIT_CPU, lim["cpu_seconds"])
        _limit(resource.RLIMIT_CORE, 0)
        send, recv = _codec["_send"], _codec["_recv"]
        send(to_w, {"program": cfg["program"], "entry": cfg["entry_point"]})  # it starts meanwhile
        ns: dict = {"__name__": "__disel_tests__"}
        exec(compile(cfg["tests"], "tests.py", "exec"), ns)
        hello = recv(from_w)
        if type(hello) is not dict or hello.get("ready") is not True:
            why = hello.get("error") if isinstance(hello, dict) else None
            _report(res, f"F {why or 'the program ended before defining its function'}")
            os._exit(1)

        class CandidateError(Exception):
            pass

        def candidate(*args, **kwargs):
            send(to_w, {"a": list(args), "k": kwargs})
            reply = recv(from_w)
            if reply is None:
                raise CandidateError("the program exited during a call")
            if type(reply) is not dict:
                raise CandidateError("the program answered nonsense")
            if "ok" in reply:
                return reply["ok"]
            raise CandidateError(f"the candidate raised {reply.get('error')}")

        ns[cfg["entry_point"]] = candidate  # tests may call it by name too (HumanEval/33)
        ns[cfg["check"]](candidate)
        _report(res, cfg["token"])  # the only way a pass is ever recorded
        code = 0
    except BaseException as e:  # noqa: BLE001 - any failure of the tests is a failed task
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "tests.py"]
        where = f" at tests.py:{frames[-1].lineno}" if frames else ""
        msg = str(e) if not isinstance(e, AssertionError) else ""
        _report(res, f"F {type(e).__name__}{where}{': ' + msg if msg else ''}"[:500])
        traceback.print_exc(limit=3)
    finally:
        os._exit(code)


def _ns_memory_bytes() -> int:
    """Private resident memory of every process of this PID namespace (its /proc)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/statm") as f:
                    fields = f.read().split()
                total += (int(fields[1]) - int(fields[2])) * page
            except (OSError, IndexError, ValueError):
                continue
    return total


def _status_of(st: int) -> int:
    return os.waitstatus_to_exitcode(st)


def _supervise(cfg: dict, libc: _Libc, in_ns: bool, has_proc: bool) -> None:
    """Start the worker (and the judge), wait for the one that decides, report, exit.

    In a PID namespace this process is its init: when it exits the kernel kills everything left."""
    res = cfg["fd_result"]
    jw_r, jw_w = os.pipe()
    wj_r, wj_w = os.pipe()
    wpid = os.fork()
    if wpid == 0:
        _worker_exec(cfg, libc, jw_r, wj_w, has_proc)
    _CHILDREN.append(wpid)
    judged = cfg["entry_point"] is not None
    jpid = None
    if judged:
        jpid = os.fork()
        if jpid == 0:
            os.close(jw_r)
            os.close(wj_w)
            _judge(cfg, libc, jw_w, wj_r)
        _CHILDREN.append(jpid)
    for fd in (jw_r, wj_w, wj_r):
        os.close(fd)
    if not judged:
        with contextlib.suppress(OSError):
            _codec["_send"](jw_w, {"program": cfg["program"], "entry": None})
    os.close(jw_w)
    main = jpid if judged else wpid
    done: dict = {}
    poll = in_ns and has_proc and cfg["poll_memory"]
    limit = cfg["limits"]["memory_mb"] << 20
    memory_killed = False
    while main not in done:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG if poll else 0)
        except ChildProcessError:
            break
        if pid == 0:
            if not memory_killed and _ns_memory_bytes() > limit:
                os.kill(-1, signal.SIGKILL)  # every process of the namespace but this init
                memory_killed = True
            time.sleep(0.02)
            continue
        done[pid] = _status_of(st)
    w, j = ("-" if c is None else str(c) for c in (done.get(wpid), done.get(jpid)))
    _report(res, f"S {w} {j} {int(memory_killed)} {int(poll)}")
    if not in_ns:
        for pid in _CHILDREN:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    os._exit(0)


_CHILDREN: list = []


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    for pid in _CHILDREN:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if not _CHILDREN:
        os._exit(1)


def _init(cfg: dict, libc: _Libc) -> None:
    """PID 1 of the new namespaces: build the root, then supervise."""
    res = cfg["fd_result"]
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        del _CHILDREN[:]
        keep = [ref for _, kind, ref in cfg["_opened_binds"] if kind == "dir"]
        _close_fds_except([res, *keep])  # the evaluator's handshake pipes stay with the launcher only
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(_PR_SET_DUMPABLE, 0)
        has_proc = _setup_root(cfg, libc)
        _supervise(cfg, libc, in_ns=True, has_proc=has_proc)
    except _SetupError as e:
        _report(res, f"E {e}")
    except BaseException as e:  # noqa: BLE001
        _report(res, f"E sandbox init: {type(e).__name__}: {e}")
    os._exit(1)


def _launcher_main() -> None:
    """``python -I -S -c <bootstrap> sandbox.py <evaluator pid>``: config on stdin, then the layers."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    libc = _Libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = int(sys.argv[2])
    if os.getppid() != parent:
        os._exit(1)
    chunks = []
    while True:
        b = os.read(0, 1 << 16)
        if not b:
            break
        chunks.append(b)
    cfg = marshal.loads(b"".join(chunks))  # written by the evaluator, trusted
    if cfg["level"] != "userns" or os.geteuid() == 0:
        # an unprivileged evaluator writes this process's uid map first: /proc/<pid>/uid_map of a
        # non-dumpable process belongs to root (only this user's own processes could look meanwhile)
        libc.prctl(_PR_SET_DUMPABLE, 0)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    res, up, down = cfg["fd_result"], cfg["fd_up"], cfg["fd_down"]
    try:
        for d in cfg["cgroups"]:
            try:
                _write_file(d + "/cgroup.procs", str(os.getpid()))
            except OSError as e:
                raise _SetupError(f"cgroup {d}: {e.strerror}") from e
        level = cfg["level"]
        if level == "weak":
            os.close(up)
            os.close(down)
            _supervise(cfg, libc, in_ns=False, has_proc=False)
        flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
        if level == "userns":
            libc.unshare(flags | _CLONE_NEWUSER)
            # still the host uid that owns the paths (no capability needed), in the new mount namespace
            cfg["_opened_binds"] = _open_binds(cfg["binds"])
            os.write(up, b"u")
            if os.read(down, 1) != b"g":
                raise _SetupError("the evaluator could not write the user namespace's uid map")
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            if cfg["ids"]["setgroups"]:
                os.setgroups([])
            libc.prctl(_PR_SET_DUMPABLE, 0)  # uid changes reset both
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
        else:
            libc.unshare(flags)
            cfg["_opened_binds"] = _open_binds(cfg["binds"])
        pid = os.fork()
        if pid == 0:
            _init(cfg, libc)
        _CHILDREN.append(pid)
        os.write(up, f"p{pid}\n".encode())
        for fd in (res, up, down):
            os.close(fd)
        while True:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                break
        os._exit(0)
    except _SetupError as e:
        _report(res, f"E {e}")
    except BaseException as e:  # noqa: BLE001
        _report(res, f"E sandbox launcher: {type(e).__name__}: {e}")
    os._exit(1)


# ---- end of the launcher part ----
# Everything below runs in the evaluator only.

import itertools  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from functools import lru_cache  # noqa: E402

NOBODY = 65534
_PROGRAM_UID_BASE = 0x7FFF0000  # unused high host uids, one per concurrently running program
_LEVELS = ("userns", "rootns", "weak")
_OUTPUT_CAP = 8 << 20  # bytes of stdout + stderr after which a program is stopped
_TAIL = 4000
_SLOTS = itertools.count()
_MARKER = "\n# ---- end of the launcher part ----"
# stdin: 8-byte length, the launcher part compiled (marshal, from this same interpreter binary) or nothing
# (then it is read from sys.argv[1] and compiled), then the run's config (marshal)
_BOOTSTRAP = (
    "import marshal, os, sys\n"
    "def rd(n):\n"
    "    b = b''\n"
    "    while len(b) < n:\n"
    "        c = os.read(0, n - len(b))\n"
    "        if not c:\n"
    "            raise SystemExit(1)\n"
    "        b += c\n"
    "    return b\n"
    "blob = rd(int.from_bytes(rd(8), 'big'))\n"
    "if blob:\n"
    "    code = marshal.loads(blob)\n"
    "else:\n"
    f"    code = compile(open(sys.argv[1], encoding='utf-8').read().split({_MARKER!r})[0], sys.argv[1], 'exec')\n"
    "g = {'__name__': '__disel_launcher__'}\n"
    "exec(code, g)\n"
    "g['_launcher_main']()\n"
)


@lru_cache(maxsize=1)
def _launcher_code() -> bytes:
    """The launcher part of this file, compiled once per evaluator."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        src = f.read().split(_MARKER)[0]
    return marshal.dumps(compile(src, os.path.abspath(__file__), "exec"))


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): no score is made up for it."""


class SandboxInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C reached the evaluator: every program was killed and its files removed."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Task:
    """What to run. ``program`` is untrusted; ``tests`` is trusted code defining ``check(candidate)``.

    With ``entry_point`` set the task is judged (see the module docstring); without it the program just
    runs and only its exit status is reported (status "exited", never "passed")."""

    program: str
    tests: str = ""
    entry_point: str | None = None
    check: str = "check"


@dataclass
class ExecResult:
    """Outcome of one program.

    ``status``: "passed" (the judge proved it), "failed", "timeout", "exited" (unjudged program ended by
    itself; see ``returncode``), "error" (the sandbox failed) or "interrupted"."""

    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str = ""
    stdout_tail: str = ""
    reason: str = ""
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _user_error(msg: str) -> Exception:
    from ..errors import UserError

    return UserError(msg)


# ---------------------------------------------------------------- cgroups


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of this process's mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and len(rest) >= 3:
                out.append((fields[4].replace("\\040", " "), rest[0], rest[2]))
    return out


def _probe_dir(base: str) -> bool:
    d = os.path.join(base, f"disel-sandbox-probe-{os.getpid()}")
    try:
        os.mkdir(d)
        os.rmdir(d)
        return True
    except OSError:
        return False


@lru_cache(maxsize=1)
def _cgroup_bases() -> dict[str, str]:
    """Writable cgroup directories to create per-program groups under: keys ``v2`` (tracking and kill;
    ``v2_limits`` also set when its memory and pids controllers are on), ``memory`` and ``pids`` (v1)."""
    bases: dict[str, str] = {}
    try:
        mounts = _mounts()
        with open("/proc/self/cgroup") as f:
            own = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return bases
    for _, controllers, path in own:
        ctl = set(controllers.split(",")) if controllers else set()
        for point, fstype, opts in mounts:
            if fstype == "cgroup2" and not controllers:
                key = "v2"
            elif fstype == "cgroup" and ctl & {"memory", "pids"} and ctl <= set(opts.split(",")):
                key = "memory" if "memory" in ctl else "pids"
            else:
                continue
            base = os.path.normpath(point + path)
            if key not in bases and os.path.isdir(base) and _probe_dir(base):
                bases[key] = base
                if key == "memory" and "pids" in ctl:  # both controllers in one v1 hierarchy
                    bases["pids"] = base
    v2 = bases.get("v2")
    if v2:
        try:
            with open(os.path.join(v2, "cgroup.subtree_control")) as f:
                on = set(f.read().split())
            if {"memory", "pids"} <= on:
                bases["v2_limits"] = v2
        except OSError:
            pass
    return bases


class _Cgroup:
    """One program's cgroups (every hierarchy found writable); all limits optional."""

    def __init__(self, name: str, memory_bytes: int, pids_max: int, bases: dict[str, str]) -> None:
        self.dirs: list[str] = []
        self.memory_limited = self.pids_limited = False
        self.kill_file: str | None = None
        for key in ("v2", "memory", "pids"):
            if key not in bases:
                continue
            d = os.path.join(bases[key], name)
            if d not in self.dirs:
                os.mkdir(d)
                self.dirs.append(d)
            if key == "v2":
                if os.path.exists(os.path.join(d, "cgroup.kill")):
                    self.kill_file = os.path.join(d, "cgroup.kill")
                if "v2_limits" in bases:
                    self._set(d, "memory.max", str(memory_bytes))
                    self._set(d, "memory.swap.max", "0", optional=True)
                    self._set(d, "memory.oom.group", "1", optional=True)
                    self._set(d, "pids.max", str(pids_max))
                    self.memory_limited = self.pids_limited = True
            elif key == "memory":
                self._set(d, "memory.limit_in_bytes", str(memory_bytes))
                self._set(d, "memory.memsw.limit_in_bytes", str(memory_bytes), optional=True)
                self.memory_limited = True
            else:
                self._set(d, "pids.max", str(pids_max))
                self.pids_limited = True

    @staticmethod
    def _set(d: str, key: str, value: str, optional: bool = False) -> None:
        try:
            _write_file(os.path.join(d, key), value)
        except OSError:
            if not optional:
                raise

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as f:
                out.update(int(x) for x in f.read().split())
        return out

    def kill_all(self, wait: float = 5.0) -> bool:
        """SIGKILL every process in the groups until they are empty; False if some survived ``wait``."""
        end = time.monotonic() + wait
        while True:
            pids = self.pids()
            if not pids:
                return True
            if self.kill_file:
                with contextlib.suppress(OSError):
                    _write_file(self.kill_file, "1")
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > end:
                return False
            time.sleep(0.01)

    def events(self) -> list[str]:
        """Which limits were hit, from the controllers' counters."""
        hit = []
        for d in self.dirs:
            for fname, key, label in (
                ("memory.events", "oom_kill", "memory limit"),
                ("memory.oom_control", "oom_kill", "memory limit"),
                ("memory.failcnt", None, "memory limit"),
                ("pids.events", "max", "process limit"),
            ):
                try:
                    with open(os.path.join(d, fname)) as f:
                        text = f.read().split()
                except OSError:
                    continue
                if key is None:
                    n = int(text[0]) if text else 0
                else:
                    n = int(text[text.index(key) + 1]) if key in text else 0
                if n > 0 and label not in hit:
                    hit.append(label)
        return hit

    def remove(self) -> None:
        self.kill_all()
        for d in reversed(self.dirs):
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class _Limits:
    timeout: float
    memory_mb: int
    max_procs: int
    disk_mb: int


def _real_python() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _exposed_paths(python: str) -> list[str]:
    """Host paths the program sees read-only: the system library dirs and the interpreter's prefix."""
    paths = [
        p for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32") if os.path.lexists(p)
    ]
    dirs = [os.path.realpath(p) for p in paths]
    for extra in (sys.base_prefix, os.path.dirname(python)):
        real = os.path.realpath(extra)
        if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in dirs):
            paths.append(real)
            dirs.append(real)
    return paths


def _mountpoint(binds: Sequence[str]) -> str | None:
    """An existing directory to build the new root on (inside the private mount namespace only)."""
    for cand in ("/tmp", "/mnt", "/opt", "/srv", "/media", "/var/tmp", "/run"):
        if not os.path.isdir(cand) or os.path.islink(cand):
            continue
        if any(b == cand or b.startswith(cand + "/") or cand.startswith(b + "/") for b in binds):
            continue
        return cand
    return None


def _alive(pid: int) -> bool:
    """Whether child ``pid`` has not exited (without reaping it)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


class _Run:
    """One sandboxed program, from spawn to cleanup."""

    def __init__(self, task: Task, lim: _Limits, level: str, python: str, stop: threading.Event) -> None:
        self.task, self.lim, self.level, self.python = task, lim, level, python
        self.proc = None
        self.cgroup: _Cgroup | None = None
        self.workdir: str | None = None
        self.fds: list[int] = []
        self.init_pid: int | None = None
        self.killed = stop
        self.setup_error = ""
        self.mount_dir: str | None = None
        self._limits_hit: list[str] = []
        self.token = ""
        self.program_uid = 0

    def _config(self, res_w: int, up_w: int, down_r: int, cgroups: list[str]) -> dict:
        lim, level = self.lim, self.level
        root = os.geteuid() == 0
        uid = _PROGRAM_UID_BASE + next(_SLOTS) % 0x8000
        self.program_uid = uid
        if level == "userns":
            ids = {"worker": "setuid" if root else "nested", "worker_uid": _INNER_PROGRAM_ID}
            ids.update(judge="keep", judge_uid=0, setgroups=root)
            ids["tmp_owner"] = _INNER_PROGRAM_ID if root else 0
        elif level == "rootns":
            ids = {"worker": "setuid", "worker_uid": uid, "judge": "setuid", "judge_uid": NOBODY}
            ids.update(setgroups=True, tmp_owner=uid)
        else:
            ids = {"worker": "setuid" if root else "none", "worker_uid": uid}
            ids.update(judge="setuid" if root else "keep", judge_uid=NOBODY, setgroups=root, tmp_owner=uid)
        binds = _exposed_paths(self.python)
        mountpoint = _mountpoint(binds)
        if mountpoint is None and level != "weak":
            import tempfile

            mountpoint = self.mount_dir = tempfile.mkdtemp(prefix="disel-sandbox-root-")
        return {
            "level": level,
            "evaluator": str(os.getpid()),
            "token": self.token,
            "program": self.task.program,
            "tests": self.task.tests,
            "entry_point": self.task.entry_point,
            "check": self.task.check,
            "python": self.python,
            "binds": binds,
            "mountpoint": mountpoint,
            "cgroups": cgroups,
            "poll_memory": not (self.cgroup and self.cgroup.memory_limited),
            "ids": ids,
            "worker_cwd": self.workdir or "/tmp",
            "fd_result": res_w,
            "fd_up": up_w,
            "fd_down": down_r,
            "limits": {
                "memory_mb": lim.memory_mb,
                "max_procs": lim.max_procs,
                "disk_mb": lim.disk_mb,
                "disk_inodes": max(1024, lim.disk_mb * 64),
                "cpu_seconds": int(lim.timeout) + 2,
            },
        }

    def _write_idmaps(self, pid: int) -> None:
        if os.geteuid() == 0:
            u = g = f"0 {NOBODY} 1\n{_INNER_PROGRAM_ID} {self.program_uid} 1\n"
        else:
            _write_file(f"/proc/{pid}/setgroups", "deny")
            u, g = f"0 {os.geteuid()} 1\n", f"0 {os.getegid()} 1\n"
        _write_file(f"/proc/{pid}/uid_map", u)
        _write_file(f"/proc/{pid}/gid_map", g)

    def _handshake(self, buf: bytes, down_w: int) -> bytes:
        """Messages of the launcher: ``u`` (write my uid map, then answer ``g``), ``p<pid>\\n`` (init)."""
        while buf:
            if buf[:1] == b"u":
                buf = buf[1:]
                try:
                    self._write_idmaps(self.proc.pid)
                    os.write(down_w, b"g")
                except OSError as e:
                    self.setup_error = f"writing the uid map: {e.strerror}"
                    os.write(down_w, b"x")
            elif buf[:1] == b"p" and b"\n" in buf:
                head, _, buf = buf.partition(b"\n")
                self.init_pid = int(head[1:])
            else:
                break
        return buf

    def run(self) -> ExecResult:
        import secrets
        import selectors
        import subprocess

        self.token = secrets.token_hex(16)
        start = time.monotonic()
        deadline = start + self.lim.timeout
        out, err = bytearray(), bytearray()
        lines: list[str] = []
        passed = timed_out = over_output = interrupted = False
        total_out = 0
        try:
            bases = _cgroup_bases() if _CGROUPS_ENABLED[0] else {}
            if bases:
                name = f"disel-sandbox-{os.getpid()}-{next(_SLOTS)}"
                self.cgroup = _Cgroup(name, self.lim.memory_mb << 20, self.lim.max_procs + 3, bases)
            res_r, res_w = os.pipe()
            up_r, up_w = os.pipe()
            down_r, down_w = os.pipe()
            self.fds = [res_r, res_w, up_r, up_w, down_r, down_w]
            if self.level == "weak":
                import tempfile

                self.workdir = tempfile.mkdtemp(prefix="disel-sandbox-", dir=_weak_parent())
            cfg = self._config(res_w, up_w, down_r, self.cgroup.dirs if self.cgroup else [])
            if self.workdir and os.geteuid() == 0:
                os.chown(self.workdir, self.program_uid, self.program_uid)
            here = os.path.abspath(__file__)
            argv = [
                self.python,
                "-I",
                "-S",
                "-c",
                _BOOTSTRAP,
                here,
                str(os.getpid()),
                "disel-sandbox-launcher",
            ]
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(res_w, up_w, down_r),
                start_new_session=True,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            for fd in (res_w, up_w, down_r):
                os.close(fd)
                self.fds.remove(fd)
            code = _launcher_code() if self.python == os.path.realpath(sys.executable) else b""
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(len(code).to_bytes(8, "big") + code + marshal.dumps(cfg))
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            sel = selectors.DefaultSelector()
            so, se = self.proc.stdout.fileno(), self.proc.stderr.fileno()
            for fd in (so, se, res_r, up_r):
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            res_buf = up_buf = b""
            exited_at = passed_at = None
            while sel.get_map():
                now = time.monotonic()
                if self.killed.is_set():
                    interrupted = True
                    break
                if now >= deadline:
                    timed_out = not passed
                    break
                if exited_at is None and not _alive(self.proc.pid):
                    exited_at = now
                if exited_at is not None and now - exited_at > 1.0:
                    break  # pipes held open by something outside a namespace: stop waiting for them
                if passed_at is not None and now - passed_at > 2.0:
                    break
                for key, _ in sel.select(timeout=max(0.0, min(0.1, deadline - now))):
                    fd = key.fd
                    try:
                        data = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(fd)
                    elif fd in (so, se):
                        buf = out if fd == so else err
                        buf += data
                        del buf[: max(0, len(buf) - _TAIL)]
                        total_out += len(data)
                    elif fd == up_r:
                        up_buf = self._handshake(up_buf + data, down_w)
                    else:
                        *complete, res_buf = (res_buf + data).split(b"\n")
                        for raw in complete:
                            line = raw.decode("utf-8", "replace")
                            lines.append(line)
                            if line == self.token:
                                passed, passed_at = True, time.monotonic()
                if total_out > _OUTPUT_CAP:
                    over_output = True
                    break
            sel.close()
        except OSError as e:
            self.setup_error = self.setup_error or f"starting the sandbox: {e}"
        finally:
            self._cleanup()
        seconds = time.monotonic() - start
        return self._result(lines, passed, timed_out, over_output, interrupted, seconds, out, err)

    def _result(self, lines, passed, timed_out, over_output, interrupted, seconds, out, err) -> ExecResult:
        setup_error = self.setup_error
        errors = [ln[2:] for ln in lines if ln.startswith("E ")]
        fails = [ln[2:] for ln in lines if ln.startswith("F ")]
        st = next((ln.split()[1:] for ln in lines if ln.startswith("S ")), ["-", "-", "0", "0"])
        rc = None if st[0] == "-" else int(st[0])
        hit = self._limits_hit
        if st[2] == "1":
            hit.append("memory limit")
        judged = self.task.entry_point is not None
        if errors or setup_error:
            status, reason = "error", (errors[0] if errors else setup_error)
        elif passed:
            status, reason = "passed", "check returned"
        elif interrupted:
            status, reason = "interrupted", "the evaluation was interrupted"
        elif timed_out:
            status, reason = "timeout", f"no result within {self.lim.timeout:g} s"
        elif over_output:
            status, reason = "failed", f"more than {_OUTPUT_CAP >> 20} MiB of output"
        elif judged:
            status = "failed"
            reason = fails[0] if fails else "the judge wrote no result"
        elif rc is not None:
            status, reason = "exited", f"exit status {rc}"
        else:
            status, reason = "failed", "the program was killed before it exited"
        if hit and status != "passed":
            reason += " (" + ", ".join(dict.fromkeys(hit)) + " reached)"
        return ExecResult(
            status,
            rc,
            seconds,
            err.decode("utf-8", "replace"),
            out.decode("utf-8", "replace"),
            reason,
            self.level,
        )

    def _cleanup(self) -> None:
        """Kill everything the run started, reap it, remove its cgroups and directories."""
        import shutil

        proc = self.proc
        try:
            if proc is not None:
                if self.level != "weak" and _alive(proc.pid):
                    with contextlib.suppress(OSError):
                        proc.send_signal(signal.SIGTERM)  # the launcher kills its PID namespace's init
                    end = time.monotonic() + 3.0
                    while _alive(proc.pid) and time.monotonic() < end:
                        time.sleep(0.005)
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group is still reserved: leader unreaped
                if self.cgroup is not None:
                    self.cgroup.kill_all()
                proc.wait()
                for f in (proc.stdout, proc.stderr, proc.stdin):
                    with contextlib.suppress(OSError):
                        f.close()
                if self.init_pid is not None and self.level != "weak":
                    self._wait_gone(self.init_pid)
        finally:
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fds = []
            if self.cgroup is not None:
                self._limits_hit = self.cgroup.events()
                self.cgroup.remove()
            for d in (self.workdir, self.mount_dir):
                if d:
                    shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def _wait_gone(pid: int, wait: float = 5.0) -> None:
        """Until the namespace's init is gone or a zombie (its namespace is then empty)."""
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                return
            if state in ("Z", "X"):
                return
            time.sleep(0.005)


_CGROUPS_ENABLED = [True]


def _weak_parent() -> str:
    """Where the weak sandbox's directories go: the temp dir, unless (as root) the program's own uid
    could not reach it, then /tmp."""
    import tempfile

    base = tempfile.gettempdir()
    if os.geteuid() != 0:
        return base
    d = os.path.realpath(base)
    while True:
        if not os.stat(d).st_mode & 0o001:
            return "/tmp"
        if d == "/":
            return base
        d = os.path.dirname(d)


def _run_task(
    task: Task, lim: _Limits, level: str, python: str, stop: threading.Event | None = None
) -> ExecResult:
    """Run one task; setting ``stop`` (any thread) kills it and makes it return "interrupted" at once.

    A failure of the sandbox itself (status "error", never the program's doing) is retried once."""
    stop = stop or threading.Event()
    r = _Run(task, lim, level, python, stop).run()
    if r.status == "error" and not stop.is_set():
        r = _Run(task, lim, level, python, stop).run()
    return r


# ---------------------------------------------------------------- isolation choice

_PROBE = Task(
    program="import os\ndef f(x):\n    return x + os.getuid() * 0\n",
    tests="def check(c):\n    import math\n    assert c(41) + 1 == 42 == math.prod([2, 21])\n",
    entry_point="f",
)
_HOW_TO_ENABLE = (
    "enable user namespaces (sysctl -w kernel.unprivileged_userns_clone=1, user.max_user_namespaces=15000,"
    " or kernel.apparmor_restrict_unprivileged_userns=0){root}, or accept a weaker sandbox without "
    "namespaces with --weak-sandbox (isolation='weak')"
)
_LEVEL_CACHE: dict[str, tuple[str | None, str]] = {}
_LEVEL_LOCK = threading.Lock()


def _weak_pythons() -> list[str]:
    """Interpreters for the weak sandbox: one the unprivileged program uid can read when we are root."""
    import shutil

    cands = [_real_python()]
    if os.geteuid() == 0:
        cands += ["/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""]
    return [os.path.realpath(c) for c in dict.fromkeys(cands) if c and os.path.exists(c)]


def _probe(level: str) -> tuple[str | None, str]:
    """(interpreter, "") if ``level`` runs the probe task to a proven pass, else (None, what failed)."""
    with _LEVEL_LOCK:
        if level in _LEVEL_CACHE:
            return _LEVEL_CACHE[level]
        if level == "rootns" and os.geteuid() != 0:
            found: tuple[str | None, str] = (None, "namespaces without a user namespace need root")
        else:
            found = (None, "no interpreter")
            lim = _Limits(timeout=20.0, memory_mb=512, max_procs=16, disk_mb=8)
            for python in _weak_pythons() if level == "weak" else [_real_python()]:
                r = _run_task(_PROBE, lim, level, python)
                if r.status == "error" and r.reason.startswith("cgroup") and _CGROUPS_ENABLED[0]:
                    _CGROUPS_ENABLED[0] = False  # cgroups look writable but processes cannot join
                    r = _run_task(_PROBE, lim, level, python)
                if r.passed:
                    found = (python, "")
                    break
                said = [ln for ln in r.stderr_tail.splitlines() if ln.startswith("disel sandbox:")]
                found = (None, said[-1][len("disel sandbox: ") :] if said else r.reason)
        _LEVEL_CACHE[level] = found
        return found


def select_isolation(isolation: str = "auto", allow_weak: bool = False) -> tuple[str, str]:
    """``(level, interpreter)`` to run programs with; raises UserError when nothing safe enough works.

    ``auto`` tries ``userns`` then ``rootns`` (root only), then ``weak`` only if ``allow_weak``. The weak
    sandbox still runs each program in its own session and (when writable) cgroup, kills all of it at
    the end, applies the rlimits, keeps the pass proof (judge and token), gives each program its own
    temporary directory and, when the evaluator is root, its own unprivileged uid; it cannot hide the
    network, the file system or other processes from the program, and a program running as your own
    user can signal and damage what your user owns."""
    if isolation not in ("auto", *_LEVELS):
        raise _user_error(f"isolation {isolation!r} is unknown: use auto, userns, rootns or weak.")
    wanted = [isolation] if isolation != "auto" else ["userns", "rootns"] + (["weak"] if allow_weak else [])
    reasons = []
    for level in wanted:
        python, why = _probe(level)
        if python:
            return level, python
        reasons.append(f"{level}: {why}")
    raise _user_error(
        "Refusing to run generated code because the kernel offers no isolated sandbox here "
        f"({'; '.join(reasons)}): "
        + _HOW_TO_ENABLE.format(root="" if os.geteuid() == 0 else ", run the evaluation as root")
        + "."
    )


# ---------------------------------------------------------------- public API


def _limits(timeout: float, memory_mb: int, max_procs: int, disk_mb: int) -> _Limits:
    if not (timeout > 0 and memory_mb >= 64 and max_procs >= 1 and disk_mb >= 1):
        raise _user_error(
            f"sandbox limits timeout={timeout}, memory_mb={memory_mb}, max_procs={max_procs}, "
            f"disk_mb={disk_mb} are invalid: use timeout > 0, memory_mb >= 64, max_procs >= 1, disk_mb >= 1."
        )
    return _Limits(float(timeout), int(memory_mb), int(max_procs), int(disk_mb))


def run_program(
    source: str | Task,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_procs: int = 32,
    disk_mb: int = 64,
    isolation: str = "auto",
    allow_weak: bool = False,
) -> ExecResult:
    """Run one program (a string: unjudged) or :class:`Task` in the sandbox described above."""
    return run_programs(
        [source],
        workers=1,
        timeout=timeout,
        memory_mb=memory_mb,
        max_procs=max_procs,
        disk_mb=disk_mb,
        isolation=isolation,
        allow_weak=allow_weak,
    )[0]


def run_programs(
    sources: Sequence[str | Task],
    workers: int = 2,
    progress: bool = False,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_procs: int = 32,
    disk_mb: int = 64,
    isolation: str = "auto",
    allow_weak: bool = False,
) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time; results in input order.

    SIGTERM (when called from the main thread) and Ctrl-C stop everything: all programs are killed, their
    cgroups and directories removed, and :class:`SandboxInterrupted` is raised (no partial result)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    lim = _limits(timeout, memory_mb, max_procs, disk_mb)
    tasks = [s if isinstance(s, Task) else Task(program=s) for s in sources]
    results: list[ExecResult | None] = [None] * len(tasks)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = None
    if main_thread:

        def on_term(signum, frame):  # noqa: ARG001
            raise SandboxInterrupted(signum)

        previous = signal.signal(signal.SIGTERM, on_term)
    pool = None
    futs: dict = {}
    stop = threading.Event()
    try:
        level, python = select_isolation(isolation, allow_weak)
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="disel-sandbox")
        with tqdm(total=len(tasks), desc="sandbox", disable=not progress, leave=False) as bar:
            futs = {pool.submit(_run_task, t, lim, level, python, stop): i for i, t in enumerate(tasks)}
            pending = set(futs)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[futs[fut]] = fut.result()
                    bar.update(1)
    except BaseException as e:
        for fut in futs:
            fut.cancel()
        stop.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # each run kills and cleans up at once
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, SandboxInterrupted):
            raise SandboxInterrupted(signal.SIGINT) from e
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    pool.shutdown(wait=True)
    errors = [r for r in results if r is not None and r.status == "error"]
    if errors:
        raise SandboxError(f"the sandbox failed on {len(errors)} program(s): {errors[0].reason}")
    return [r for r in results if r is not None]
