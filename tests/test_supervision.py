"""Supervision with real processes and the tiny model: a worker's death is recorded, the hang
watchdog, the restart budget, orphans of a dead daemon, two daemons at once,
pause/resume/cancel with and without a daemon, a daemon killed during its own recovery, the
inbox, and a job stranded in `crashed` by a daemon that died between two commits."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import psutil
import pytest
from helpers import (
    crash_env,
    daemon,
    ftctl,
    leftovers,
    make_workspace,
    run,
    sha256_file,
    wait_for,
)

from ftctl.adapters.workspace import Workspace

SHORT = (
    "--set",
    "iters=10",
    "--set",
    "save_every=5",
)  # for jobs whose adapter bytes are not compared
HANG_S = 8.0  # above a worker's start-up (imports + tiny model: 2-4 s on 2 busy cores), far below the default


# --------------------------------------------------------------------------- helpers


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


def _submit(home, demo, *extra: str) -> None:
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), *extra)


def _rows(home, sql: str, params: tuple = ()) -> list:
    """Read the journal in-process, read-only (no CLI round trip: polling must be cheap)."""
    try:
        con = sqlite3.connect(f"file:{home / 'journal.db'}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return []
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # e.g. the WAL index is being created: try again next poll
        return []
    finally:
        con.close()


def _events(home, *types: str) -> list[dict]:
    rows = _rows(home, "SELECT seq, ts, stream, type, body FROM events ORDER BY seq")
    out = [
        {"seq": s, "ts": ts, "stream": st, "type": t.split(".v")[0], "data": json.loads(b)}
        for s, ts, st, t, b in rows
    ]
    return [e for e in out if not types or e["type"] in types]


def _epoch(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _projection(home):
    """What the journal says, now (replayed in-process: `ftctl status` without the start-up)."""
    from ftctl.control.ledger import Ledger

    ledger = Ledger.open(home / "journal.db")
    try:
        return ledger.state
    finally:
        ledger.close()


def _job(home, job: str = "0001"):
    return _projection(home).jobs[job]


def _survivors(home) -> list[int]:
    """helpers.survivors, in-process: pids of recorded workers and daemons still alive
    (same pid AND start time), and any other worker of the workspace (the standby)."""
    from helpers import stray_workers

    from ftctl.adapters.process import alive
    from ftctl.events.types import ProcessId

    out = []
    for e in _events(home, "training_started", "daemon_started"):
        d = e["data"]
        pid = (
            ProcessId(d["worker_pid"], d["worker_started_at"])
            if e["type"] == "training_started"
            else ProcessId(d["process"]["pid"], d["process"]["started_at"])
        )
        if alive(pid):
            out.append(pid.pid)
    return out + [p for p in stray_workers(home) if p not in out]


def _in_state(home, state: str, job: str = "0001"):
    j = _job(home, job)
    return j if j.state == state else None


def _ftctl_here(home, *args: str) -> int:
    """`ftctl ARGS` run in this process: the same command without the interpreter start-up."""
    from ftctl.cli.main import main

    old = os.umask(0o077)
    try:
        return main([*args, "--home", str(home)])
    finally:
        os.umask(old)


def _completed(home, job: str = "0001"):
    j = _job(home, job)
    assert j.state == "completed", (j.state, j.reason)
    assert j.adapter_sha256 == sha256_file(Path(home) / j.adapter_path / "adapters.safetensors")
    assert leftovers(home) == []
    return j


def _reject_bad_inbox_file(home, tmp_path, n: int) -> None:
    """Drop the n-th unusable file in the inbox of a running daemon and wait for its rejection:
    proof that the daemon went round its loop (inbox, then queue) once more."""
    src = tmp_path / f"bad{n}.jsonl"
    src.write_bytes(b'{"text": "fine"}\nnot json at all\n{"messages": 3}\n')
    old = time.time() - 60
    os.utime(src, (old, old))  # past INBOX_SETTLE_S: taken at the next turn, not 2 s later
    os.replace(src, home / "inbox" / src.name)
    wait_for(lambda: len(_events(home, "job_rejected")) >= n, timeout=60, every=0.05)


# `baseline` (tests/conftest.py): two uninterrupted 40-step jobs, trained once per session.


# --------------------------------------------------------------------------- a. detection


def test_worker_death_is_recorded_and_the_job_resumes(tmp_path, demo):
    # how fast the death is recorded is measured by bench/detect.py, not pinned here
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo, *SHORT)
    marker = tmp_path / "marker-mid-step-7"
    d = daemon(home, "--until-idle", env={"FTCTL_CRASH_AT": f"mid_step:7:{marker}"})
    try:
        _, err = d.communicate(timeout=180)
        assert d.returncode == 0, err
    finally:
        _stop(d)
    assert marker.exists(), "the mid_step:7 crash point never fired"
    crashed = _events(home, "crashed")[0]
    # the marker is written just before the SIGKILL
    gap = _epoch(crashed["ts"]) - marker.stat().st_mtime
    assert gap > -0.05, f"the death was journaled {-gap:.3f} s before it happened"
    c = crashed["data"]
    assert (
        c["category"] == "killed"
        and c["signal"] == signal.SIGKILL
        and c["exit_code"] == -signal.SIGKILL
    )
    starts = [e["data"] for e in _events(home, "training_started")]
    assert [s["attempt"] for s in starts] == [1, 2]
    # it was the first worker that died
    assert f"pid {starts[0]['worker_pid']}" in marker.read_text()
    # from the last checkpoint committed before the kill: 5 — or 0 if its background write was still in
    # flight at step 7 (a kill then leaves the previous committed checkpoint, here none)
    evs = _events(home)
    crash_seq = next(e["seq"] for e in evs if e["type"] == "crashed")
    committed = [
        e["data"]["checkpoint"]["step"]
        for e in evs
        if e["type"] == "checkpoint_committed" and e["seq"] < crash_seq
    ]
    assert starts[1].get("resume_step", 0) == (committed[-1] if committed else 0) and set(
        committed
    ) <= {5}
    assert _completed(home).step == 10
    assert _survivors(home) == []


# --------------------------------------------------------------------------- b. hang watchdog


def test_hung_worker_is_killed_by_the_watchdog_and_requeued(tmp_path, demo):
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        timeouts={"hang_s": HANG_S, "eval_hang_s": 2 * HANG_S, "stop_s": 30.0},
    )
    _submit(home, demo, "--set", "iters=12", "--set", "save_every=5")
    marker = tmp_path / "marker-hang-mid-step-9"
    ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env={"FTCTL_HANG_AT": f"mid_step:9:{marker}"},
        timeout=300,
    )
    assert marker.exists(), "the mid_step:9 hang point never fired"
    crashes = _events(home, "crashed")
    assert len(crashes) == 1, crashes
    c = crashes[0]
    assert c["data"]["category"] == "hang" and c["data"]["signal"] == signal.SIGKILL
    waited = _epoch(c["ts"]) - marker.stat().st_mtime
    # never before hang_s; the upper bound only catches a watchdog that does not fire (load can delay it)
    assert HANG_S - 0.5 < waited < HANG_S + 60, (
        f"the watchdog fired {waited:.2f} s after the hang (hang_s = {HANG_S})"
    )
    kinds = [e["type"] for e in _events(home) if e["stream"] == "job:0001"]
    assert kinds[kinds.index("crashed") + 1] == "requeued"
    starts = [e["data"] for e in _events(home, "training_started")]
    assert len(starts) == 2 and f"pid {starts[0]['worker_pid']}" in marker.read_text()
    assert starts[1]["resume_step"] == 5
    assert _completed(home).step == 12
    assert _survivors(home) == []  # the hung worker was killed, not left behind


# --------------------------------------------------------------------------- c. restart budget


def _markers(tmp_path, point: str, n: int, tag: str) -> dict:
    """FTCTL_CRASH_AT with the same point armed n times: each marker fires once, so the worker is
    killed there on n attempts in a row."""
    return {
        "FTCTL_CRASH_AT": ",".join(f"{point}:{tmp_path / f'marker-{tag}-{i}'}" for i in range(n))
    }


def _no_storm(mine: list[dict]) -> None:
    """Every restart waited for the not_before of the requeue that preceded it."""
    starts = [e for e in mine if e["type"] == "training_started"]
    for rq, nxt in zip([e for e in mine if e["type"] == "requeued"], starts[1:]):
        assert _epoch(nxt["ts"]) >= rq["data"]["not_before"] - 0.01, (rq, nxt)


def test_restart_budget_fails_a_hopeless_job_then_retry_continues_it_bit_for_bit(
    tmp_path, demo, baseline
):
    """Policy (core.crash.after_crash): kills from outside use up the restart budget, whatever the step.
    job 0001, max_restarts=2, killed at step 23 on three attempts: 3 crashes in the window > 2 fail
      it, and the reason names the way back; `ftctl retry` queues it again with a fresh budget, and it
      resumes from step 20 and ends with the uninterrupted run's adapter;
    job 0002, max_restarts=1, killed at step 7 twice: 2 crashes in the window > 1 -> failed;
    job 0003 then trains: the queue moved on. Exactly max_restarts + 1 workers per hopeless job."""
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        restart={"max_restarts": 2, "window_s": 300.0, "backoff_s": 0.3, "backoff_max_s": 0.6},
    )
    _submit(home, demo, "--name", "hopeless2")
    p = ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env=_markers(tmp_path, "mid_step:23", 3, "a"),
        timeout=300,
        check=False,
    )
    assert p.returncode == 1 and "job 0001 failed" in p.stderr, p.stderr
    _submit(
        home,
        demo,
        *SHORT,
        "--set",
        "restart.max_restarts=1",
        "--lineage",
        "other",
        "--name",
        "hopeless1",
    )
    p = ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env=_markers(tmp_path, "mid_step:7", 2, "b"),
        timeout=300,
        check=False,
    )
    assert p.returncode == 1 and "job 0002 failed" in p.stderr, p.stderr
    _submit(home, demo, *SHORT, "--lineage", "third", "--name", "good")
    ftctl(home, "start", "--until-idle", "--quiet", check=False)
    evs = _events(home)
    for job, max_restarts, step, why in (
        ("0001", 2, 23, "3 crashes within 300 s (restart.max_restarts = 2)"),
        ("0002", 1, 7, "2 crashes within 300 s (restart.max_restarts = 1)"),
    ):
        mine = [e for e in evs if e["stream"] == f"job:{job}"]
        starts = [e for e in mine if e["type"] == "training_started"]
        crashes = [e["data"] for e in mine if e["type"] == "crashed"]
        assert len(starts) == len(crashes) == max_restarts + 1, [e["type"] for e in mine]
        assert all(
            c["category"] == "killed" and c["step"] == step and c["signal"] == signal.SIGKILL
            for c in crashes
        )
        _no_storm(mine)
        # the first restart in the window is at once (the standby takes it), backoff from the second
        reasons = [e["data"]["reason"] for e in mine if e["type"] == "requeued"]
        assert [r.split(", ")[-1] for r in reasons] == ["at once", "in 0.3 s"][:max_restarts], (
            reasons
        )
        # the last lifecycle event (a later recovery may still discard the temp folder of a checkpoint
        # whose background write the kill interrupted: a fact, not a transition)
        last = [e for e in mine if e["type"] != "checkpoint_discarded"][-1]
        assert last["type"] == "failed" and why in last["data"]["reason"], last
        assert f"`ftctl retry {job}` continues it" in last["data"]["reason"], last
        assert _job(home, job).state == "failed"
    _completed(home, "0003")  # the queue moved on past the hopeless jobs

    p = ftctl(home, "resume", "0001", check=False)  # the way out is retry, and the refusal says so
    assert p.returncode == 1 and "'failed'" in p.stderr
    out = ftctl(home, "retry", "0001").stdout
    assert "fresh restart budget" in out, out
    ftctl(home, "start", "--until-idle", "--quiet")
    j = _completed(home, "0001")
    assert j.adapter_sha256 == baseline.sha1 and j.budget_from == 3
    kinds = [e["type"] for e in _events(home) if e["stream"] == "job:0001"]
    assert kinds[kinds.index("retried") - 1] == "failed"
    retried = next(e["seq"] for e in _events(home, "retried"))
    last = [
        e["data"]["checkpoint"]["step"]
        for e in _events(home, "checkpoint_committed", "checkpoint_pruned")
        if e["seq"] < retried and e["type"] == "checkpoint_committed"
    ]
    assert _events(home, "training_started")[-1]["data"]["resume_step"] == max(last) and max(
        last
    ) in (15, 20)
    assert _survivors(home) == []


def test_kills_while_loading_use_the_budget_not_the_same_step_rule(tmp_path, demo, baseline):
    """A worker killed once mid-run, then three times while it is still loading (before its first step:
    each attempt resumes from the same checkpoint and dies there): with room in its restart budget the
    job goes on and finishes bit for bit. The loading kills are recorded as such — not as three crashes
    at the resume step, which the same-step rule would fail — and every message agrees with what
    followed."""
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        restart={"max_restarts": 5, "window_s": 300.0, "backoff_s": 0.05, "backoff_max_s": 0.1},
    )
    _submit(home, demo)
    env = crash_env(tmp_path, "mid_step:12")
    for at in (5, 10):  # whichever checkpoint it resumes from: three kills while loading there
        env["FTCTL_CRASH_AT"] += (
            "," + _markers(tmp_path, f"while_loading:{at}", 3, f"l{at}")["FTCTL_CRASH_AT"]
        )
    ftctl(home, "start", "--until-idle", "--quiet", env=env, timeout=600)
    j = _completed(home)
    assert j.adapter_sha256 == baseline.sha1
    # where the attempts after the kill resumed: a committed checkpoint (5, or 10 if its background
    # write landed before the kill)
    resumed = {e["data"].get("resume_step", 0) for e in _events(home, "training_started")[1:]}
    assert len(resumed) == 1 and resumed <= {5, 10}, resumed
    (r,) = resumed
    crashes = [e["data"] for e in _events(home, "crashed")]
    assert [(c["category"], c["step"], c.get("loading", False)) for c in crashes] == [
        ("killed", 12, False)
    ] + [("killed", r, True)] * 3, crashes
    assert all("died before its first step (while loading" in c["evidence"] for c in crashes[1:])
    assert all(f"it resumes from step {r}" in c["suggestion"] for c in crashes), crashes
    reasons = [e["data"]["reason"] for e in _events(home, "requeued")]
    assert [x.split(" after ")[0] for x in reasons] == [f"restart {n}/5" for n in (1, 2, 3, 4)]
    assert _events(home, "failed") == []
    assert f"killed while loading (resuming from step {r})" in ftctl(home, "status", "1").stdout


def test_a_job_that_cannot_load_is_paused_at_once_with_the_reason(tmp_path, demo):
    """A model folder that passes the preflight but does not fit its weights (3 layers declared, 2
    stored): a retry would fail the same way, so the first crash pauses the job with the worker's
    own error in the reason — no restart budget spent, no three identical tracebacks."""
    broken = tmp_path / "broken-model"
    shutil.copytree(demo.model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    home = make_workspace(tmp_path / "ws", broken)
    _submit(home, demo, *SHORT)
    p = ftctl(home, "start", "--until-idle", "--quiet", timeout=300, check=False)
    assert p.returncode == 1 and "job 0001 paused: load_error" in " ".join(p.stderr.split()), (
        p.stderr
    )
    j = _job(home)
    assert j.state == "paused" and j.attempt == 1, (j.state, j.reason)
    assert (
        "load_error (ValueError: Missing 9 parameters" in j.reason
        and "ftctl resume 0001" in j.reason
    ), j.reason
    (crash,) = _events(home, "crashed")
    assert crash["data"]["category"] == "load_error" and crash["data"]["suggestion"].startswith(
        "ValueError: Missing 9"
    )
    assert 'File "' in crash["data"]["evidence"]  # the traceback stays in the evidence


def test_a_config_that_cannot_load_names_a_remedy_that_works_and_retry_set_trains_it(
    tmp_path, demo, capsys, monkeypatch
):
    """`num_layers: 16` (mlx-lm's default) on the 2-layer demo model, in a job recorded without
    submit's fit check (a journal from before submit checked it; today submit refuses it:
    tests/test_mlx_data.py): the job cannot load, and its config is recorded, so "fix the cause,
    then `ftctl resume`" would fail the same way forever. The crash and the pause name the remedy
    that works, `ftctl retry 0001 --set num_layers=2`, which records the new config (retried:
    config + config_sha256) and trains the job to the end, from step 0 (num_layers changes the
    adapter's shape; it has no checkpoint)."""
    from ftctl.control import submit as submitting
    from ftctl.control.ledger import Ledger
    from ftctl.core.config import Config, config_sha256

    home = make_workspace(tmp_path / "ws", demo.model_dir, num_layers=16)
    monkeypatch.setattr(submitting, "_fit", lambda cfg, counts: [])  # submit as it was
    ledger = Ledger(Workspace(home).open_journal())
    try:
        sub = submitting.submit(
            Workspace(home), ledger, demo.train, valid=demo.valid, overrides=list(SHORT[1::2])
        )
    finally:
        ledger.close()
    assert sub.state == "queued" and _job(home).config.num_layers == 16
    p = ftctl(home, "start", "--until-idle", "--quiet", timeout=300, check=False)
    assert p.returncode == 1
    j = _job(home)
    assert j.state == "paused" and "num_layers = 16" in j.reason, j.reason
    assert "`ftctl retry 0001 --set num_layers=2`" in j.reason, j.reason
    (crash,) = _events(home, "crashed")
    assert crash["data"]["fix"] == "num_layers=2"
    assert "ftctl retry 0001 --set num_layers=2" in crash["data"]["suggestion"]
    # resuming as it is is not the remedy: the reason says it would fail the same way
    assert "`ftctl resume 0001` would fail the same way" in j.reason
    old_sha = j.config_sha256
    # refused with the way out: a key a checkpoint-less job may change, but not a daemon's setting
    code, _, err = run(capsys, "retry", "1", "--set", "notify=[]", "--home", home)
    assert code == 1 and "daemon's setting" in err
    code, _, err = run(capsys, "retry", "1", "--set", "num_layers=0", "--home", home)
    assert code == 1 and "num_layers" in err and _job(home).state == "paused"
    out = " ".join(ftctl(home, "retry", "0001", "--set", "num_layers=2").stdout.split())
    assert "num_layers: 16 -> 2" in out and "it starts from step 0" in out, out
    (retried,) = _events(home, "retried")
    d = retried["data"]
    assert d["config"]["num_layers"] == 2 and d["overrides"] == ["num_layers=2"]
    assert d["config_sha256"] == config_sha256(msgspec.convert(d["config"], Config)) != old_sha
    assert _job(home).config.num_layers == 2 and _job(home).config_sha256 == d["config_sha256"]
    ftctl(home, "start", "--until-idle", "--quiet", timeout=300)
    assert _completed(home).step == 10


def test_retry_set_resumes_the_last_checkpoint_bit_exact_or_refuses_a_shape_change(
    tmp_path, demo, baseline, capsys
):
    """A job with checkpoints: a key that changes nothing it computes (here timeouts.hang_s) resumes
    its last checkpoint and ends bit-exact with an uninterrupted run; a key that changes the adapter's
    shape is refused with the alternative, and nothing is recorded."""
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo)
    marker = tmp_path / "hang"
    d = daemon(home, env={"FTCTL_HANG_AT": f"mid_step:12:{marker}"})
    try:
        wait_for(lambda: marker.exists() or d.poll() is not None, timeout=240, every=0.02)
        assert marker.exists(), d.communicate()
        ftctl(home, "pause", "0001")
        wait_for(lambda: _job(home).state == "paused", timeout=120)
        ftctl(home, "shutdown", "--wait", "60")
    finally:
        if d.poll() is None:
            d.kill()
    code, _, err = run(capsys, "retry", "1", "--set", "lora_parameters.rank=8", "--home", home)
    assert code == 1 and "committed checkpoints (the last at step 12)" in err, err
    assert "ftctl cancel 0001" in err and not _events(home, "retried")
    out = " ".join(ftctl(home, "retry", "0001", "--set", "timeouts.hang_s=90").stdout.split())
    assert "it resumes from step 12, bit-exact" in out, out
    ftctl(home, "start", "--until-idle", "--quiet", timeout=300)
    assert _completed(home).adapter_sha256 == baseline.sha1
    starts = [e["data"] for e in _events(home, "training_started")]
    assert starts[-1]["resume_step"] == 12


