"""The service files of `ftctl service` and the service manager's side: the systemd unit (Linux) and
the launchd property list (macOS) rendered from a Spec (pure functions), where they live, writing and
removing them, and asking systemctl / launchctl (only where they run). control/service.py decides.

Both files run `ftctl start` (not --until-idle) for one workspace, with absolute paths baked in,
restart it when it fails (never after a clean stop: `ftctl shutdown`, `systemctl stop`, `launchctl
bootout`) within a start limit that matches ftctl's own restart budget (restart.max_restarts within
restart.window_s), and stop it with SIGTERM — the daemon's graceful stop: the running job
checkpoints, then the daemon exits — giving it timeouts.stop_s and the notification drain before a
SIGKILL of everything left.

Each file carries a mark (a first-line comment in the unit, the ``FtctlWorkspace`` key in the
plist) so that ftctl never overwrites or removes a file it did not write.
"""

from __future__ import annotations

import hashlib
import math
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import fs

UNIT_MARK = "# Written by `ftctl service install`"
PLIST_MARK = "FtctlWorkspace"


@dataclass(frozen=True)
class Spec:
    home: str  # the workspace, absolute
    command: tuple[str, ...]  # the venv's ftctl, absolute (or its python -m ftctl.cli)
    max_restarts: int  # restart.max_restarts
    window_s: float  # restart.window_s
    backoff_s: float  # restart.backoff_s
    stop_timeout_s: float  # how long a stop may take before the SIGKILL
    system: bool = False  # a system unit / LaunchDaemon instead of the user's
    user: str | None = None  # --system: the account it runs as (the workspace's owner)


def name(home: str) -> str:
    """The unit name / launchd label suffix of a workspace: one service per workspace."""
    return "ftctl-" + hashlib.sha256(home.encode()).hexdigest()[:10]


def label(home: str) -> str:
    return "org.ftctl.daemon." + name(home).removeprefix("ftctl-")


def argv(spec: Spec) -> list[str]:
    return [*spec.command, "start", "--quiet", "--home", spec.home]


def _q(arg: str) -> str:
    """systemd's quoting of one ExecStart word (double quotes when needed; % and $ escaped)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    return (
        arg
        if arg and not any(c in arg for c in " \t\"'\\;")
        else '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    )


def systemd_unit(spec: Spec) -> str:
    burst = spec.max_restarts + 1  # the first start plus max_restarts restarts within the window
    lines = [
        f"{UNIT_MARK} for the workspace {spec.home}.",
        "# `ftctl service uninstall` removes it; ftctl never touches a unit without this line.",
        "[Unit]",
        f"Description=ftctl daemon (crash-proof MLX LoRA fine-tuning) for {spec.home}",
        *(["After=network-online.target", "Wants=network-online.target"] if spec.system else []),
        f"StartLimitIntervalSec={math.ceil(spec.window_s)}",
        f"StartLimitBurst={burst}",
        "",
        "[Service]",
        "Type=simple",
        *([f"User={spec.user}"] if spec.system and spec.user else []),
        f"WorkingDirectory={spec.home}",
        "ExecStart=" + " ".join(_q(a) for a in argv(spec)),
        "# restart after a crash or an internal error (exit 2, a signal), not after a clean stop (0) or a",
        "# user error a restart cannot fix (1: the workspace, ftctl.yaml, another daemon holding the lock)",
        "Restart=on-failure",
        "RestartPreventExitStatus=1",
        f"RestartSec={max(spec.backoff_s, 1.0):g}",
        "# SIGTERM to the daemon only: its graceful stop checkpoints the job and ends its worker; then",
        "# SIGKILL to whatever is left in the unit's control group, so no worker ever survives a stop",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={math.ceil(spec.stop_timeout_s)}",
        "UMask=0077",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if spec.system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(spec: Spec) -> bytes:
    logs = spec.home.rstrip("/") + "/logs"
    d = {
        "Label": label(spec.home),
        "ProgramArguments": argv(spec),
        "WorkingDirectory": spec.home,
        "RunAtLoad": True,
        # restarted when it exits non-zero or by a signal; a clean stop (exit 0) stays stopped
        "KeepAlive": {"SuccessfulExit": False},
        # at most max_restarts + 1 starts per restart.window_s, as the systemd unit's start limit
        "ThrottleInterval": max(10, math.ceil(spec.window_s / (spec.max_restarts + 1))),
        # `launchctl bootout` sends SIGTERM (the graceful stop), SIGKILL after this many seconds
        "ExitTimeOut": math.ceil(spec.stop_timeout_s),
        "StandardOutPath": f"{logs}/service.out.log",
        "StandardErrorPath": f"{logs}/service.err.log",
        "Umask": 0o077,
        PLIST_MARK: spec.home,
    }
    if spec.system and spec.user:
        d["UserName"] = spec.user
    return plistlib.dumps(d, sort_keys=True)


def is_ours(data: bytes, platform: str) -> bool:
    """Was this file written by `ftctl service install` (its mark is there)?"""
    if platform == "macos":
        try:
            return PLIST_MARK in plistlib.loads(data)
        except Exception:  # noqa: BLE001 - not a plist at all: not ours
            return False
    return data.startswith(UNIT_MARK.encode())


def shell_line(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


# --------------------------------------------------------------------------- on this machine


def platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


def unit_path(
    plat: str, system: bool, file_name: str, home: Path | None = None, env=os.environ
) -> Path:
    """Where the service file goes: the user's systemd / LaunchAgents folder, or the system's."""
    home = home or Path.home()
    if plat == "macos":
        return (
            Path("/Library/LaunchDaemons" if system else home / "Library" / "LaunchAgents")
            / file_name
        )
    if system:
        return Path("/etc/systemd/system") / file_name
    config = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return config / "systemd" / "user" / file_name


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write(path: Path, data: bytes) -> None:
    """Atomically and durably; readable by the service manager (0644), its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fs.write_durable(path, data, 0o644)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    fs.fsync_path(path.parent)


def systemd_running() -> bool:
    """systemctl exists and systemd is the init system here (not in a plain container)."""
    return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()


def launchd_running() -> bool:
    return sys.platform == "darwin" and shutil.which("launchctl") is not None


def call(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a service-manager command: (exit code, its output, stripped)."""
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return p.returncode, (p.stdout + p.stderr).strip()


def lingering(user: str) -> bool | None:
    """Does systemd keep this user's services running while they are logged out? None: cannot tell."""
    d = Path("/var/lib/systemd/linger")
    return (d / user).exists() if d.is_dir() else None
