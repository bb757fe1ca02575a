"""Run untrusted Python (model-written code and its tests) in a confined child process.

Layers, each applied when the kernel allows it and reported in `SandboxResult.isolation`:

- a fresh interpreter (`python -I -S`: the standard library only, no user paths, no inherited environment
  variables) in a fresh temporary working directory that is deleted afterwards (HOME and TMPDIR point into it);
- resource limits on the program: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), size of any file
  written (RLIMIT_FSIZE), processes (RLIMIT_NPROC), open files, no core dumps;
- a wall-clock timeout, after which the whole process tree is killed;
- Linux namespaces: no network (a new, empty network namespace: no TCP or UDP, not even loopback, and no
  abstract Unix sockets, which belong to the network namespace), a private PID namespace (every process the
  program starts dies with it, even one that left the process group), and a mount namespace whose root is a fresh,
  read-only file system holding only what the program needs ("private-fs"): the Python installation and the system
  libraries (read-only), a few device files (null, zero, random, urandom), and its working directory (the only
  writable place). Nothing else of the machine is there: no home folders, no /tmp, no /run, /proc or /sys, and so
  no host Unix sockets (Docker, D-Bus, X11) to connect to and no files to read. Where building that root fails, the
  whole file system is made read-only except the working directory instead ("readonly-fs").
- As root with a private root, the program runs as the unprivileged user ``nobody`` ("unprivileged"): the kernel
  enforces RLIMIT_NPROC only for users without privileges, so this is what stops a fork bomb, and it cannot write
  where only root may.

Without root the namespaces are created inside a new user namespace; where the kernel refuses that too (some
hardened distributions), the program runs without them and `isolation` says so: it then has the resource limits,
the timeout and the fresh working directory, but can reach the network and read (and write) whatever the user can.
This file imports only the standard library because it is also the launcher run inside the child
(`python -I -S sandbox.py CONFIG`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

__all__ = ["Limits", "SandboxResult", "run_python"]

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (unified syscall table since Linux 5.12)
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = 155 if os.uname().machine == "x86_64" else 41  # aarch64: 41
_PR_SET_PDEATHSIG = 1
_NOBODY = 65534
# Read-only in the private root besides the Python installation: the system libraries Python and its extension
# modules link against (and the loader's cache), and harmless device files.
_SYSTEM_PATHS = ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_OUTPUT_CAP = 64 * 1024  # bytes kept of each of stdout and stderr; the rest is read and dropped


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run.

    `max_processes` is RLIMIT_NPROC, which counts every process of the user on the machine, so a small value
    forbids the program to fork at all (the default: tests never need to).
    """

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20
    max_processes: int = 1
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_bytes", "file_bytes", "open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_processes < 0:
            raise ValueError(f"Limits.max_processes must be >= 0, got {self.max_processes!r}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of `run_python`.

    status: "ok" (exit code 0), "error" (non-zero exit), "timeout" (wall clock), "cpu_limit" (RLIMIT_CPU),
    "killed" (another signal, e.g. SIGKILL when memory ran out). ``signal`` follows the shells' convention: an exit
    code above 128 is read as death by signal ``code - 128``.
    """

    status: str
    returncode: int | None
    signal: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(source: str, limits: Limits = Limits(), isolate: bool = True) -> SandboxResult:
    """Execute `source` as a Python program in a confined child process; never raises for what it does.

    `isolate=False` skips the namespaces (the other layers stay), for machines where they misbehave.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    root = tempfile.mkdtemp(prefix="softmask-sandbox-")
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        os.mkdir(os.path.join(root, "jail"))  # mount point of the private root
        program = os.path.join(root, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(root, 0o755)
        os.chmod(program, 0o644)
        if os.getuid() == 0:
            os.chown(workdir, _NOBODY, _NOBODY)
        return _launch(program, workdir, limits, isolate)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _readable_paths(python: str) -> list[str]:
    """What the private root shows read-only: the interpreter, its installation and the system libraries."""
    installation = {sys.base_prefix, os.path.dirname(python), sysconfig.get_paths()["stdlib"]}
    return sorted(p for p in (*installation, *_SYSTEM_PATHS) if os.path.lexists(p))


def _launch(program: str, workdir: str, limits: Limits, isolate: bool) -> SandboxResult:
    python = os.path.realpath(sys.executable)  # -I -S: the installation's own interpreter, not a venv's link
    config = {
        "python": python,
        "readable": _readable_paths(python),
        "program": program,
        "workdir": workdir,
        "limits": dataclasses.asdict(limits),
        "isolate": isolate,
    }
    report_r, report_w = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config), str(report_w)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=env,
        pass_fds=(report_w,),
        start_new_session=True,
    )
    os.close(report_w)
    stdout, stderr, timed_out = _drain(proc, start + limits.wall_s)
    if timed_out:
        _kill_tree(proc)
    proc.wait()
    wall = time.monotonic() - start
    with os.fdopen(report_r, "rb") as f:
        report = f.read().decode(errors="replace")
    try:
        isolation = tuple(json.loads(report)) if report else ()
    except ValueError:  # the launcher was killed while writing it
        isolation = ()
    rc = proc.returncode
    sig = rc - 128 if rc is not None and rc > 128 else (-rc if rc is not None and rc < 0 else None)
    if timed_out:
        status = "timeout"
    elif rc == 0:
        status = "ok"
    elif sig == signal.SIGXCPU:
        status = "cpu_limit"
    elif sig is not None:
        status = "killed"
    else:
        status = "error"
    return SandboxResult(
        status=status,
        returncode=rc,
        signal=sig,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        wall_s=wall,
        isolation=isolation,
    )


