"""No sleep mid-run: a power assertion held while a job trains (``power.prevent_sleep``).

* macOS: ``caffeinate -i -s -w <daemon pid>`` (no idle sleep; no system sleep on AC power; it exits
  by itself when the daemon does). Not ``-d``: a lit display is what the Metal GPU watchdog
  (mlx #3267) competes with, so the display may — and should — sleep.
* Linux: ``systemd-inhibit --what=sleep:idle --mode=block -- cat`` where systemd-inhibit exists;
  the lock lasts while ``cat`` runs, and ``cat`` reads the daemon's pipe, so it ends at EOF, i.e.
  when the daemon releases it or dies (systemd-inhibit also gets PR_SET_PDEATHSIG).

Either is a child in the daemon's own process group (the service's cgroup), ignoring SIGINT (a
Ctrl-C is the daemon's to handle: the last checkpoint is still written under the assertion). Its
pid, start time and command are written to run/power.json for `ftctl status`; if it exits while it
should be held (no logind, no permission), a watcher thread writes why there.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import fs

STATE_FILE = "power.json"


def command(
    daemon_pid: int, why: str, platform: str = sys.platform, which: Callable = shutil.which
) -> list[str] | None:
    """The command that holds the assertion here, or None where there is none."""
    if platform == "darwin":
        exe = which("caffeinate")
        return [exe, "-i", "-s", "-w", str(daemon_pid)] if exe else None
    exe = which("systemd-inhibit")
    if exe:
        return [
            exe,
            "--what=sleep:idle",
            "--who=ftctl",
            f"--why={why}",
            "--mode=block",
            "--",
            "cat",
        ]
    return None


def _child() -> None:  # between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Held:
    proc: subprocess.Popen | None
    path: Path
    state: dict = field(default_factory=dict)
    released: bool = False


def hold(run_dir: Path, why: str, lost: Callable[[str], None] = lambda note: None) -> Held:
    """Start the assertion (never waits for it: a job's start is not slowed). Always returns a
    Held; ``state`` says what is held, or why nothing is; ``lost(note)`` is called (from a thread)
    if the assertion's process ends before it is released."""
    path = run_dir / STATE_FILE
    cmd = command(os.getpid(), why)
    if cmd is None:
        tool = "caffeinate" if sys.platform == "darwin" else "systemd-inhibit"
        h = Held(
            None,
            path,
            {
                "held": False,
                "why": why,
                "note": f"{tool} not found: the machine may sleep during the run",
            },
        )
        _write(h)
        return h
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_child,
        )
    except OSError as e:
        h = Held(
            None,
            path,
            {"held": False, "why": why, "note": f"cannot run {cmd[0]}: {e.strerror or e}"},
        )
        _write(h)
        return h
    started = _create_time(proc.pid)
    h = Held(
        proc,
        path,
        {
            "held": True,
            "why": why,
            "pid": proc.pid,
            "started_at": started,
            "command": cmd,
            "since": time.time(),
        },
    )
    _write(h)
    threading.Thread(target=_watch, args=(h, lost), name="power", daemon=True).start()
    return h


def _watch(h: Held, lost: Callable[[str], None]) -> None:
    err = h.proc.stderr.read() if h.proc.stderr else b""
    code = h.proc.wait()
    if not h.released:  # it ended on its own: say why where status reads it
        text = err.decode(errors="replace").strip().splitlines()
        h.state = {
            **h.state,
            "held": False,
            "note": f"{Path(h.state['command'][0]).name} exited {code}"
            + (f": {text[-1][:200]}" if text else "")
            + "; the machine may sleep during the run",
        }
        _write(h)
        lost(h.state["note"])


def release(h: Held | None) -> None:
    """End the assertion (EOF, then SIGTERM) and remove run/power.json."""
    if h is None:
        return
    h.released = True
    if h.proc is not None:
        try:
            h.proc.stdin.close()
        except OSError:
            pass
        if h.proc.poll() is None:
            h.proc.terminate()
        try:
            h.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait()
    h.path.unlink(missing_ok=True)


def read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write(h: Held) -> None:
    try:
        fs.write_durable(h.path, json.dumps(h.state).encode(), 0o600)
    except OSError:
        pass  # status only: never a reason to disturb a job


def _create_time(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return 0.0


def display_sleep_minutes(pmset_output: str) -> int | None:
    """`pmset -g`'s displaysleep (minutes; 0 = never), None if it does not say."""
    for line in pmset_output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "displaysleep":
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


def pmset() -> str | None:
    """`pmset -g` on macOS (None elsewhere or when it cannot run)."""
    if sys.platform != "darwin" or shutil.which("pmset") is None:
        return None
    try:
        return subprocess.run(["pmset", "-g"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
