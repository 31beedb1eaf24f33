"""A workspace is a folder: moved, copied or restored elsewhere, it keeps everything it committed.

The journal records every path relative to the workspace (an absolute one only outside it: a user's
model or data file), so a moved workspace resumes from its last checkpoint bit for bit; a journal of
an older ftctl, which recorded absolute paths, is read with those under its recorded root made
relative; a copy is a separate workspace that never takes the original's daemon or worker for its own.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import pytest
from helpers import (
    daemon,
    finished,
    ftctl,
    ftctl_json,
    history,
    leftovers,
    make_workspace,
    running,
    sha256_file,
    status,
    stray_workers,
    survivors,
    wait_for,
)

KILL_AT = 35  # the last step the journal saw reported (steps_per_report 5) when the daemon dies,
# 5 steps past its step-30 checkpoint (save_every 10): its worker stands still after step 36
HOLD_AT = KILL_AT + 1


def _held(home, tmp_path):
    """A daemon whose worker stands still after step HOLD_AT, its report of step KILL_AT recorded."""
    marker = tmp_path / f"held-{home.name}"
    d = daemon(home, env={"FTCTL_HANG_AT": f"mid_step:{HOLD_AT}:{marker}"})
    try:
        wait_for(lambda: marker.exists() or d.poll() is not None, timeout=300, every=0.05)
        assert marker.exists(), d.communicate()
        wait_for(lambda: status(home, "0001").get("live_step") == KILL_AT, timeout=60)
    except BaseException:
        if d.poll() is None:
            d.kill()
        raise
    return d


def _workspace_in_the_middle(tmp_path, demo):
    """A job of the baseline's config, its model *inside* the workspace (it moves with it), with
    committed checkpoints at steps 10, 20, 30 and its daemon SIGKILLed at step 35."""
    home = tmp_path / "ws"
    home.mkdir()
    shutil.copytree(demo.model_dir, home / "model")
    make_workspace(home, home / "model", save_every=10)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    d = _held(home, tmp_path)
    d.kill()
    d.wait(timeout=30)
    wait_for(lambda: not stray_workers(home), timeout=60)  # the worker died with its daemon
    committed = [
        e["data"]["checkpoint"]["step"]
        for e in history(home)
        if e["type"] == "checkpoint_committed"
    ]
    assert committed == [10, 20, 30]
    return home


def _resumes_bit_exact(home, baseline, from_step=30, original=()):
    """Train ``home`` to the end: bit-exact, from ``from_step``. ``original``: the pids of another
    workspace's daemon and worker that this one's journal names (it is a copy): still alive."""
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)
    if original:
        assert sorted(survivors(home)) == sorted(original)  # the original's, untouched
        s = status(home, "0001")
        assert s["state"] == "completed" and not leftovers(home)
        assert s["adapter_sha256"] == sha256_file(f"{s['adapter_path']}/adapters.safetensors")
    else:
        s = finished(home)
    assert s["adapter_sha256"] == baseline.sha1  # as if never interrupted, moved or copied
    starts = [e["data"] for e in history(home) if e["type"] == "training_started"]
    assert starts[-1]["resume_step"] == from_step
    assert starts[-1]["resume_checkpoint"] == f"jobs/0001/checkpoints/step-{from_step:08d}"
    assert s["adapter_path"] == str(home / "jobs" / "0001" / "adapters")  # status: where it is now
    return s


def _no_deletion(plan: dict) -> None:
    """A recovery plan (recover --dry-run --json) that deletes nothing and writes nothing off."""
    for r in plan["repairs"]:
        assert not (
            {"checkpoint_discarded", "checkpoint_corrupt", "debris_removed"} & set(r["events"])
        ), r
        assert not r.get("finding"), r
        assert "delete" not in r["what"] and "corrupt" not in r["what"], r


def test_a_moved_workspace_resumes_from_its_last_checkpoint_bit_for_bit(tmp_path, demo, baseline):
    home = _workspace_in_the_middle(tmp_path, demo)
    assert "model: model" in (home / "ftctl.yaml").read_text()  # a model inside moves with it
    moved = tmp_path / "elsewhere" / "ws2"
    moved.parent.mkdir()
    os.rename(home, moved)  # `mv`
    plan = ftctl_json(moved, "recover", "--dry-run")
    _no_deletion(plan)
    assert any(
        "daemon_died" in " ".join(r["events"]) or "crashed" in r["events"] for r in plan["repairs"]
    )
    assert (moved / "jobs/0001/checkpoints/step-00000030/manifest.json").is_file()
    ftctl(moved, "recover")
    died = [e["data"] for e in history(moved) if e["type"] == "crashed"]
    assert [c["category"] for c in died] == ["daemon_died"]
    # the last step the journal saw reported, not the checkpoint's (30)
    assert died[0]["step"] == KILL_AT
    # and `reproduce` replays up to it: from the step-30 checkpoint to the step after 35
    r = json.loads(ftctl(moved, "reproduce", "0001", "--json", timeout=300).stdout)
    assert (r["from_step"], r["target_step"], r["crash_step"]) == (30, KILL_AT + 1, KILL_AT), r
    _resumes_bit_exact(moved, baseline)
    # every path the journal recorded is relative to the workspace
    for e in history(moved):
        for k in ("path", "adapter_path", "resume_checkpoint", "base_model", "valid_path"):
            v = e["data"].get(k)
            if isinstance(v, str) and k != "valid_path":
                assert not v.startswith(str(tmp_path)), e
        assert str(home) not in json.dumps(e["data"]), e


def test_a_copied_workspace_is_a_separate_one_and_never_takes_the_original_daemon(
    tmp_path, demo, baseline
):
    """`cp -a` while the original's daemon runs (its worker standing still after step 36): the copy's
    daemon recovers the copy, resumes from step 30 and completes bit-exact, and neither stops nor
    signals the original's daemon or worker; the original then carries on and completes too."""
    home = tmp_path / "ws"
    home.mkdir()
    shutil.copytree(demo.model_dir, home / "model")
    make_workspace(home, home / "model", save_every=10)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    d = _held(home, tmp_path)
    try:
        worker = status(home, "0001")["worker"]
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
        s = status(copy)
        assert s["daemon"]["alive"] is False  # the copy's own lock: nobody holds it
        assert status(home)["daemon"]["alive"] is True
        plan = ftctl_json(copy, "recover", "--dry-run")
        _no_deletion(plan)
        assert not any(
            "stop orphan" in r["what"] or "stop worker" in r["what"] for r in plan["repairs"]
        ), plan
        assert any("runs another workspace" in r["what"] for r in plan["repairs"]), plan
        _resumes_bit_exact(copy, baseline, original=(d.pid, worker["pid"]))
        died = [e["data"] for e in history(copy) if e["type"] == "crashed"]
        assert "for another workspace" in died[0]["evidence"] and died[0]["step"] == KILL_AT
        # the original was left alone: its daemon and its worker are the very same processes
        assert d.poll() is None and running(worker["pid"])
        assert status(home, "0001")["state"] == "training"
        assert not any(e["type"] == "crashed" for e in history(home))
        ftctl(home, "shutdown", "--wait", "120")  # releases the held worker: it checkpoints at 36
        assert d.wait(timeout=120) == 0
    finally:
        if d.poll() is None:
            d.kill()
    _resumes_bit_exact(home, baseline, from_step=HOLD_AT)
    assert not any(e["type"] == "crashed" for e in history(home))


