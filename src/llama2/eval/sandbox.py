"""Run untrusted Python programs (model-written code) in a sandboxed subprocess.

    result = run_program("print(1 + 1)", Limits(cpu_s=2))      # SandboxResult(status="passed", ...)
    results = run_programs(sources, Limits(cpu_s=5), workers=4)  # in order; a tqdm bar unless progress=False

**Statuses.** `passed` (exit code 0), `failed` (any other exit: an exception, a failed assert, a blocked
operation), `timeout` (the CPU or wall-clock limit), `memory` (a MemoryError under the address-space limit),
`error` (the sandbox itself could not be set up; the program did not run).

**What is enforced, and how.** Each program gets a fresh temporary directory as its cwd (deleted after), runs as
`python -I -S -B` (no site-packages, no PYTHON* variables, no user site) with a scrubbed environment (PATH, a
UTF-8 locale, HOME and TMPDIR pointing at its directory; nothing else of ours), stdin from /dev/null, in a new
session (process group). Output goes to unlinked files, so a program printing without end cannot fill memory.
Inside the child, before the program runs:

- *Namespaces* (`unshare`; as root directly, otherwise through a user namespace when the kernel allows one):
  a new network namespace (no interfaces but a down loopback: nothing can be reached), a new mount namespace in
  which /tmp, /var/tmp and /dev/shm are covered by empty read-only tmpfs mounts (the program's own directory is
  bound back in place) and a new PID namespace with its own /proc, whose init only waits: when the program ends
  or is killed, the kernel kills everything left in the namespace.
- *Limits* (setrlimit): RLIMIT_CPU (SIGXCPU at the limit, SIGKILL a second later), RLIMIT_AS (memory),
  RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE (largest file), RLIMIT_NOFILE, RLIMIT_CORE 0; no_new_privs.
- *Privileges*: as root, the program runs as a dedicated unprivileged uid/gid with no supplementary groups (one
  uid per concurrent sandbox, held by a lock file across processes), so RLIMIT_NPROC binds, the root-owned
  filesystem is read-only to it, and every process left with that uid is killed at the end. In a user
  namespace, all capabilities are dropped before the program runs.
- *Guard* (Python level, bypassable by determined code, so a second line only): os.fork / exec / spawn /
  system / kill, subprocess's fork_exec and socket creation raise PermissionError; opening for writing,
  creating, removing or renaming paths outside the program's directory raise PermissionError.
- *Wall clock*: the parent waits `wall_s`, then kills the process group (and, as root, the uid's processes).

Without root and without user namespaces only the limits, the process group and the guard remain (`isolation()`
reports what this machine offers).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

from ..errors import Llama2Error

STATUSES = ("passed", "failed", "timeout", "memory", "error")
SETUP_FAILED = 125  # the runner's exit code when the sandbox could not be set up
MASKED = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable directories hidden behind read-only tmpfs mounts
UID_SLOTS = 1024  # dedicated uids available to concurrent sandboxes (as root)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program. wall_s: default 2 x cpu_s + 2 (interpreter start-up on a busy machine)."""

    cpu_s: float = 10.0
    wall_s: float | None = None
    memory_mb: int = 1024
    nproc: int = 32
    fsize_mb: int = 16
    nofile: int = 64
    stderr_chars: int = 2000
    stdout_chars: int = 2000

    def __post_init__(self) -> None:
        if not self.cpu_s > 0 or (self.wall_s is not None and not self.wall_s > 0):
            raise Llama2Error(f"sandbox time limits must be positive, got cpu_s={self.cpu_s}, wall_s={self.wall_s}")
        if self.memory_mb < 32 or self.nproc < 1 or self.fsize_mb < 1 or self.nofile < 16:
            raise Llama2Error("sandbox limits too small: memory_mb >= 32, nproc >= 1, fsize_mb >= 1, nofile >= 16")

    @property
    def wall(self) -> float:
        return self.wall_s if self.wall_s is not None else 2 * self.cpu_s + 2


@dataclass
class SandboxResult:
    """How one program ended: status (STATUSES), exit code (negative: killed by that signal), truncated output."""

    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    uid: int | None = None  # the uid it ran as (when root)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def reason(self) -> str:
        """One line: the last line of stderr, or what stopped the program."""
        if self.status == "timeout":
            return "timed out"
        if self.status == "memory":
            return "out of memory"
        lines = [x for x in self.stderr.strip().splitlines() if x.strip()]
        if lines:
            return lines[-1].strip()
        return f"exit code {self.returncode}"


# -- the runner: runs in the child interpreter (stdlib only), sets the sandbox up, then runs program.py --------

