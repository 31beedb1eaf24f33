"""No sleep mid-run, on Linux with a stand-in `systemd-inhibit` first on PATH (a script that runs the
command after `--`, as the real one does): held while a job trains, shown by status, released when
the job ends, and gone with the daemon when the daemon is SIGKILLed. macOS's caffeinate is the same
code path with another command (checked by `power.command`)."""

from __future__ import annotations

import os
import signal
import stat

from helpers import daemon, finished, ftctl, make_workspace, running, status, wait_for

from ftctl.adapters import power

FAKE = """#!/bin/sh
echo "start $$ $*" >> "$FAKE_INHIBIT_LOG"
while [ "$1" != "--" ]; do shift; done
shift
exec 3<&0
"$@" <&3 3<&- &
child=$!
echo "child $child" >> "$FAKE_INHIBIT_LOG"
wait $child
"""


def _pids(log) -> list[int]:
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        out.append(int(line.split()[1]))
    return out


def test_the_commands_per_platform():
    which = lambda name: f"/usr/bin/{name}"  # noqa: E731
    assert power.command(42, "why", "darwin", which) == [
        "/usr/bin/caffeinate",
        "-i",
        "-s",
        "-w",
        "42",
    ]
    cmd = power.command(42, "job 1", "linux", which)
    assert cmd[:2] == ["/usr/bin/systemd-inhibit", "--what=sleep:idle"] and cmd[-2:] == [
        "--",
        "cat",
    ]
    assert power.command(42, "why", "linux", lambda name: None) is None
    assert (
        power.display_sleep_minutes(
            "System-wide power settings:\n displaysleep         0\n sleep 1"
        )
        == 0
    )
    assert power.display_sleep_minutes(" displaysleep 10 (sleep prevented by caffeinate)") == 10
    assert power.display_sleep_minutes("nothing") is None


def test_held_while_training_released_after_and_dies_with_the_daemon(tmp_path, demo):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemd-inhibit"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "inhibit.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_INHIBIT_LOG": str(log),
        "FTCTL_HANG_AT": f"mid_step:6:{tmp_path / 'hang-marker'}",
    }
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    d = daemon(home, env=env)
    try:
        wait_for(lambda: len(_pids(log)) == 2 and (tmp_path / "hang-marker").exists(), timeout=120)
        sh, cat = _pids(log)
        assert running(sh) and running(cat)
        assert "--what=sleep:idle" in log.read_text() and "--mode=block" in log.read_text()
        assert os.getpgid(sh) == os.getpgid(d.pid)  # a child in the daemon's process group
        s = status(home)["daemon"]
        assert s["power"]["held"] is True and s["power"]["pid"] == sh, s
        assert f"keeping the machine awake (systemd-inhibit pid {sh})" in s["summary"]
        d.send_signal(signal.SIGKILL)
        d.wait(10)
        # gone with the daemon
        wait_for(lambda: not running(sh) and not running(cat), timeout=10, every=0.1)
    finally:
        if d.poll() is None:
            d.kill()
    ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env={k: v for k, v in env.items() if k != "FTCTL_HANG_AT"},
        timeout=600,
    )
    finished(home)
    pids = _pids(log)
    # held again for the resumed run, released at its end
    assert len(pids) == 4 and not any(map(running, pids))
    assert not (home / "run" / power.STATE_FILE).exists()
    assert status(home)["daemon"]["power"] is None


def test_prevent_sleep_false_holds_nothing(tmp_path):
    from ftctl.adapters.workspace import init_workspace
    from ftctl.control.daemon import Daemon
    from ftctl.control.supervise import hold_power

    ws = init_workspace(tmp_path / "ws", "model", {"power": {"prevent_sleep": False}})
    assert hold_power(Daemon(ws).host(), "0001") is None
    assert not (ws.home / "run" / power.STATE_FILE).exists()


def test_a_data_parallel_job_holds_it_while_it_trains_and_releases_it_after(tmp_path, demo):
    """The same assertion for a job on two ranks (one supervisor for 1..N ranks: the data-parallel
    path once forgot it): held while its ranks train — rank 0 stands still at step 3 — and released
    when the job stops (a graceful shutdown, agreed on by both ranks at that step)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemd-inhibit"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log, marker = tmp_path / "inhibit.log", tmp_path / "hang-marker"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_INHIBIT_LOG": str(log),
        "FTCTL_HANG_AT": f"mid_step@0:3:{marker}",
    }
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        iters=12,
        save_every=4,
        steps_per_eval=12,
        distributed={"hosts": ["127.0.0.1"], "processes_per_host": 2},
    )
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    d = daemon(home, env=env)
    try:
        wait_for(lambda: len(_pids(log)) == 2 and marker.exists(), timeout=180)
        sh, cat = _pids(log)
        assert running(sh) and running(cat)
        s = status(home)
        assert s["jobs"][0]["world_size"] == 2 and s["jobs"][0]["state"] == "training", s
        assert s["daemon"]["power"]["held"] is True and s["daemon"]["power"]["pid"] == sh, s
        ftctl(home, "shutdown", "--wait", "120")
        d.wait(60)
    finally:
        if d.poll() is None:
            d.kill()
    assert not running(sh) and not running(cat)  # released with the attempt
    assert not (home / "run" / power.STATE_FILE).exists()
    assert status(home)["jobs"][0]["state"] == "queued"  # interrupted at a checkpoint, nothing lost