def test_retry_set_epochs_derives_iters_again_and_refuses_iters_for_a_job_trained_by_epochs(
    tmp_path, demo, capsys
):
    """A job submitted with `epochs` records iters = epochs x batches per epoch; `retry --set` keeps
    them consistent: epochs=3 (or a new batch_size) derives iters again from the job's own training
    data, and --set iters is refused (the epochs decide them). Nothing trains: the job is paused
    while queued."""
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo, "--set", "epochs=2")  # 200 examples, batch_size 2: 100 batches per epoch
    assert (_job(home).config.epochs, _job(home).config.iters) == (2, 200)
    ftctl(home, "pause", "0001")
    code, _, err = run(capsys, "retry", "1", "--set", "iters=7", "--home", home)
    assert code == 1 and "trains by epochs = 2, which decide its iters" in err, err
    code, _, err = run(capsys, "retry", "1", "--set", "batch_size=500", "--home", home)
    assert (
        code == 1 and "needs at least one batch per epoch" in err and not _events(home, "retried")
    )
    out = " ".join(ftctl(home, "retry", "0001", "--set", "epochs=3").stdout.split())
    assert "iters: 200 -> 300" in out and "epochs: 2 -> 3" in out, out
    assert (_job(home).config.epochs, _job(home).config.iters) == (3, 300)
    ftctl(home, "pause", "0001")
    ftctl(home, "retry", "0001", "--set", "batch_size=4")
    assert _job(home).config.iters == 3 * 50