def _drain(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read both pipes until EOF or the deadline, keeping at most _OUTPUT_CAP bytes of each."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as sel:
        for stream in kept:
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), True
            for key, _ in sel.select(timeout=remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = kept[key.fileobj]
                buf += chunk[: max(0, _OUTPUT_CAP - len(buf))]
    for stream in kept:
        stream.close()
    # Pipes closed: the launcher is exiting; give it the rest of the budget to be reaped.
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), True
    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), False


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group; the parent-death signal and the PID namespace take the rest."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


# ---------------------------------------------------------------------------------------------------------
# The launcher: runs in the child as `python -I -S sandbox.py CONFIG REPORT_FD`.
# Process tree: launcher -> init (PID 1 of the new PID namespace, reaps) -> program (limits, then exec).
# ---------------------------------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_namespaces(libc: ctypes.CDLL, config: dict) -> list[str]:
    """Unshare network, PID and mount namespaces (inside a user namespace when not root), then build the private
    root (or, failing that, make / read-only)."""
    workdir = config["workdir"]
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID
    if uid != 0:
        flags |= _CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if uid != 0:
        # Map our own ids so that files we create keep a valid owner inside the namespace.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    layers = ["network", "pid"]
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    try:
        _private_root(libc, config)
        return [*layers, "private-fs"]
    except OSError as e:
        print(f"sandbox: no private file system view ({e}); making the machine's read-only", file=sys.stderr)
    try:
        wd = workdir.encode()
        _check(libc.mount(wd, wd, None, _MS_BIND | _MS_REC, None), "bind mount of the working directory")
        _mount_setattr(libc, b"/", set_rdonly=True)
        _mount_setattr(libc, wd, set_rdonly=False)
        layers.append("readonly-fs")
    except OSError as e:
        print(f"sandbox: file system left writable ({e})", file=sys.stderr)
    return layers


