"""`ftctl service`: the systemd unit passes `systemd-analyze verify`, the launchd plist round-trips
through plistlib with the keys launchd needs, both carry ftctl's restart budget, and install /
uninstall are idempotent and never overwrite or remove a file ftctl did not write. systemctl and
launchctl are never really called here (systemd is not PID 1 on the test machines): the calls ftctl
would make are recorded instead."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess

import pytest
from helpers import run

from ftctl.adapters import service as svc
from ftctl.adapters.workspace import init_workspace
from ftctl.control import service


@pytest.fixture
def calls():
    return []


@pytest.fixture
def home(tmp_path, monkeypatch, calls):
    """A workspace with its own restart budget, and a private $HOME for the unit files."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(svc, "systemd_running", lambda: False)
    monkeypatch.setattr(svc, "launchd_running", lambda: False)
    monkeypatch.setattr(svc, "call", lambda args, timeout=60: (calls.append(args), (0, ""))[1])
    ws = init_workspace(
        tmp_path / "ws",
        "model",
        {
            "restart": {
                "max_restarts": 5,
                "window_s": 600.0,
                "backoff_s": 3.0,
                "backoff_max_s": 60.0,
            },
            "timeouts": {"stop_s": 200.0},
        },
    )
    return ws


def test_the_unit_passes_systemd_analyze_verify(home, tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed here")
    _, data = service.render(home, False, "linux")
    text = data.decode()
    assert (
        "StartLimitBurst=6" in text
        and "StartLimitIntervalSec=600" in text
        and "RestartSec=3" in text
    )
    assert (
        "KillMode=mixed" in text and "KillSignal=SIGTERM" in text and "Restart=on-failure" in text
    )
    assert f"TimeoutStopSec={int(200 + 15 + 30)}" in text
    assert f"ExecStart={service.ftctl_command()[0]} start --quiet --home {home.home}" in text
    unit = tmp_path / "units" / f"{svc.name(str(home.home))}.service"
    unit.parent.mkdir()
    unit.write_bytes(data)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    p = subprocess.run(
        [exe, "--user", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    # not even a warning
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr
    unit.write_bytes(service.render(home, True, "linux")[1])  # the --system variant, in system mode
    p = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr
    unit.write_bytes(data.replace(b"KillMode=mixed", b"KillMode=bogus"))  # and the check can fail
    p = subprocess.run(
        [exe, "--user", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    assert "kill mode" in p.stdout + p.stderr


def test_the_plist_round_trips_with_the_keys_launchd_needs(home):
    path, data = service.render(home, False, "macos")
    assert (
        path
        == home.home.parent
        / "user"
        / "Library"
        / "LaunchAgents"
        / f"{svc.label(str(home.home))}.plist"
    )
    d = plistlib.loads(data)
    assert plistlib.loads(plistlib.dumps(d, sort_keys=True)) == d
    assert d["Label"] == svc.label(str(home.home)) and d["RunAtLoad"] is True
    assert d["ProgramArguments"] == [
        *service.ftctl_command(),
        "start",
        "--quiet",
        "--home",
        str(home.home),
    ]
    assert all(
        os.path.isabs(a)
        for a in (d["ProgramArguments"][0], d["WorkingDirectory"], d["StandardOutPath"])
    )
    # restarted on failure only: a clean stop stays stopped
    assert d["KeepAlive"] == {"SuccessfulExit": False}
    assert d["ThrottleInterval"] == 100  # at most max_restarts + 1 = 6 starts per 600 s window
    assert d["ExitTimeOut"] >= 200  # a stop may wait timeouts.stop_s for the checkpoint
    assert d["StandardOutPath"].startswith(str(home.home / "logs")) and d[
        "StandardErrorPath"
    ].startswith(str(home.home / "logs"))
    assert svc.is_ours(data, "macos") and not svc.is_ours(plistlib.dumps({"Label": "x"}), "macos")
    assert not svc.is_ours(b"not a plist", "macos")


def test_install_and_uninstall_are_idempotent_and_leave_foreign_files_alone(home, calls, capsys):
    unit = svc.unit_path("linux", False, f"{svc.name(str(home.home))}.service")
    assert run(capsys, "service", "install", "--home", home.home)[0] == 0
    first = unit.read_bytes()
    assert svc.is_ours(first, "linux")
    code, out, _ = run(capsys, "service", "install", "--home", home.home)
    assert code == 0 and "already installed, unchanged" in out and unit.read_bytes() == first
    assert "systemctl --user enable --now" in out  # systemd not running: it says what to run
    code, out, _ = run(capsys, "service", "status", "--json", "--home", home.home)
    assert '"installed": true' in out and '"up_to_date": true' in out
    assert run(capsys, "service", "uninstall", "--home", home.home)[0] == 0 and not unit.exists()
    code, out, _ = run(capsys, "service", "uninstall", "--home", home.home)
    assert code == 0 and "nothing to do" in out

    foreign = b"[Service]\nExecStart=/usr/bin/true\n"
    unit.write_bytes(foreign)
    code, _, err = run(capsys, "service", "install", "--home", home.home)
    assert code == 1 and "not written by ftctl" in err and unit.read_bytes() == foreign
    code, _, err = run(capsys, "service", "uninstall", "--home", home.home)
    assert code == 1 and "not written by ftctl" in err and unit.read_bytes() == foreign
    assert calls == []  # nothing was asked of systemd


def test_where_systemd_runs_install_enables_and_starts_unless_a_daemon_runs(
    home, calls, capsys, monkeypatch
):
    from ftctl.adapters import process

    monkeypatch.setattr(svc, "systemd_running", lambda: True)
    name = svc.name(str(home.home))
    assert run(capsys, "service", "install", "--home", home.home)[0] == 0
    assert calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", name],
    ]
    calls.clear()
    lock = process.acquire_lock(home.lock_path)  # a daemon is running in a terminal
    try:
        code, out, _ = run(capsys, "service", "install", "--home", home.home)
    finally:
        process.release_lock(lock)
    assert code == 0 and "enabled but not started" in out
    assert calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", name],
    ]
    calls.clear()
    assert run(capsys, "service", "uninstall", "--home", home.home)[0] == 0
    assert calls == [
        ["systemctl", "--user", "disable", "--now", name],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_print_changes_nothing_and_renders_either_platform(home, capsys):
    code, out, err = run(
        capsys, "service", "install", "--print", "--platform", "macos", "--home", home.home
    )
    assert (
        code == 0
        and plistlib.loads(out.encode())["Label"] == svc.label(str(home.home))
        and "nothing was changed" in err
    )
    code, out, _ = run(
        capsys, "service", "install", "--print", "--platform", "linux", "--home", home.home
    )
    assert code == 0 and out.startswith(svc.UNIT_MARK)
    assert not (home.home.parent / "user").exists()
    code, _, err = run(capsys, "service", "install", "--print", "--home", home.home / "nope")
    assert code == 1 and "no ftctl workspace" in err
