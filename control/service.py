"""`ftctl service install | uninstall | status`: the daemon as a systemd user unit (Linux) or a
launchd agent (macOS), so it outlives logouts and reboots and is restarted when it crashes.

Install and uninstall are idempotent and never overwrite or remove a file ftctl did not write (the
mark of adapters/service.py). The service manager is asked to (re)load and start the service only where
it runs; otherwise the outcome says what to run.
"""

from __future__ import annotations

import getpass
import os
import pwd
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ftctl.adapters import process
from ftctl.adapters import service as svc
from ftctl.adapters.workspace import Workspace
from ftctl.core.config import Config
from ftctl.events.errors import UserError

from .notifier import DRAIN_S


class ServiceError(UserError):
    """A service request a user must resolve; str() says what happened and what to do."""


@dataclass
class Outcome:
    platform: str
    path: Path
    name: str  # systemd unit name / launchd label
    action: str  # "written" | "updated" | "unchanged" | "removed" | "absent"
    notes: list[str] = field(default_factory=list)  # what was run, or what to run


def ftctl_command() -> tuple[str, ...]:
    """The venv's ftctl, absolute: the console script beside this interpreter, else python -m."""
    exe = Path(sys.executable)
    script = exe.parent / "ftctl"
    return (str(script),) if script.exists() else (str(exe), "-m", "ftctl.cli")


def spec(ws: Workspace, system: bool) -> svc.Spec:
    ws.require()
    cfg: Config = ws.load_config()[0]
    user = None
    if system:
        user = pwd.getpwuid(ws.home.stat().st_uid).pw_name
    return svc.Spec(
        home=str(ws.home),
        command=ftctl_command(),
        max_restarts=cfg.restart.max_restarts,
        window_s=cfg.restart.window_s,
        backoff_s=cfg.restart.backoff_s,
        stop_timeout_s=cfg.timeouts.stop_s + DRAIN_S + 30,
        system=system,
        user=user,
    )


def file_name(home: str, plat: str) -> str:
    return f"{svc.label(home)}.plist" if plat == "macos" else f"{svc.name(home)}.service"


def render(ws: Workspace, system: bool, plat: str) -> tuple[Path, bytes]:
    """(where it goes, the file) for this workspace: what `--print` shows and install writes."""
    sp = spec(ws, system)
    data = svc.launchd_plist(sp) if plat == "macos" else svc.systemd_unit(sp).encode()
    return svc.unit_path(plat, system, file_name(sp.home, plat)), data


def _check_root(system: bool) -> None:
    if system and os.geteuid() != 0:
        raise ServiceError(
            "--system writes a system unit: run it as root (sudo), or leave --system out for a "
            "user service. Nothing was changed."
        )


def _commands(
    plat: str, system: bool, home: str, path: Path
) -> tuple[list[list[str]], list[list[str]], str]:
    """(start commands, stop commands, what shows its state) on this platform."""
    if plat == "macos":
        domain = "system" if system else f"gui/{os.getuid()}"
        return (
            [["launchctl", "bootstrap", domain, str(path)]],
            [["launchctl", "bootout", f"{domain}/{svc.label(home)}"]],
            f"launchctl print {domain}/{svc.label(home)}",
        )
    user = [] if system else ["--user"]
    unit = svc.name(home)
    return (
        [["systemctl", *user, "daemon-reload"], ["systemctl", *user, "enable", "--now", unit]],
        [["systemctl", *user, "disable", "--now", unit], ["systemctl", *user, "daemon-reload"]],
        f"systemctl {'--user ' if user else ''}status {unit}",
    )


