"""Processes: the daemon lock, spawning the worker, identifying and stopping process groups.

* The lock is an ``flock`` on run/daemon.lock: the kernel drops it when its holder dies, so
  it is never stale, whatever is left in the file.
* The worker runs in its own session (so its own process group, out of reach of the
  terminal's Ctrl-C) and dies with the daemon: PR_SET_PDEATHSIG on Linux, and on every
  platform EOF on its stdin, which only the daemon holds open.
* A process is identified by (pid, start time): a reused pid is never signalled.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ftctl.events.types import ProcessId

from . import logs
from . import protocol as P


class _Psutil:
    """psutil, imported on first use: `ftctl status` and `replay` probe the daemon lock (fcntl)
    and usually never need it (psutil's import is a tenth of their start-up)."""

    def __getattr__(self, name: str):
        import psutil

        globals()["psutil"] = psutil
        return getattr(psutil, name)


psutil = _Psutil()


class LockHeld(Exception):
    def __init__(self, holder: str):
        self.holder = holder
        super().__init__(holder)


def acquire_lock(path: Path) -> int:
    """Take the daemon lock or raise LockHeld with what the file says about the holder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LockHeld(holder or "another ftctl daemon") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    os.close(fd)  # closing the descriptor drops the flock


def identity(pid: int) -> ProcessId | None:
    try:
        return ProcessId(pid=pid, started_at=psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def alive(pid_id: ProcessId) -> bool:
    """True only if that very process (same pid AND same start time) is still running."""
    if pid_id.started_at <= 0:
        return False  # identity unknown (old journal): never claim a stranger
    try:
        p = psutil.Process(pid_id.pid)
        return (
            abs(p.create_time() - pid_id.started_at) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stopped(pids: list[int]) -> list[int]:
    """Those of ``pids`` stopped by a signal (SIGSTOP, SIGTSTP): alive, computing nothing."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                out.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def stop_group(pid_id: ProcessId, grace_s: float = 5.0) -> bool:
    """SIGTERM then SIGKILL the whole process group led by ``pid_id``, if it is that process."""
    if not alive(pid_id):
        return False
    try:
        pgid = os.getpgid(pid_id.pid)
    except ProcessLookupError:
        return False
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    _, left = psutil.wait_procs(members, timeout=grace_s)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(left, timeout=5)
    return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Worker:
    """One worker process: its message pipe is its one channel (rank 0 of a group of one, as the
    supervisor sees it: ``poll``, ``send``, ``kill_group``, ``finish`` — group.Group speaks the same)."""

    proc: subprocess.Popen
    messages: object  # readable end of the message pipe (binary file)
    id: ProcessId
    log_path: Path | None  # None: a standby started before its workspace existed, until assigned
    log_offset: int = 0  # where this attempt's output starts in the (shared, appended) job log
    world_size: int = 1
    killed: bool = False
    buf: bytes = b""

    def poll(self, timeout: float) -> list[P.Heard]:
        """What the worker said within ``timeout`` seconds; ``closed`` once its pipe is at EOF (it exited,
        or died: the kernel closes the pipe with it)."""
        try:
            fd = self.messages.fileno()
        except ValueError:  # closed by finish()
            return []
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            self.messages.close()
            return [P.Heard(0, closed=True)]
        heard, self.buf = P.heard_lines(0, self.buf + chunk)
        return heard

    def who(self, rank: int) -> tuple[int, str]:
        return self.proc.pid, os.uname().nodename

    def stopped_ranks(self) -> list[int]:
        """[0] while the worker is stopped by a signal (SIGSTOP, SIGTSTP): alive, computing nothing."""
        return [0] if stopped([self.proc.pid]) else []

    def ended(self) -> bool:
        """Only groups end apart from their channels (mlx.launch); a worker's end is its pipe's EOF."""
        return False

    def finish(self) -> int:
        """The attempt is over: the worker's exit status, once nothing of its group is left."""
        try:
            code = self.proc.wait()
        finally:
            for f in (self.messages, self.proc.stdin):
                try:
                    f.close()
                except (OSError, AttributeError):
                    pass
        self.kill_group()  # nothing of the worker's group may outlive it
        return code

    def send(self, line: bytes) -> None:
        try:
            self.proc.stdin.write(line + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def assign(self, plan_json: bytes, log_path: Path) -> bool:
        """Give a standby worker its job: the plan on its stdin; its output moves to ``log_path``
        (the plan's log_path), this attempt's evidence starting at the log's current end.
        False if it is already dead (the caller starts a worker the usual way)."""
        if self.proc.poll() is not None or not alive(self.id):
            return False
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        logs.rotate(log_path)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self.log_offset = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        self.log_path = log_path
        try:
            self.proc.stdin.write(plan_json.rstrip(b"\n") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            return False
        return True

    def rss(self) -> int | None:
        """Resident memory of the worker's process, in bytes (None if it is gone)."""
        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def dismiss(self) -> None:
        """End it (a standby that is not needed): EOF, its group killed, reaped."""
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        self.kill_group()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.messages.close()
        except OSError:
            pass

    def kill_group(self) -> None:
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def spawn_worker(
    plan_json: bytes | None,
    log_path: Path | None,
    env: dict | None = None,
    label: tuple[str, str] = ("", ""),
) -> Worker:
    """Start ``python -m ftctl.adapters.worker``; the plan goes in on stdin's first line.
    ``label`` (job, workspace) only names the process, so `ps` and `ftctl doctor` can tell whose it is.
    ``plan_json`` None starts a standby worker: it imports, then waits for ``Worker.assign``; its
    ``log_path`` None sends what it says before then nowhere (its workspace does not exist yet)."""
    r, w = os.pipe()
    if log_path is None:
        log, offset = open(os.devnull, "wb"), 0
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        logs.rotate(log_path)  # a new attempt starts a fresh file once the old one passed the cap
        log = open(log_path, "ab", buffering=0)
        os.chmod(log_path, 0o600)
        offset = log.tell()
    cmd = [
        sys.executable,
        "-m",
        "ftctl.adapters.worker",
        "--message-fd",
        str(w),
        "--job",
        label[0],
        "--workspace",
        label[1],
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=log,
        pass_fds=(w,),
        start_new_session=True,
        preexec_fn=_die_with_parent,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    os.close(w)
    log.close()
    started = identity(proc.pid) or ProcessId(pid=proc.pid, started_at=time.time())
    if plan_json is not None:
        proc.stdin.write(plan_json.rstrip(b"\n") + b"\n")
        proc.stdin.flush()
    return Worker(
        proc=proc,
        messages=os.fdopen(r, "rb", buffering=0),
        id=started,
        log_path=log_path,
        log_offset=offset,
    )


def works_for(pid_id: ProcessId, workspace: Path) -> bool:
    """Does that live process (a worker, or a group's mlx.launch) work for ``workspace``? Its command
    line names the workspace it was started for (``--workspace``); one that names another is still
    this one's if it holds a file of this workspace open (the workspace was moved since it started:
    the kernel names an open file by where it is now). A copy of a workspace shares no open file
    with the original, so the copy never claims the original's workers. A command line that names
    no workspace proves nothing either way: it counts as this workspace's (as before labels)."""
    try:
        proc = psutil.Process(pid_id.pid)
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    named = next((b for a, b in zip(cmd, cmd[1:]) if a == "--workspace"), None)
    if named is None or named == str(workspace):
        return True
    try:
        files = proc.open_files()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(f.path.startswith(str(workspace) + os.sep) for f in files)


def workers_of(workspace: Path) -> list[tuple[ProcessId, int]]:
    """Every training worker (or standby) of ``workspace``, with its parent's pid."""
    out = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        cmd = proc.info["cmdline"] or []
        if "ftctl.adapters.worker" in cmd and str(workspace) in cmd:
            out.append(
                (
                    ProcessId(pid=proc.info["pid"], started_at=proc.info["create_time"]),
                    proc.info["ppid"],
                )
            )
    return out


def orphan_workers(workspace: Path) -> list[ProcessId]:
    """Workers of ``workspace`` whose daemon is gone (re-parented to init): what can be said without
    the daemon lock. Holding it, every worker not started by the holder is unsupervised."""
    return [w for w, ppid in workers_of(workspace) if ppid == 1]


def lock_holder(path: Path) -> str | None:
    """Who holds the daemon lock (what its file says), or None if nobody does: the kernel drops it
    when the holder dies, so this is never stale. Read-only: probing takes a shared lock for an
    instant on a read-only descriptor and neither creates nor rewrites the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # no daemon ever ran here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another ftctl daemon"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def tail(path: Path, limit: int = 16000, since: int = 0) -> str:
    """The last ``limit`` bytes of a log, never reaching back before offset ``since``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(since, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