# --------------------------------------------------------------------------- d. orphans


@pytest.mark.parametrize("same_identity", [True, False], ids=["orphan", "reused-pid"])
def test_recover_stops_the_orphan_of_a_dead_daemon_but_never_a_stranger(
    tmp_path, demo, same_identity
):
    from ftctl.adapters.process import alive
    from ftctl.control.ledger import Ledger
    from ftctl.core.state import DAEMON_STREAM, job_stream
    from ftctl.events import types as ev

    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo, *SHORT)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # the dead daemon's pid
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    reaper = threading.Thread(target=orphan.wait, daemon=True)  # reap it as init reaps an orphan
    reaper.start()
    born = psutil.Process(orphan.pid).create_time()
    me = ev.ProcessId(orphan.pid, born)
    try:
        ledger = Ledger.open(home / "journal.db")
        try:
            ledger.commit(
                DAEMON_STREAM,
                ev.DaemonStarted(
                    process=ev.ProcessId(gone.pid, time.time() - 60),
                    host=socket.gethostname(),
                    version="test",
                ),
            )
            ledger.commit(
                job_stream("0001"),
                ev.TrainingStarted(
                    job="0001",
                    attempt=1,
                    worker_pid=orphan.pid,
                    worker_started_at=born
                    if same_identity
                    else born - 1000.0,  # else: the pid was reused
                    base_model=str(demo.model_dir),
                ),
            )
        finally:
            ledger.close()
        out = json.loads(ftctl(home, "recover", "--json").stdout)
        whats = [r["what"] for r in out["repairs"]]
        if same_identity:
            assert any(f"stop orphan worker pid {orphan.pid}" in w for w in whats), whats
            reaper.join(timeout=15)
            assert orphan.returncode == -signal.SIGTERM
            assert not alive(me)
        else:
            assert not any("orphan" in w for w in whats), whats
            # recover stops an orphan synchronously (process.stop_group waits for it): had it
            # signalled the stranger, it would be gone by now
            assert alive(me) and psutil.Process(orphan.pid).status() != psutil.STATUS_ZOMBIE
        crashes = _events(home, "crashed")
        assert len(crashes) == 1 and crashes[0]["data"]["category"] == "daemon_died"
        assert ("the orphan worker was stopped" in crashes[0]["data"]["evidence"]) == same_identity
        p = _projection(home)
        assert not p.daemon.running
        assert [j.state for j in p.jobs.values()] == ["queued"]
        assert json.loads(ftctl(home, "recover", "--dry-run", "--json").stdout)["repairs"] == []
    finally:
        if alive(me):
            os.kill(orphan.pid, signal.SIGKILL)
        reaper.join(timeout=15)