def _as_old_journal(home):
    """Rewrite the journal as an ftctl before relative paths wrote it: every path the events hold
    absolute (under ``home``), no `paths` marker, no snapshot (older snapshot formats are ignored)."""
    keys = (
        "path",
        "adapter_path",
        "resume_checkpoint",
        "warm_start_from",
        "base_model",
        "data_path",
        "valid_path",
        "model_path",
        "temp_path",
        "previous_base",
    )

    def absolute(v):
        return v if not isinstance(v, str) or v.startswith("/") else f"{home}/{v}"

    def walk(d):
        for k, v in list(d.items()):
            if k in keys or (k == "checkpoint" and isinstance(v, str)):
                d[k] = absolute(v)
            elif k == "config" and isinstance(v, dict):
                v["model"] = absolute(v["model"])
            elif isinstance(v, dict):
                walk(v)

    con = sqlite3.connect(home / "journal.db")
    with con:
        for seq, body in con.execute("SELECT seq, body FROM events").fetchall():
            d = json.loads(body)
            walk(d)
            con.execute("UPDATE events SET body = ? WHERE seq = ?", (json.dumps(d), seq))
        con.execute("DELETE FROM meta WHERE key = 'paths'")
        con.execute("DELETE FROM snapshots")
    con.close()
    (home / "ftctl.yaml").write_text(
        (home / "ftctl.yaml").read_text().replace("model: model", f"model: {home}/model")
    )


