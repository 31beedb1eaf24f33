"""The service manager's side of `ftctl service`: where unit files live, writing and removing them,
and asking systemctl / launchctl (only where they run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import fs


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
