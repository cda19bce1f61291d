"""Running programs a model wrote, each in its own confined process, for execution-based scores.

Each program runs as `python -I` in a fresh temporary folder (its working and home folder),
with no standard input, a minimal environment, and limits that turn every way a program can go
wrong into one failed sample rather than a failed evaluation:

- wall-clock time (`time_s`; the whole process group is killed) and CPU time (RLIMIT_CPU);
- memory (RLIMIT_AS): a 10 GB allocation is a MemoryError;
- output (RLIMIT_FSIZE on the file its stdout and stderr go to): megabytes of printing end it;
- with root privileges (as in CI and containers), also: its own network namespace with no
  interfaces (no network), an unprivileged user id of its own (it cannot read or write the
  user's files that are not world-readable / world-writable, nor signal other processes), a cap
  on its processes (RLIMIT_NPROC, so a fork loop stops), and every process left under that user
  id killed afterwards.

What it does not stop: a program can still read world-readable files (the Python standard
library must be readable), use CPU for up to its time limit, and, without root, reach the
network and the user's files. It is a guard against model mistakes, not a security boundary
against a determined attacker; run untrusted evaluations in a container or VM.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = 61000  # + the slot: an id no account uses, so its processes are the sandbox's


@dataclass(frozen=True)
class Limits:
    time_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    output_bytes: int = 1 << 20  # stdout + stderr, and any file it writes
    processes: int = 16  # with root: processes and threads under the sandbox's user id


@dataclass(frozen=True)
class Outcome:
    passed: bool  # exit status 0 within the limits
    status: str  # passed, failed, timeout, killed
    output: str  # the last lines it printed (stdout and stderr)


def world_runnable(path: str) -> bool:
    """Whether a user with no rights of its own can run the file: every folder above it lets
    others through, and the file lets others run it."""
    p = Path(os.path.realpath(path))
    return all(d.stat().st_mode & 0o001 for d in p.parents) and bool(p.stat().st_mode & 0o001)


@functools.cache  # the same answer for every program of a run
def interpreter() -> str | None:
    """The Python a confined program runs with: this one, or the system's when this one lies
    in a folder other users cannot enter (a pyenv under /root); None when neither can run."""
    for exe in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(exe) and world_runnable(exe):
            return exe
    return None


def confined() -> bool:
    """Whether programs get their own user id and network namespace: root privileges on Linux,
    and a Python other users can run."""
    return sys.platform == "linux" and os.geteuid() == 0 and interpreter() is not None


_slots = itertools.count()  # a user id a run, so concurrent runs never kill each other's processes


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program in a sandbox; the outcome, never an exception for what
    the program itself does."""
    slot = next(_slots) % 1000
    uid = SANDBOX_UID + slot if confined() else None
    work = Path(tempfile.mkdtemp(prefix="gptkit-sandbox-"))
    try:
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chmod(work, 0o700)
        log_path = work / "output.log"
        with open(log_path, "wb") as log:
            if uid is not None:
                os.chown(log_path, uid, uid)
            status = _run(program, work, log, limits, uid)
        text = log_path.read_bytes()[-4000:].decode("utf-8", "replace")
        return Outcome(status == "passed", status, "\n".join(text.splitlines()[-20:]))
    finally:
        if uid is not None:
            _kill_user(uid)
        shutil.rmtree(work, ignore_errors=True)


def _run(program: Path, work: Path, log: object, limits: Limits, uid: int | None) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    # A small launcher applies the limits in the child and then becomes the program (exec): no
    # preexec_fn, which is unsafe in a process with threads.
    exe = (interpreter() if uid is not None else None) or sys.executable
    who = str(uid if uid is not None else -1)
    args = [str(limits.memory_mb), str(int(limits.time_s) + 1), str(limits.output_bytes),
            str(limits.processes), who, exe, str(program)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", LAUNCHER, *args],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killed as one
    )
    try:
        code = proc.wait(timeout=limits.time_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        return "timeout"
    _kill_group(proc.pid)  # children it left behind
    if code == 0:
        return "passed"
    return "killed" if code < 0 else "failed"


# Run in the child as `python -I -c LAUNCHER mem_mb cpu_s fsize nproc uid python program`: the
# limits, then (uid >= 0, as root) a network namespace of its own and another user, then exec.
LAUNCHER = """
import ctypes, os, resource, sys
mem, cpu, fsize, nproc, uid, exe, program = sys.argv[1:]
mem, cpu, fsize, nproc, uid = int(mem) << 20, int(cpu), int(fsize), int(nproc), int(uid)
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if uid >= 0:
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        sys.exit("sandbox: could not make a network namespace")
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execv(exe, [exe, "-I", "-B", program])
"""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_user(uid: int) -> None:
    """Every process of the sandbox's user id (a fork that left its group too), until none is."""
    for _ in range(50):
        pids = [pid for pid in _pids() if _uid_of(pid) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