def test_an_old_journal_of_absolute_paths_moved_elsewhere_recovers_and_resumes(
    tmp_path, demo, baseline
):
    home = _workspace_in_the_middle(tmp_path, demo)
    _as_old_journal(home)
    raw = sqlite3.connect(home / "journal.db").execute("SELECT body FROM events").fetchall()
    assert any(f"{home}/jobs/0001/checkpoints/step-00000030" in b for (b,) in raw)
    moved = tmp_path / "restored"
    os.rename(home, moved)
    from ftctl.events.journal import Journal

    with Journal.open(moved / "journal.db") as j:
        assert j.root == str(home)  # read off its first checkpoint's path
    plan = ftctl_json(moved, "recover", "--dry-run")
    _no_deletion(plan)
    s = status(moved, "0001")
    assert [c["path"] for c in s["checkpoints"]][-1] == str(
        moved / "jobs/0001/checkpoints/step-00000030"
    )
    assert s["base_model"] == str(moved / "model")  # the model inside the workspace moved with it
    # ftctl.yaml still names the old location (an older init wrote it absolute): fix it as a user would
    (moved / "ftctl.yaml").write_text(
        (moved / "ftctl.yaml").read_text().replace(f"model: {home}/model", "model: model")
    )
    _resumes_bit_exact(moved, baseline)


def test_recovery_reports_a_missing_checkpoint_and_deletes_nothing_committed(tmp_path, demo):
    """A committed checkpoint whose folder is gone is *missing*: said (recover, doctor, the daemon),
    never recorded corrupt, never deleted; the job resumes from the one before it, and a restored
    folder is used again. A folder in jobs/ or models/ that ftctl did not make is left alone."""
    home = _workspace_in_the_middle(tmp_path, demo)
    last = home / "jobs/0001/checkpoints/step-00000030"
    aside = tmp_path / "aside"
    os.rename(last, aside)
    mine = [home / "jobs" / "notes", home / "models" / "my-model", home / "jobs" / "0099" / "x.txt"]
    for p in mine:
        (p.parent if p.suffix else p).mkdir(parents=True, exist_ok=True)
        if p.suffix:
            p.write_text("mine")
    plan = ftctl_json(home, "recover", "--dry-run")
    missing = [r for r in plan["repairs"] if r.get("finding")]
    assert len(missing) == 1 and "step 30 is missing" in missing[0]["what"], plan
    for r in plan["repairs"]:
        assert not (
            {"checkpoint_discarded", "checkpoint_corrupt", "debris_removed"} & set(r["events"])
        )
        assert r.get("finding") or not r["what"].startswith("delete"), r
    out = ftctl(home, "recover").stdout
    assert "step 30 is missing" in out
    assert not any(e["type"] == "checkpoint_corrupt" for e in history(home))
    p = ftctl(home, "doctor", "--json", check=False)
    doc = json.loads(p.stdout)
    assert any(
        "step 30 is missing" in f["message"] and f["severity"] == "error" for f in doc["findings"]
    )
    os.rename(aside, last)  # restored: it is used again, nothing was written off
    plan = ftctl_json(home, "recover", "--dry-run")
    assert not [r for r in plan["repairs"] if r.get("finding")]
    for p in mine:
        assert p.exists(), p