def test_recover_stops_an_unsupervised_worker_of_the_workspace_and_nothing_else(tmp_path, demo):
    """A worker process of this workspace that no journal entry names (a spare whose daemon died and
    whose death signal never came): recovery holds the daemon lock, so nobody supervises it; it is
    stopped. A process of another workspace is left alone."""
    from ftctl.adapters.process import alive
    from ftctl.events import types as ev

    home = make_workspace(tmp_path / "ws", demo.model_dir)
    other = tmp_path / "other-ws"
    sleeper = "import time; time.sleep(600)"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                sleeper,
                "-m",
                "ftctl.adapters.worker",
                "--workspace",
                str(ws),
                "--job",
                "standby",
            ],
            start_new_session=True,
        )
        for ws in (home, other)
    ]
    ids = [ev.ProcessId(p.pid, psutil.Process(p.pid).create_time()) for p in procs]
    try:
        out = json.loads(ftctl(home, "recover", "--json").stdout)
        whats = [r["what"] for r in out["repairs"]]
        assert any(w.startswith(f"stop worker pid {procs[0].pid}:") for w in whats), whats
        assert not any(str(procs[1].pid) in w for w in whats), whats
        assert procs[0].wait(timeout=15) == -signal.SIGTERM
        assert alive(ids[1])
        assert json.loads(ftctl(home, "recover", "--dry-run", "--json").stdout)["repairs"] == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=15)