def _private_root(libc: ctypes.CDLL, config: dict) -> None:
    """Make a fresh tmpfs the root, holding only the readable paths, the devices, the program and the working
    directory, each at its own path; everything but the working directory read-only."""
    jail = os.path.join(os.path.dirname(config["workdir"]), "jail")
    _check(libc.mount(b"tmpfs", jail.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=0755"), "tmpfs")

    def bind(source: str, writable: bool = False) -> None:
        target = jail + source
        if os.path.islink(source):  # e.g. /lib -> usr/lib: the same link, and its target bound
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(source), target)
            return bind(os.path.realpath(source))
        if os.path.lexists(target):
            return None
        if os.path.isdir(source):
            os.makedirs(target)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        _check(libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None), f"bind {source}")
        _mount_setattr(libc, target.encode(), set_rdonly=not writable)
        return None

    for path in config["readable"]:
        bind(path)
    for device in _DEVICES:
        if os.path.exists(device):
            bind(device, writable=True)  # writes to null and friends go nowhere
    bind(config["program"])
    bind(config["workdir"], writable=True)
    _mount_setattr(libc, jail.encode(), set_rdonly=True, recursive=False)
    os.chdir(jail)
    _check(libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # the old root ends up stacked on top
    _check(libc.umount2(b".", _MNT_DETACH), "detach the machine's root")
    os.chdir("/")


def _mount_setattr(libc: ctypes.CDLL, path: bytes, set_rdonly: bool, recursive: bool = True) -> None:
    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    attr = MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0) if set_rdonly else MountAttr(0, _MOUNT_ATTR_RDONLY, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    rc = libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path, flags, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(rc, f"mount_setattr {path.decode()}")


def _apply_limits(limits: dict) -> None:
    def cap(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_AS, limits["memory_bytes"])
    # Soft limit sends SIGXCPU; the hard limit one second later is a SIGKILL nobody can catch.
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = limits["cpu_s"] if cpu_hard == resource.RLIM_INFINITY else min(limits["cpu_s"], cpu_hard)
    hard = soft + 1 if cpu_hard == resource.RLIM_INFINITY else min(soft + 1, cpu_hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    cap(resource.RLIMIT_FSIZE, limits["file_bytes"])
    cap(resource.RLIMIT_NPROC, limits["max_processes"])
    cap(resource.RLIMIT_NOFILE, limits["open_files"])
    cap(resource.RLIMIT_CORE, 0)


def _wait_status_code(status: int) -> int:
    """Exit code of a child, or 128 + signal number when a signal ended it (as shells report it)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _launcher(config: dict, report_fd: int) -> int:
    libc = _libc()
    layers: list[str] = []
    if config["isolate"]:
        try:
            layers = _enter_namespaces(libc, config)
        except OSError as e:
            print(f"sandbox: running without namespaces ({e})", file=sys.stderr)
    # Only inside the private root is the interpreter surely reachable for nobody (a home folder may be closed).
    drop_root = os.getuid() == 0 and "private-fs" in layers
    layers = ["rlimits", "tmpdir", *layers, *(["unprivileged"] if drop_root else [])]
    os.write(report_fd, json.dumps(layers).encode())
    os.close(report_fd)

    init = os.fork()
    if init == 0:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        program = os.fork()
        if program == 0:
            try:
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                _apply_limits(config["limits"])
                if drop_root:  # RLIMIT_NPROC binds only users without privileges
                    os.setgroups([])
                    os.setgid(_NOBODY)
                    os.setuid(_NOBODY)
                os.chdir(config["workdir"])
                os.execv(config["python"], [config["python"], "-I", "-S", config["program"]])
            except BaseException as e:
                print(f"sandbox: could not start the program: {e!r}", file=sys.stderr)
            os._exit(127)
        # As PID 1 this process also reaps orphans; when the program ends, so does the namespace.
        while True:
            pid, status = os.wait()
            if pid == program:
                os._exit(_wait_status_code(status))
    _, status = os.waitpid(init, 0)
    return _wait_status_code(status)


if __name__ == "__main__":
    sys.exit(_launcher(json.loads(sys.argv[1]), int(sys.argv[2])))