RUNNER = r'''
import ctypes, json, os, resource, signal, sys, traceback, types
cfg = json.loads(sys.argv[1]); wd = cfg["workdir"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
NEWNS, NEWNET, NEWPID, NEWUSER = 0x20000, 0x40000000, 0x20000000, 0x10000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18

def die(msg):
    sys.stderr.write("sandbox: " + msg + "\n"); sys.stderr.flush(); os._exit(125)

def mount(src, target, fstype, flags, data=None):
    e = lambda s: s.encode() if s is not None else None
    if libc.mount(e(src), e(target), e(fstype), flags, e(data)) != 0:
        n = ctypes.get_errno(); raise OSError(n, os.strerror(n), target)

def write(path, text):
    with open(path, "w") as f: f.write(text)

root = os.geteuid() == 0
uid, gid = os.getuid(), os.getgid()
ns = userns = False
if cfg["namespaces"]:
    if root:
        ns = libc.unshare(NEWNS | NEWNET | NEWPID) == 0
    else:
        ns = userns = libc.unshare(NEWUSER | NEWNS | NEWNET | NEWPID) == 0
        if ns:
            try:
                write("/proc/self/setgroups", "deny"); write("/proc/self/uid_map", "%d %d 1" % (uid, uid))
                write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
            except OSError:
                pass

def drop_caps():
    class Hdr(ctypes.Structure): _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure): _fields_ = [("eff", ctypes.c_uint32), ("perm", ctypes.c_uint32), ("inh", ctypes.c_uint32)]
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    data = (Data * 2)()
    if libc.capset(ctypes.byref(Hdr(0x20080522, 0)), data) != 0:
        die("cannot drop capabilities")

def blocked_ancestor(path):
    """The top-most ancestor of path an unprivileged user cannot enter (e.g. /root, mode 700), or None."""
    parts = os.path.realpath(path).split("/")[1:]
    for i in range(1, len(parts)):
        a = "/" + "/".join(parts[:i])
        st = os.stat(a)
        if not st.st_mode & 0o001:
            return a
    return None

def setup_mounts():
    mount(None, "/", None, REC | PRIVATE)
    keep = {}  # paths to bind back inside a covered directory: path -> O_PATH descriptor of the real one
    covered = []
    for d in cfg["masked"]:
        if os.path.isdir(d) and not os.path.islink(d):
            covered.append(d)
    for p in cfg["readable"]:  # the interpreter's files, under a directory others cannot enter
        p = os.path.realpath(p)
        a = blocked_ancestor(p) if os.path.isdir(p) and cfg["uid"] is not None else None
        if a is not None:
            covered.append(a)
            keep[p] = os.open(p, os.O_PATH)
    keep[wd] = os.open(".", os.O_PATH)
    for d in covered:
        mount("tmpfs", d, "tmpfs", NOSUID | NODEV, "size=64k,mode=755")
        for p, fd in keep.items():
            if p.startswith(d.rstrip("/") + "/"):
                os.makedirs(p, exist_ok=True)
                mount("/proc/self/fd/%d" % fd, p, None, BIND | REC)
    for d in covered:
        mount(None, d, None, REMOUNT | RDONLY | NOSUID | NODEV)
    for fd in keep.values():
        os.close(fd)
    os.chdir(wd)

def limit(res, soft, hard=None):
    try:
        resource.setrlimit(res, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass

def run_program():
    """In the process that becomes the program: limits, privileges, guard, then program.py; never returns."""
    status = 1
    try:
        cpu = cfg["cpu"]
        limit(resource.RLIMIT_CPU, cpu, cpu + 1)
        limit(resource.RLIMIT_AS, cfg["memory"])
        limit(resource.RLIMIT_FSIZE, cfg["fsize"])
        limit(resource.RLIMIT_NOFILE, cfg["nofile"])
        limit(resource.RLIMIT_CORE, 0)
        limit(resource.RLIMIT_NPROC, cfg["nproc"])
        if cfg["uid"] is not None:
            try:
                os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
            except OSError as e:
                die("cannot drop privileges to uid %s: %s" % (cfg["uid"], e))
            if os.getuid() == 0 or os.geteuid() == 0:
                die("still root after setuid")
        elif userns:
            drop_caps()
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        with open("program.py", encoding="utf-8") as f:
            code = compile(f.read(), os.path.join(wd, "program.py"), "exec")
        if cfg["guard"]:
            guard()
        main = types.ModuleType("__main__")
        main.__file__ = os.path.join(wd, "program.py")
        sys.modules["__main__"] = main
        sys.argv = ["program.py"]
        exec(code, main.__dict__)
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            sys.stderr.write(str(e.code) + "\n"); status = 1
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            sys.stderr.write("MemoryError\n" if isinstance(sys.exc_info()[1], MemoryError) else "error\n")
        status = 1
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status & 0xFF)

def guard():
    import builtins, io, posix, _posixsubprocess
    real = os.path.realpath(wd)
    def deny(name):
        def blocked(*a, **k):
            raise PermissionError("sandbox: %s is not allowed" % name)
        return blocked
    for mod in (os, posix):
        for n in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                  "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                  "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg"):
            if hasattr(mod, n):
                setattr(mod, n, deny("os." + n))
    _posixsubprocess.fork_exec = deny("starting a process")
    import socket, _socket
    class NoSocket(_socket.socket):
        def __init__(self, *a, **k):
            raise PermissionError("sandbox: network access is not allowed")
    _socket.socket = _socket.SocketType = NoSocket
    class NoSocket2(socket.socket):
        def __init__(self, *a, **k):
            raise PermissionError("sandbox: network access is not allowed")
    socket.socket = socket.SocketType = NoSocket2
    for n in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname"):
        setattr(socket, n, deny("socket." + n))
        if hasattr(_socket, n):
            setattr(_socket, n, deny("socket." + n))
    def inside(p):
        if isinstance(p, int):
            return True  # an already open descriptor
        p = os.fsdecode(p)
        if p in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            return True
        r = os.path.realpath(os.path.join(wd, p))
        return r == real or r.startswith(real + os.sep)
    def check(name, paths, kw):
        if kw.get("dir_fd") is not None or kw.get("src_dir_fd") is not None or kw.get("dst_dir_fd") is not None:
            raise PermissionError("sandbox: %s with dir_fd is not allowed" % name)
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                raise PermissionError("sandbox: %s outside the program's directory is not allowed: %s" % (name, p))
    real_open = builtins.open
    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            check("writing", [file], {})
        return real_open(file, mode, *a, **k)
    builtins.open = io.open = open_
    real_os_open = os.open
    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            check("writing", [path], k)
        return real_os_open(path, flags, *a, **k)
    os.open = posix.open = os_open
    def wrap(name, nargs):
        fn = getattr(os, name)
        def guarded(*a, **k):
            check("os." + name, a[:nargs], k)
            return fn(*a, **k)
        return guarded
    for name, nargs in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("rename", 2), ("replace", 2),
                        ("chmod", 1), ("chown", 1), ("lchown", 1), ("symlink", 2), ("link", 2), ("truncate", 1),
                        ("utime", 1), ("mkfifo", 1), ("mknod", 1), ("removedirs", 1), ("renames", 2)):
        if hasattr(os, name):
            g = wrap(name, nargs)
            setattr(os, name, g)
            if hasattr(posix, name):
                setattr(posix, name, g)

if ns:
    try:
        setup_mounts()
    except OSError as e:
        if root:
            die("cannot set up the mounts: %s" % e)
        os.chdir(wd)  # in a user namespace the kernel may refuse mounts: the other layers still hold
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init = os.fork()  # the first child is PID 1 of the new namespace
    if init == 0:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: the namespace dies with the runner
        try:
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)  # this namespace's processes only
        except OSError:
            pass
        prog = os.fork()
        if prog == 0:
            run_program()
        code = 1
        while True:  # reap everything; end when the program ends (the kernel then kills the rest)
            try:
                pid, st = os.wait()
            except ChildProcessError:
                break
            if pid == prog:
                code = os.waitstatus_to_exitcode(st)
                break
        os._exit(code if code >= 0 else 128 - code)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    _, st = os.waitpid(init, 0)
    code = os.waitstatus_to_exitcode(st)
    os._exit(code if code >= 0 else 128 - code)
else:
    if cfg["require_namespaces"]:
        die("namespaces (unshare) are not available here")
    if cfg["uid"] is not None and any(blocked_ancestor(p) for p in cfg["readable"]):
        die("the Python installation is not readable by an unprivileged user and mount namespaces are not "
            "available to make it so; install Python under a world-readable prefix")
    run_program()
'''