def install(ws: Workspace, system: bool = False) -> Outcome:
    _check_root(system)
    plat = svc.platform()
    home = str(ws.home)
    path, data = render(ws, system, plat)
    out = Outcome(plat, path, svc.label(home) if plat == "macos" else svc.name(home), "written")
    old = svc.read(path)
    if old is not None and not svc.is_ours(old, plat):
        raise ServiceError(
            f"{path} exists and was not written by ftctl: it was left untouched. Remove or rename it "
            "yourself if it is no longer needed, then run `ftctl service install` again."
        )
    if old == data:
        out.action = "unchanged"
    else:
        out.action = "updated" if old is not None else "written"
        svc.write(path, data)
    start, stop, show = _commands(plat, system, home, path)
    todo = start
    running = process.lock_holder(ws.lock_path)
    # a daemon runs already (in a terminal, or this very service): never start a second one
    if running:
        todo = [start[0], [c for c in start[1] if c != "--now"]] if plat == "linux" else []
        out.notes.append(
            f"a daemon is running on {home} ({running}): the service is enabled but not started now; "
            f"after `ftctl shutdown` start it with `{svc.shell_line(start[-1])}`"
        )
    elif plat == "macos" and out.action == "updated":
        # launchd reads the file when it is bootstrapped: reload the changed one
        todo = stop + start
    if not (svc.launchd_running() if plat == "macos" else svc.systemd_running()):
        out.notes.append(
            f"{'launchd' if plat == 'macos' else 'systemd'} is not running here: nothing was started; "
            "to start it: " + "; ".join(f"`{svc.shell_line(c)}`" for c in start)
        )
        return out
    for cmd in todo:
        code, said = svc.call(cmd)
        if code != 0 and not (
            cmd[1] == "bootout" or (plat == "macos" and "already" in said.lower())
        ):
            out.notes.append(
                f"`{svc.shell_line(cmd)}` failed ({code}): {said}. The file is in place; run it yourself "
                "once the cause is fixed"
            )
            return out
        out.notes.append(f"ran `{svc.shell_line(cmd)}`")
    if plat == "linux" and not system and svc.lingering(getpass.getuser()) is False:
        out.notes.append(
            f"to keep it running while you are logged out, and to start it at boot: "
            f"`loginctl enable-linger {getpass.getuser()}`"
        )
    out.notes.append(f"its state: `{show}`")
    return out


def uninstall(ws: Workspace, system: bool = False) -> Outcome:
    _check_root(system)
    plat = svc.platform()
    home = str(ws.home)
    path = svc.unit_path(plat, system, file_name(home, plat))
    out = Outcome(plat, path, svc.label(home) if plat == "macos" else svc.name(home), "absent")
    old = svc.read(path)
    if old is None:
        out.notes.append("no service is installed for this workspace; nothing to do")
        return out
    if not svc.is_ours(old, plat):
        raise ServiceError(
            f"{path} was not written by ftctl: it was left untouched (remove it yourself if you mean to)"
        )
    _, stop, _ = _commands(plat, system, home, path)
    manager = svc.launchd_running() if plat == "macos" else svc.systemd_running()
    if manager:
        # stop (gracefully: SIGTERM -> checkpoint) and disable, before the file goes
        for cmd in stop[:1]:
            code, said = svc.call(cmd, timeout=900)  # a graceful stop may wait for a checkpoint
            out.notes.append(
                f"ran `{svc.shell_line(cmd)}`" + (f" ({code}: {said})" if code else "")
            )
    svc.remove(path)
    out.action = "removed"
    if manager and plat == "linux":
        code, said = svc.call(stop[1])
        out.notes.append(
            f"ran `{svc.shell_line(stop[1])}`" + (f" ({code}: {said})" if code else "")
        )
    if not manager:
        out.notes.append(
            f"{'launchd' if plat == 'macos' else 'systemd'} is not running here, so nothing was stopped "
            f"(where it runs, `{svc.shell_line(stop[0])}` stops and disables the service)"
        )
    return out


def status(ws: Workspace, system: bool = False) -> dict:
    plat = svc.platform()
    home = str(ws.home)
    path = svc.unit_path(plat, system, file_name(home, plat))
    old = svc.read(path)
    ours = old is not None and svc.is_ours(old, plat)
    try:
        current = old == render(ws, system, plat)[1] if ours else None
    except Exception as e:  # noqa: BLE001 - an unreadable ftctl.yaml: say so, do not fail the status
        current, why = None, str(e)
    else:
        why = ""
    state = None
    if ours and (svc.launchd_running() if plat == "macos" else svc.systemd_running()):
        if plat == "macos":
            code, said = svc.call(
                [
                    "launchctl",
                    "print",
                    f"{'system' if system else f'gui/{os.getuid()}'}/{svc.label(home)}",
                ]
            )
            state = "loaded" if code == 0 else "not loaded"
        else:
            user = [] if system else ["--user"]
            state = " / ".join(
                svc.call(["systemctl", *user, verb, svc.name(home)])[1] or "?"
                for verb in ("is-enabled", "is-active")
            )
    return {
        "platform": plat,
        "path": str(path),
        "name": svc.label(home) if plat == "macos" else svc.name(home),
        "installed": ours,
        "foreign_file": old is not None and not ours,
        "up_to_date": current,
        "config_problem": why or None,
        "manager_state": state,
        "daemon": process.lock_holder(ws.lock_path),
    }