# --------------------------------------------------------------------------- e. two daemons


def test_two_daemons_started_at_once_exactly_one_runs(tmp_path, demo):
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo, *SHORT)
    daemons = [daemon(home, "--until-idle"), daemon(home, "--until-idle")]
    try:
        outs = [d.communicate(timeout=300) for d in daemons]
    finally:
        for d in daemons:
            _stop(d)
    codes = [d.returncode for d in daemons]
    assert sorted(codes) == [0, 1], (codes, outs)
    loser = outs[codes.index(1)]
    assert "another ftctl daemon is running" in loser[1], loser
    assert len(_events(home, "daemon_started")) == 1
    assert len(_events(home, "training_started")) == 1
    _completed(home)
    assert _survivors(home) == []


# --------------------------------------------------------------------------- f. control, daemon running


def test_pause_and_resume_with_a_running_daemon_lose_no_step(tmp_path, demo, baseline):
    """The pause lands while the worker stands still after step 7 (FTCTL_HANG_AT, released by
    the worker's `stop`): the job pauses with a checkpoint at exactly step 7, the daemon stays
    up and leaves it alone, and once resumed it finishes bit for bit."""
    stop = 7  # not a save_every step: the checkpoint there is the pause's
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo)
    marker = tmp_path / f"marker-hang-mid-step-{stop}"
    d = daemon(home, env={"FTCTL_HANG_AT": f"mid_step:{stop}:{marker}"})
    try:
        wait_for(lambda: marker.exists() or d.poll() is not None, timeout=180, every=0.05)
        assert marker.exists(), f"the mid_step:{stop} hang point never fired"
        assert _ftctl_here(home, "pause", "0001") == 0
        j = wait_for(lambda: _in_state(home, "paused"), timeout=120, every=0.05)
        assert j.step == stop and f"at step {stop}" in j.reason, (j.step, j.reason)
        evs = [e for e in _events(home) if e["stream"] == "job:0001"]
        paused_at = max(e["seq"] for e in evs if e["type"] == "paused")
        committed = [
            e["data"]["checkpoint"]["step"]
            for e in evs
            if e["type"] == "checkpoint_committed" and e["seq"] < paused_at
        ]
        assert committed == [5, stop], committed
        assert any(e["type"] == "control_requested" and e["data"]["action"] == "pause" for e in evs)
        # the daemon stays up and does not pick the paused job up: it rejects one bad inbox file,
        # then another in a later turn of its loop (a paused job taken in the first turn would
        # be training_started before the second rejection)
        for n in (1, 2):
            _reject_bad_inbox_file(home, tmp_path, n)
        assert d.poll() is None, "the daemon exited after pausing its only job"
        assert _projection(home).daemon.running
        assert len(_events(home, "training_started")) == 1  # a paused job is not picked up
        ftctl(home, "resume", "0001")
        wait_for(lambda: _in_state(home, "completed"), timeout=180, every=0.1)
        assert d.poll() is None
        ftctl(home, "shutdown", "--wait", "30")
        assert d.wait(timeout=30) == 0
    finally:
        _stop(d)
    assert _completed(home).adapter_sha256 == baseline.sha1
    starts = [e["data"] for e in _events(home, "training_started")]
    assert [s.get("resume_step", 0) for s in starts] == [0, stop]
    assert _survivors(home) == []