@pytest.mark.parametrize(
    "recorded",
    ["jobs/0001/checkpoints/step-00000010", "/old/ws/jobs/0001/checkpoints/step-00000010"],
)
def test_paths_are_recorded_relative_and_old_absolute_ones_upcast(recorded):
    """Pure: the relocation of an old event, and how a root is read off an event."""
    from ftctl.events import types as ev

    c = ev.CheckpointRecord(step=10, global_step=10, path=recorded, manifest_sha256="x", bytes=1)
    e = ev.CheckpointCommitted(job="0001", checkpoint=c)
    out = ev.relocate(e, "/old/ws")
    assert out.checkpoint.path == "jobs/0001/checkpoints/step-00000010"
    assert ev.recorded_root(e) == ("" if not recorded.startswith("/") else "/old/ws")
    outside = ev.TrainingStarted(
        job="1", attempt=1, worker_pid=1, worker_started_at=1.0, base_model="/models/llama"
    )
    assert ev.relocate(outside, "/old/ws").base_model == "/models/llama"  # outside: kept absolute
    assert ev.relocate(outside, "/old/ws2").base_model == "/models/llama"
    prefix = ev.TrainingStarted(
        job="1", attempt=1, worker_pid=1, worker_started_at=1.0, base_model="/old/ws2/m"
    )
    assert ev.relocate(prefix, "/old/ws").base_model == "/old/ws2/m"  # a sibling, not inside


def test_daemon_died_records_the_last_reported_step_even_with_a_checkpoint_in_flight(ws, demo):
    """The cause of `daemon_died` recording 20 while the job had reported 30: it took the last
    *committed* checkpoint's step. A daemon killed while the step-30 checkpoint is being written (its
    `checkpoint_started` is committed, its `checkpoint_committed` never comes) left a job at checkpoint
    20 that had reported step 30 — and kept training meanwhile (the write runs in the background).
    Now the crash says the furthest step the journal saw: a report or a checkpoint begun."""
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.ledger import Ledger
    from ftctl.events import types as ev
    from ftctl.recovery import reconcile

    ftctl(ws, "submit", str(demo.train), "--valid", str(demo.valid))
    ledger = Ledger.open(ws / "journal.db")
    try:
        s = "job:0001"
        ledger.commit(
            s,
            ev.TrainingStarted(
                job="0001", attempt=1, worker_pid=1, worker_started_at=1.0, base_model="m"
            ),
        )
        for step in (10, 20):
            c = ev.CheckpointRecord(
                step=step,
                global_step=step,
                path=f"jobs/0001/checkpoints/step-{step:08d}",
                manifest_sha256="x",
                bytes=1,
            )
            ledger.commit(s, ev.CheckpointStarted(job="0001", step=step, global_step=step))
            ledger.commit(s, ev.CheckpointCommitted(job="0001", checkpoint=c))
        ledger.commit(s, ev.CheckpointStarted(job="0001", step=30, global_step=30))
        for step in (25, 30):
            ledger.journal.record_metric(
                "0001",
                ev.Metrics(
                    step=step,
                    global_step=step,
                    loss=1.0,
                    lr=1e-4,
                    tokens_per_s=1.0,
                    peak_mem_gb=0.1,
                    trained_tokens=step,
                ),
            )
        j = ledger.state.jobs["0001"]
        assert j.step == 20 and reconcile.reported_step(ledger, j) == 30
        (crash,) = [
            e
            for r in reconcile.plan(Workspace(ws), ledger)
            for e in r.events
            if isinstance(e, ev.Crashed)
        ]
        assert crash.category == "daemon_died" and crash.step == 30
        assert "resumes from step 20" in crash.suggestion
    finally:
        ledger.close()