# -- dedicated uids (root only) ------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _uid_base() -> int:
    """The first of UID_SLOTS uids to run programs as: high in the range this process's user namespace maps."""
    top = 65534
    try:
        for line in Path("/proc/self/uid_map").read_text().splitlines():
            inside, _, count = (int(x) for x in line.split())
            top = max(top, inside + count - 1)
    except (OSError, ValueError):
        pass
    return 2_100_000_000 if top >= 2_100_000_000 + UID_SLOTS else max(1000, top - 2 * UID_SLOTS)


class _UidPool:
    """Hands out dedicated uids, each held by an flock so concurrent processes never share one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # uid -> lock fd

    def acquire(self) -> int:
        d = Path(tempfile.gettempdir()) / "llama2-sandbox-uids"
        d.mkdir(mode=0o700, exist_ok=True)
        base = _uid_base()
        with self._lock:
            for uid in range(base, base + UID_SLOTS):
                if uid in self._held:
                    continue
                fd = os.open(d / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                self._held[uid] = fd
                break
            else:
                raise Llama2Error(f"all {UID_SLOTS} sandbox uids are in use; run fewer sandboxes at once")
        kill_uid(uid)  # anything a crashed earlier run left
        return uid

    def release(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid)
        os.close(fd)


_POOL = _UidPool()


def uid_pids(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            out.append(int(entry.name))
    return out


def kill_uid(uid: int, tries: int = 50) -> bool:
    """SIGKILL every process of `uid` until none is left (RLIMIT_NPROC bounds how many can appear meanwhile)."""
    for _ in range(tries):
        pids = uid_pids(uid)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    return not uid_pids(uid)


# -- running ----------------------------------------------------------------------------------------------------

def _env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
            "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1"}


def _read_tail(f, limit: int) -> str:
    """The output, cut to `limit` characters (its start and its end kept)."""
    f.seek(0)
    data = f.read(4 * limit + 8192)
    text = data.decode("utf-8", "replace")
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + "\n...[truncated]...\n" + text[-half:]


def run_program(source: str, limits: Limits | None = None, *, guard: bool = True, namespaces: bool = True,
                files: dict[str, str] | None = None) -> SandboxResult:
    """Run `source` as program.py in a fresh sandbox (module docstring) and say how it ended. files: other files
    to place in its directory (name -> text). guard/namespaces=False switch those layers off (for tests)."""
    limits = limits or Limits()
    uid = _POOL.acquire() if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="llama2-sandbox-")
    proc = None
    start = time.monotonic()
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        for name, text in (files or {}).items():
            if "/" in name or name.startswith("."):
                raise Llama2Error(f"sandbox file names must be plain names, got {name!r}")
            Path(workdir, name).write_text(text, encoding="utf-8")
        if uid is not None:
            for p in [Path(workdir), *Path(workdir).iterdir()]:
                os.chown(p, uid, uid)
        os.chmod(workdir, 0o700)
        cfg = {"workdir": workdir, "uid": uid, "cpu": max(1, int(round(limits.cpu_s + 0.499))),
               "memory": limits.memory_mb << 20, "fsize": limits.fsize_mb << 20, "nofile": limits.nofile,
               "nproc": limits.nproc, "guard": guard, "namespaces": namespaces, "require_namespaces": False,
               "masked": list(MASKED), "readable": sorted({sys.base_prefix, sys.base_exec_prefix})}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", RUNNER, json.dumps(cfg)], cwd=workdir,
                                    env=_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            _kill_group(proc.pid)
            stdout, stderr = _read_tail(out, limits.stdout_chars), _read_tail(err, limits.stderr_chars)
        return SandboxResult(_status(rc, stderr, timed_out), rc, stdout, stderr, time.monotonic() - start, uid)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
        if uid is not None:
            kill_uid(uid)
            _POOL.release(uid)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(rc: int, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if rc == SETUP_FAILED and "sandbox: " in stderr:
        return "error"
    if rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return "timeout"  # the CPU limit (SIGXCPU, then SIGKILL at the hard limit)
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    if tail and tail[0].startswith("MemoryError"):
        return "memory"
    return "failed"


def run_programs(sources: Sequence[str], limits: Limits | None = None, *, workers: int | None = None,
                 progress: bool = True, desc: str = "running programs", guard: bool = True) -> list[SandboxResult]:
    """Run every source in its own sandbox, `workers` at a time (default: the CPU count); results in order."""
    if workers is not None and workers < 1:
        raise Llama2Error(f"workers must be at least 1, got {workers}")
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    results: list[SandboxResult | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=min(workers, max(1, len(sources)))) as pool, \
            tqdm(total=len(sources), desc=desc, unit="program", disable=not progress, dynamic_ncols=True) as bar:
        futures = {pool.submit(run_program, s, limits, guard=guard): i for i, s in enumerate(sources)}
        for fut in _as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results  # type: ignore[return-value]


def _as_completed(futures):
    return as_completed(futures)


@dataclass
class Isolation:
    """What this machine enforces (see the module docstring)."""

    root: bool
    namespaces: bool
    layers: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once which layers work here (runs one tiny program)."""
    probe = run_program("import os\nprint(os.getpid(), os.getuid())", Limits(cpu_s=5))
    pid = probe.stdout.split()[:1]
    ns = probe.passed and pid == ["2"]
    layers = ["rlimits", "process group", "guard"]
    if os.geteuid() == 0:
        layers.append("unprivileged uid")
    if ns:
        layers += ["network namespace", "mount namespace (read-only /tmp, /var/tmp, /dev/shm)", "pid namespace"]
    return Isolation(os.geteuid() == 0, ns, layers)


__all__ = ["Limits", "SandboxResult", "STATUSES", "run_program", "run_programs", "isolation", "kill_uid",
           "uid_pids"]