# --------------------------------------------------------------------------- g. control, no daemon


@pytest.mark.parametrize("action", ["pause", "cancel"])
def test_pause_or_cancel_with_no_daemon_is_applied_at_next_start(tmp_path, demo, baseline, action):
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo)
    p = ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env=crash_env(tmp_path, "daemon_before_commit:10"),
        check=False,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    wait_for(lambda: _survivors(home) == [], timeout=10)  # its worker died with it
    # the journal still says so: nobody is left to say otherwise
    assert _job(home).state == "checkpointing"
    out = ftctl(home, action, "0001").stdout
    assert "no daemon is running: it is applied at the next `ftctl start`" in out, out
    assert _job(home).requested == action
    p = ftctl(home, "start", "--until-idle", "--quiet", check=False)
    want = {"pause": "paused", "cancel": "cancelled"}[action]
    # --until-idle names a job left paused
    assert p.returncode == (1 if action == "pause" else 0), p.stderr
    assert _job(home).state == want
    # recovery applied the request; nothing was trained
    assert len(_events(home, "training_started")) == 1
    kinds = [e["type"] for e in _events(home) if e["stream"] == "job:0001"]
    crashed = kinds.index("crashed")
    assert kinds[crashed + 1] == want
    assert _events(home, "crashed")[0]["data"]["category"] == "daemon_died"
    if action == "cancel":
        return
    ftctl(home, "resume", "0001")
    ftctl(home, "start", "--until-idle", "--quiet")
    assert _completed(home).adapter_sha256 == baseline.sha1
    # step 10 was never committed
    assert _events(home, "training_started")[-1]["data"]["resume_step"] == 5
    assert _survivors(home) == []


# --------------------------------------------------------------------------- h. killed in recovery


def test_daemon_killed_during_its_own_recovery(tmp_path, demo, baseline):
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo)
    p = ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env=crash_env(tmp_path, "daemon_before_commit:10"),
        check=False,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    marker = tmp_path / "marker-during-recovery"
    p = ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env={"FTCTL_CRASH_AT": f"during_recovery:1:{marker}"},
        check=False,
    )
    assert p.returncode == -signal.SIGKILL and marker.exists(), p.stderr
    last = _events(home)[-1]
    # the first repair was committed, the second never started
    assert last["type"] == "daemon_stopped"
    assert _job(home).state == "checkpointing"
    ftctl(home, "start", "--until-idle", "--quiet")
    assert _completed(home).adapter_sha256 == baseline.sha1
    assert len(_events(home, "crashed")) == 1  # the half-done recovery did not crash the job twice
    assert json.loads(ftctl(home, "recover", "--dry-run", "--json").stdout)["repairs"] == []
    assert _survivors(home) == []


# --------------------------------------------------------------------------- i. inbox


