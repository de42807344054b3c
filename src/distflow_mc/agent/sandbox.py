"""Run untrusted Python (a model's code) in a subprocess with CPU-time, memory, file-size,
process and wall-clock limits and no network.

The child confines itself before it reads the code: its own network namespace (no
interfaces) when the kernel lets it make one; resource limits; the user nobody when it
starts as root (root ignores the process limit) and the interpreter is readable by all;
and an audit hook that refuses sockets, process creation, ctypes, and changes to files
outside its scratch directory (the only process guard when it stays root).
The wall clock is the parent's: past it the whole process
group is killed. Output goes to size-capped files, so a flood fills no memory here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512  # address space
    output_bytes: int = 8192  # kept of stdout and of stderr each
    file_mb: int = 16  # largest file the code may write (its output included)
    processes: int = 0  # processes the code may start (fork bombs end here)


@dataclass
class Outcome:
    stdout: str
    stderr: str
    exit_code: int | None  # None: killed at the wall clock
    timed_out: bool
    network_namespace: bool  # the kernel gave it one (else only the audit hook guards)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


# Runs in the child as `python -I -c BOOT limits.json`, before any of the code.
BOOT = r"""
import ctypes, json, os, resource, signal, sys
lim = json.load(open(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
# no interfaces: as root, or in a user namespace; the parent learns which from a file
isolated = libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
open("netns", "w").write(str(int(isolated)))
mb = 1 << 20
for name, value in (
    ("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)),
    ("RLIMIT_AS", (lim["memory_mb"] * mb,) * 2),
    ("RLIMIT_FSIZE", (lim["file_mb"] * mb,) * 2),
    ("RLIMIT_NOFILE", (64, 64)),
    ("RLIMIT_CORE", (0, 0)),
):
    resource.setrlimit(getattr(resource, name), value)
if lim["uid"] is not None:  # root ignores the process limit: become nobody
    os.setgroups([])
    os.setgid(lim["uid"])
    os.setuid(lim["uid"])
resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"],) * 2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails, not the process
DENIED = ("socket.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
          "os.spawn", "subprocess.Popen", "ctypes.", "os.kill", "os.killpg", "pty.")
CHANGES = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
           "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.")
HERE = os.getcwd() + os.sep
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path):
    return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(
        os.fsdecode(path)).startswith(HERE)
def audit(event, args):
    if event.startswith(DENIED) or event == "import" and args[0] in ("_ctypes",
            "_posixsubprocess", "_socket"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    writes = event == "open" and (
        isinstance(args[1], str) and any(c in args[1] for c in "wax+")
        or isinstance(args[2], int) and args[2] & WRITE)
    if (writes or event.startswith(CHANGES)) and not inside(args[0]):
        raise PermissionError(f"sandbox: {event} outside its directory is not allowed")
del ctypes, libc
source = open("main.py").read()
sys.argv = ["main.py"]
sys.addaudithook(audit)
exec(compile(source, "main.py", "exec"), {"__name__": "__main__"})
"""


def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run `code` confined; never raises for anything the code does."""
    work = Path(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        (work / "main.py").write_text(code)
        uid = NOBODY if os.getuid() == 0 and _reachable_by_all() else None
        (work / "limits.json").write_text(json.dumps({**asdict(limits), "uid": uid}))
        if uid is not None:  # its scratch directory is its own
            for path in (work, *work.iterdir()):
                os.chown(path, uid, uid)
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, str(work / "limits.json")],
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work)},
                start_new_session=True,  # its own process group: killed as one
            )
            try:
                code_ = proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                code_, timed_out = None, True
            _kill_group(proc.pid)
            proc.wait()
        return Outcome(
            _head(work / "stdout", limits.output_bytes),
            _head(work / "stderr", limits.output_bytes),
            code_,
            timed_out,
            (work / "netns").is_file() and (work / "netns").read_text() == "1",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reachable_by_all() -> bool:
    """Whether another user can run this interpreter and import from its libraries (not
    so when Python lives under a private home); only then can the child become nobody."""
    for root in {Path(sys.base_prefix), Path(sys.prefix)}:
        for path in (root, *root.parents):
            mode = path.stat().st_mode
            if not mode & stat.S_IXOTH or (path == root and not mode & stat.S_IROTH):
                return False
    return True


def _kill_group(pid: int) -> None:
    """Whatever is left of the code's process group (it may have outlived its leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _head(path: Path, limit: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n... (output cut)" if len(data) > limit else "")