def test_inbox_rejects_bad_files_untouched_and_trains_good_ones(tmp_path, demo):
    home = make_workspace(tmp_path / "ws", demo.model_dir, iters=10, save_every=5)
    bad = b'{"text": "fine"}\nnot json at all\n{"messages": 3}\n\xff\xfe broken bytes\n'
    good = demo.train.read_bytes()
    (home / "inbox" / "bad.jsonl").write_bytes(bad)
    (home / "inbox" / "good.jsonl").write_bytes(good)
    ftctl(home, "start", "--until-idle", "--quiet")
    assert sorted(p.name for p in (home / "inbox").glob("*.jsonl")) == []
    assert (home / "inbox" / "rejected" / "bad.jsonl").read_bytes() == bad
    accepted = list((home / "inbox" / "accepted").glob("*good.jsonl"))
    assert len(accepted) == 1 and accepted[0].read_bytes() == good
    rejected = _events(home, "job_rejected")
    assert (
        len(rejected) == 1
        and rejected[0]["data"]["name"] == "bad"
        and rejected[0]["data"]["reasons"]
    )
    submitted = _events(home, "job_submitted")
    assert len(submitted) == 1 and submitted[0]["data"]["name"] == "good"
    job = submitted[0]["data"]["job"]
    assert accepted[0].name == f"{job}-good.jsonl"
    assert _completed(home, job).step == 10


def test_inbox_is_read_while_a_job_trains_and_says_why_a_file_is_skipped(tmp_path, demo):
    """The daemon's loop must not block on the worker: a file dropped into inbox/ while job 0001
    trains is validated and queued at once (uppercase .JSONL too); a .json file is left where it
    is, and the log says why."""
    from ftctl.control.inbox import inbox_pending

    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo)
    marker = tmp_path / "marker-hang-mid-step-7"
    d = daemon(home, env={"FTCTL_HANG_AT": f"mid_step:7:{marker}"})
    try:
        wait_for(lambda: marker.exists() or d.poll() is not None, timeout=180, every=0.02)
        assert marker.exists(), d.communicate()
        old = time.time() - 60  # written a minute ago: settled
        for name in ("late.JSONL", "notes.json"):
            (home / "inbox" / name).write_bytes(demo.train.read_bytes())
            os.utime(home / "inbox" / name, (old, old))
        pending = {p["file"]: p["note"] for p in inbox_pending(Workspace(home))}
        assert (
            "rename it to .jsonl" in pending["notes.json"] and "queued" in pending["late.JSONL"]
        ), pending
        listed = " ".join(ftctl(home, "status").stdout.split())
        assert "inbox: notes.json" in listed and "rename it to .jsonl" in listed, listed
        late = wait_for(
            lambda: [e for e in _events(home, "job_submitted") if e["data"]["name"] == "late"],
            timeout=30,
        )
        assert _job(home).state in ("training", "checkpointing"), "job 0001 must still be training"
        assert late[0]["data"]["job"] == "0002"
        log = home / "logs" / "daemon.log"
        wait_for(
            lambda: "inbox: notes.json skipped: only .jsonl files are queued" in log.read_text(),
            timeout=30,
        )
        ftctl(home, "shutdown", "--wait", "60")
        assert d.wait(timeout=60) == 0
    finally:
        _stop(d)
    assert (home / "inbox" / "notes.json").exists() and not (home / "inbox" / "late.JSONL").exists()
    assert log.read_text().count("notes.json skipped") == 1  # said once, not every half second


# --------------------------------------------------------------------------- a dead daemon between commits


def test_job_left_crashed_by_a_dead_daemon_is_not_stranded(tmp_path, demo):
    """The daemon records a worker's death as `crashed`, then decides (requeue / fail / pause)
    and appends that in a second transaction (control/supervise.py, Attempt.finish). A daemon that
    dies between the two (SIGKILL, OOM killer, power cut) leaves the job in `crashed`. Recovery
    must not leave it there: `crashed` is not ACTIVE, so reconcile.plan skips it, the queue only
    takes `queued` jobs, and `ftctl resume` only takes `paused` ones: nothing ever trains it again."""
    from ftctl.control.ledger import Ledger
    from ftctl.core.state import DAEMON_STREAM, job_stream
    from ftctl.events import types as ev

    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo, *SHORT)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ledger = Ledger.open(home / "journal.db")
    try:
        ledger.commit(
            DAEMON_STREAM,
            ev.DaemonStarted(
                process=ev.ProcessId(dead.pid, time.time() - 60),
                host=socket.gethostname(),
                version="test",
            ),
        )
        ledger.commit(
            job_stream("0001"),
            ev.TrainingStarted(
                job="0001",
                attempt=1,
                worker_pid=dead.pid,
                worker_started_at=time.time() - 30,
                base_model=str(demo.model_dir),
            ),
        )
        # the daemon appended the crash of its worker ... and was killed before its decision
        ledger.commit(
            job_stream("0001"),
            ev.Crashed(
                job="0001",
                category="killed",
                step=3,
                exit_code=-9,
                signal=9,
                evidence="exit code -9 (signal SIGKILL)",
            ),
        )
    finally:
        ledger.close()
    ftctl(home, "start", "--until-idle", "--quiet")
    j = _job(home)
    assert j.state == "completed", (
        f"job 0001 is still {j.state!r} after a daemon start: a job the dead daemon left `crashed` "
        "is never requeued (recovery only repairs training/checkpointing jobs)"
    )


# --------------------------------------------------------------------------- d. warm standby


def _standby_pids(home) -> list[int]:
    log = (home / "logs" / "daemon.log").read_text()
    return [int(m) for m in re.findall(r"standby worker started \(pid (\d+)\)", log)]


def test_the_standby_takes_the_restart_and_the_next_job_and_dies_with_the_daemon(
    tmp_path, demo, baseline
):
    """standby: true (default), its spare started at a worker's first step (the seam
    FTCTL_STANDBY_AFTER_LOADS=0). Job 0001 is killed at step 33: its restart (at once: the first in its
    window) is the spare that was started at attempt 1's first step — training_started names the
    spare's pid and start time, the spare's output after assignment is in the job log (from where
    the crash evidence is read), and the adapter is still the uninterrupted run's. Job 0002 starts
    on the next spare. When the daemon stops, no worker of the workspace is left, spare included."""
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    for name in ("job1", "job2"):
        _submit(home, demo, "--name", name, "--again")
    marker = tmp_path / "marker-mid-step-33"
    d = daemon(
        home,
        "--until-idle",
        env={"FTCTL_CRASH_AT": f"mid_step:33:{marker}", "FTCTL_STANDBY_AFTER_LOADS": "0"},
    )
    try:
        _, err = d.communicate(timeout=300)
        assert d.returncode == 0, err
    finally:
        _stop(d)
    assert marker.exists()
    spares = _standby_pids(home)
    starts = [e for e in _events(home, "training_started")]
    pids = [(e["data"]["job"], e["data"]["attempt"], e["data"]["worker_pid"]) for e in starts]
    assert [p[:2] for p in pids] == [("0001", 1), ("0001", 2), ("0002", 1)], pids
    # the first worker was spawned cold: the daemon had no spare yet
    assert pids[0][2] not in spares
    assert pids[1][2] == spares[0] and pids[2][2] == spares[1], (pids, spares)
    (rq,) = _events(home, "requeued")
    crashed = _events(home, "crashed")[0]
    assert (
        rq["data"]["not_before"] <= _epoch(crashed["ts"]) + 0.01
        and "at once" in rq["data"]["reason"]
    ), rq
    # no backoff, no cold start in between
    assert _epoch(starts[1]["ts"]) - _epoch(crashed["ts"]) < 1.0
    job_log = (home / "logs" / "job-0001.log").read_text()
    assert f"worker pid {spares[0]}: job 0001" in job_log  # the spare's output moved to the job log
    assert _completed(home).adapter_sha256 == baseline.sha1
    assert _completed(home, "0002").adapter_sha256 == baseline.sha2
    assert _survivors(home) == []
    assert not (home / "run" / "standby.json").exists()


@pytest.mark.parametrize("standby", [False, True])
def test_standby_false_or_a_short_job_keeps_no_spare(tmp_path, demo, standby):
    """standby: false never starts a spare; standby: true (the default) starts one only once the worker
    has trained ten times as long as it took to load — never in a 10-step job, so it never pays for
    the spare's imports."""
    home = make_workspace(tmp_path / "ws", demo.model_dir, standby=standby)
    _submit(home, demo, *SHORT)
    d = daemon(home, "--until-idle")
    try:
        _, err = d.communicate(timeout=180)
        assert d.returncode == 0, err
    finally:
        _stop(d)
    assert _completed(home).step == 10
    assert _standby_pids(home) == [] and not (home / "logs" / "standby.log").exists()


def test_an_early_spare_creates_nothing_and_one_on_another_blas_is_replaced(tmp_path, demo):
    """`ftctl lora`'s spare is started before its workspace exists (control/standby.py early): it
    creates nothing there (no folder, no log) and its news waits for the daemon that takes it. A
    spare started on one BLAS is dismissed, and another started, when the job's config chose
    another: no job would take it (bit-exactness holds within one BLAS only)."""
    from helpers import stray_workers

    from ftctl.control.standby import Standby, early

    home = tmp_path / "not-yet"
    spare = early(Workspace(home))
    first = spare.w
    try:
        assert first is not None and first.proc.poll() is None and first.log_path is None
        assert not home.exists()
        ((said, level),) = spare.unsaid
        assert (
            said
            == (
                f"standby worker started (pid {first.id.pid}, before its workspace existed: it logs "
                "nothing until its job)"
            )
            and level == "info"
        )
        heard: list[str] = []
        spare.attach(lambda text, level="info": heard.append(text))
        assert heard == [said] and spare.unsaid == []
        other = {**spare.w_env, "OPENBLAS_NUM_THREADS": "1"}
        spare.ensure(other)
        assert first.proc.poll() is not None  # dismissed, reaped
        assert spare.w is not first and spare.w.proc.poll() is None and spare.w_env == other
        assert not home.exists()
    finally:
        spare.dismiss()
    assert stray_workers(home) == []
    ws = Workspace(make_workspace(tmp_path / "ws", demo.model_dir))
    spare = Standby(ws, {})
    try:
        spare.ensure({})
        assert spare.w.log_path == ws.logs / "standby.log"
    finally:
        spare.dismiss()
    assert stray_workers(ws.home) == []


def test_status_shows_the_standby_and_its_memory_while_a_job_trains(tmp_path, demo):
    """`ftctl status` (read-only: it reads run/standby.json, never the process's memory itself)
    names the live daemon's spare and its RSS; after `ftctl shutdown` no worker is left."""
    from helpers import status

    home = make_workspace(tmp_path / "ws", demo.model_dir)
    _submit(home, demo, "--set", "iters=400", "--set", "save_every=100")
    d = daemon(home, env={"FTCTL_STANDBY_AFTER_LOADS": "0"})
    try:
        # its RSS is refreshed every 2 s at most while it imports: wait for the figure of a ready spare
        spare = wait_for(
            lambda: (s := status(home)["daemon"]["standby"]) and s["rss_bytes"] > 40e6 and s,
            timeout=120,
            every=0.2,
        )
        assert spare["pid"] in _standby_pids(home), spare
        assert f"standby worker pid {spare['pid']} (" in status(home)["daemon"]["summary"]
        ftctl(home, "shutdown")
        d.wait(timeout=120)
    finally:
        _stop(d)
    assert _survivors(home) == []
    assert status(home)["daemon"]["standby"] is None
