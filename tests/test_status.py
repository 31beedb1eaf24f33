"""Read commands tell the truth: a dead daemon is not reported running, a training job shows its
live step, stale notes are dropped, an ETA is given, and `status`/`history` select what they show.
All in-process, on journals written by hand: nothing trains."""

from __future__ import annotations

import gc
import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import pytest
from helpers import run

from ftctl.adapters import process
from ftctl.adapters.workspace import Workspace
from ftctl.control import status as S
from ftctl.control.ledger import Ledger
from ftctl.core.crash import suggestion
from ftctl.core.state import DAEMON_STREAM, JobState, job_stream
from ftctl.events import journal as journal_mod
from ftctl.events import types as ev

ROOT = Path(__file__).resolve().parent.parent


def chat(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
    )


def submit(home: Path, tmp_path: Path, capsys, *extra: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(chat(i) for i in range(40)) + "\n")
    assert run(capsys, "submit", data, "--home", home, "--set", "iters=60", *extra)[0] == 0


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def ckpt(step: int) -> ev.CheckpointRecord:
    return ev.CheckpointRecord(
        step=step,
        global_step=step,
        path=f"/nowhere/step-{step:08d}",
        manifest_sha256="0" * 64,
        bytes=1,
    )


def metric(step: int) -> ev.Metrics:
    return ev.Metrics(
        step=step,
        global_step=step,
        loss=2.5,
        lr=1e-4,
        tokens_per_s=100.0,
        peak_mem_gb=0.1,
        trained_tokens=step * 50,
    )


def ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(ledger: Ledger, job: str, m: ev.Metrics, at: float, monkeypatch) -> None:
    monkeypatch.setattr(journal_mod, "utc_now", lambda: ts(at))
    ledger.journal.record_metric(job, m)
    monkeypatch.undo()


def start_training(ledger: Ledger, attempt: int = 1) -> None:
    ledger.commit(
        job_stream("0001"),
        ev.TrainingStarted(
            job="0001",
            attempt=attempt,
            worker_pid=dead_pid(),
            worker_started_at=time.time() - 30,
            base_model="/m",
        ),
    )


def dead_daemon_training(home: Path, tmp_path: Path, capsys, *, checkpoint: bool = True) -> None:
    """A journal as a SIGKILLed daemon leaves it: daemon_started, job 0001 training at step 23,
    its last committed checkpoint at step 20 (or none)."""
    submit(home, tmp_path, capsys)
    ledger = Ledger.open(home / "journal.db")
    try:
        ledger.commit(
            DAEMON_STREAM,
            ev.DaemonStarted(
                process=ev.ProcessId(dead_pid(), time.time() - 60),
                host=socket.gethostname(),
                version="test",
            ),
        )
        start_training(ledger)
        if checkpoint:
            ledger.commit(
                job_stream("0001"),
                ev.CheckpointStarted(job="0001", step=20, global_step=20),
                ev.CheckpointCommitted(job="0001", checkpoint=ckpt(20)),
            )
        ledger.journal.record_metric("0001", metric(23))
    finally:
        ledger.close()


def fingerprint(home: Path) -> tuple[str, int]:
    """The journal's bytes and last seq, once every connection this process left open is closed
    (the last one to close checkpoints the WAL into the main file)."""
    gc.collect()
    ledger = Ledger.open(home / "journal.db")
    try:
        n = ledger.journal.last_seq()
    finally:
        ledger.close()
    gc.collect()
    return hashlib.sha256((home / "journal.db").read_bytes()).hexdigest(), n


# --------------------------------------------------------------------------- 1. a dead daemon


def test_status_tells_a_dead_daemon_and_writes_nothing(ws, tmp_path, capsys):
    dead_daemon_training(ws, tmp_path, capsys)
    before = fingerprint(ws)
    code, out, _ = run(capsys, "status", "--home", ws)
    assert code == 0
    assert "daemon not running: daemon pid" in out and "died without recording its stop" in out
    assert "the daemon died" in out and "at step 23" in out and "resumes from step 20" in out
    assert "(daemon dead)" in out and "23/60" in out

    code, out, _ = run(capsys, "status", "--json", "--home", ws)
    st = json.loads(out)
    d = st["daemon"]
    assert (
        d["alive"] is False
        and d["running"] is False
        and d["died"] is True
        and d["recorded_running"] is True
    )
    assert "not running" in d["summary"]
    j = st["jobs"][0]
    assert j["state"] == "training" and j["stale"] is True and j["eta_s"] is None
    assert j["step"] == 20 and j["checkpoint_step"] == 20 and j["live_step"] == 23
    assert "`ftctl start` it resumes from step 20 (its last committed checkpoint)" in j["note"]

    code, out, _ = run(capsys, "status", "1", "--home", ws)
    assert code == 0 and "died without recording its stop" in out and "resumes from step 20" in out
    run(capsys, "status", "1", "--json", "--home", ws)
    run(capsys, "history", "--home", ws)
    code, out, _ = run(capsys, "shutdown", "--home", ws)
    assert code == 0 and "no daemon is running; nothing to stop" in out
    assert fingerprint(ws) == before  # byte-identical journal, no new event
    assert not (ws / "run" / "daemon.lock").exists()  # the probe creates nothing either

    code, out, _ = run(capsys, "pause", "1", "--home", ws)
    assert code == 0 and "no daemon is running: it is applied at the next `ftctl start`" in out
    assert "within a second" not in out


def test_a_live_daemon_is_running_and_pause_says_within_a_second(ws, tmp_path, capsys):
    dead_daemon_training(ws, tmp_path, capsys)
    fd = process.acquire_lock(Workspace(ws).lock_path)  # this process plays the daemon
    try:
        _, out, _ = run(capsys, "status", "--json", "--home", ws)
        st = json.loads(out)
        assert st["daemon"]["alive"] is True and st["daemon"]["running"] is True
        assert st["jobs"][0]["stale"] is False and st["jobs"][0]["live_step"] == 23
        code, out, _ = run(capsys, "pause", "1", "--home", ws)
        assert (
            code == 0
            and "the daemon acts on it within a second: it checkpoints and pauses it" in out
        )
    finally:
        process.release_lock(fd)


def test_submit_says_who_trains_the_job_as_the_daemon_lock_says(ws, tmp_path, capsys):
    """ "run `ftctl start` to train" was printed while a daemon was running: the lock is asked."""
    data = tmp_path / "e.jsonl"
    data.write_text("\n".join(chat(i + 100) for i in range(40)) + "\n")
    _, out, _ = run(capsys, "submit", data, "--home", ws)
    assert "queued job 0001" in out and out.rstrip().endswith("run `ftctl start` to train"), out
    dead_daemon_training(ws, tmp_path, capsys)  # job 0002 training, its daemon recorded running
    _, out, _ = run(capsys, "submit", data, "--again", "--home", ws)
    assert "run `ftctl start` to train (the last daemon died without recording its stop" in out
    fd = process.acquire_lock(Workspace(ws).lock_path)  # this process plays the live daemon
    try:
        pid = json.loads(run(capsys, "status", "--json", "--home", ws)[1])["daemon"]["pid"]
        _, out, _ = run(capsys, "submit", data, "--again", "--home", ws)
        out = " ".join(out.split())
        assert "run `ftctl start`" not in out
        assert (
            f"queued job 0004 (40 valid chat examples of 40); the running daemon (pid {pid}) picks "
            "it up after 3 job(s) queued or training before it (0001, 0002, 0003)" in out
        ), out
    finally:
        process.release_lock(fd)


def test_no_checkpoint_yet_says_it_restarts_from_step_0(ws, tmp_path, capsys):
    dead_daemon_training(ws, tmp_path, capsys, checkpoint=False)
    _, out, _ = run(capsys, "status", "1", "--json", "--home", ws)
    assert "it restarts from step 0 (no checkpoint was committed yet)" in json.loads(out)["note"]
    assert run(capsys, "recover", "--home", ws)[0] == 0
    _, out, _ = run(capsys, "crashes", "--json", "--home", ws)
    crash = json.loads(out)[-1]
    assert crash["category"] == "daemon_died"
    assert "restarts from step 0 (no checkpoint was committed yet)" in crash["suggestion"]
    assert "last checkpoint" not in crash["suggestion"]


def test_a_warm_started_job_is_at_its_base_global_step_before_its_first_checkpoint(
    ws, tmp_path, capsys
):
    """A job warm-started at global step 40 was shown at global_step 0 (status, the page) until its
    first checkpoint: the projection starts an attempt at base + its checkpoint's step."""
    submit(ws, tmp_path, capsys)
    ledger = Ledger.open(ws / "journal.db")
    try:
        ledger.commit(
            job_stream("0001"),
            ev.TrainingStarted(
                job="0001",
                attempt=1,
                worker_pid=dead_pid(),
                worker_started_at=time.time(),
                base_model="/m",
                warm_start_from="/ws/jobs/0000/checkpoints/step-00000040",
                parent_job="0000",
                global_step_base=40,
            ),
        )
        assert ledger.state.jobs["0001"].global_step == 40
        ledger.commit(
            job_stream("0001"),
            ev.CheckpointStarted(job="0001", step=5, global_step=45),
            ev.CheckpointCommitted(
                job="0001", checkpoint=msgspec.structs.replace(ckpt(5), global_step=45)
            ),
            ev.Crashed(job="0001", category="killed", step=7, suggestion="x"),
            ev.Requeued(job="0001", reason="restart"),
            ev.TrainingStarted(
                job="0001",
                attempt=2,
                worker_pid=dead_pid(),
                worker_started_at=time.time(),
                base_model="/m",
                resume_step=5,
                resume_checkpoint="/nowhere/step-00000005",
                global_step_base=40,
            ),
        )
        assert (ledger.state.jobs["0001"].step, ledger.state.jobs["0001"].global_step) == (5, 45)
    finally:
        ledger.close()
    st = json.loads(run(capsys, "status", "1", "--json", "--home", ws)[1])
    assert (st["global_step"], st["live_global_step"]) == (45, 45)
    _, out, _ = run(capsys, "status", "--home", ws)
    row = next(l for l in out.splitlines() if "0001" in l)
    assert re.search(r"│\s+5/60\s+│\s+45\s+│", row), row


def test_crash_suggestion_names_the_resume_step():
    assert suggestion("killed", 30).endswith(
        "it resumes from step 30 (its last committed checkpoint)"
    )
    assert suggestion("segfault", None).endswith(
        "it restarts from step 0 (no checkpoint was committed yet)"
    )
    assert suggestion("oom", None) == suggestion("oom", 5)  # says nothing about where it resumes


# --------------------------------------------------------------------------- 2-3. live step, notes, ETA


def test_live_step_eta_and_notes_that_are_still_true(ws, tmp_path, capsys, monkeypatch):
    submit(ws, tmp_path, capsys)
    w = Workspace(ws)
    ledger = Ledger.open(w.journal_path)
    fd = process.acquire_lock(w.lock_path)
    try:
        t0 = time.time()
        start_training(ledger)
        # attempt 1 got to 25, then was killed
        record(ledger, "0001", metric(25), time.time(), monkeypatch)
        ledger.commit(
            job_stream("0001"),
            ev.Crashed(job="0001", category="killed", step=25),
            ev.Requeued(job="0001", reason="restart 1/3 after killed, in 2 s", not_before=t0 + 4),
        )
        v = S.status(w, ledger, now=t0 + 3).jobs[0]
        # the lost steps do not count
        assert v.note == "restart 1/3 after killed, in 1 s" and v.live_step == 0
        v = S.status(w, ledger, now=t0 + 10).jobs[0]
        assert v.note == "restart 1/3 after killed"  # not_before has passed

        start_training(ledger, attempt=2)
        t1 = time.time() + 5
        record(ledger, "0001", metric(10), t1, monkeypatch)
        record(ledger, "0001", metric(20), t1 + 10, monkeypatch)
        v = S.status(w, ledger, now=t1 + 10).jobs[0]
        # the journal keeps it; the note drops it
        assert v.note == "" and v.job.reason.startswith("restart 1/3")
        assert v.live_step == 20 and v.job.step == 0
        # 40 steps left at 1 step/s
        assert v.eta_s == pytest.approx(40.0) and "1 steps/s" in v.eta_basis
        assert S.status(w, ledger, now=t1 + 25).jobs[0].eta_s == pytest.approx(25.0)
        every = v.job.config.steps_per_report  # seconds between reports at 1 step/s
        # a worker that stopped reporting
        late = S.status(w, ledger, now=t1 + 10 + max(3 * every, 30) + 1).jobs[0]
        assert late.eta_s is None and late.eta_basis.startswith("no progress report for"), (
            late.eta_basis
        )
        pid = ledger.state.jobs["0001"].worker.pid
        _, panel, _ = run(capsys, "status", "0001", "--home", ws)
        # which process trains it, under a live daemon
        assert re.search(rf"worker\s*│\s*pid {pid}\b", panel), panel
    finally:
        process.release_lock(fd)
        ledger.close()
    _, out, _ = run(capsys, "status", "--json", "--home", ws)
    j = json.loads(out)["jobs"][0]
    # lock released: none runs
    assert j["live_step"] == 20 and j["step"] == 0 and j["eta_s"] is None and j["stale"]
    assert j["note"].startswith(
        "the daemon died while this job was training at step 20: on `ftctl start` it restarts"
    )


def test_eta_from_tokens_per_second_with_one_report():
    from ftctl.core.config import Config

    j = JobState(job="0001", state="training", config=Config(model="/m", iters=60))
    report = {
        "step": 20,
        "global_step": 20,
        "tokens_per_s": 100.0,
        "trained_tokens": 1000,
        "ts": ts(1000.0),
    }
    eta, basis = S._eta(j, 20, [report], now=1000.0)
    assert eta == pytest.approx(40 * 50 / 100.0) and "100 tokens/s at 50 tokens/step" in basis
    # 25 s after that report the 20 s it promised are spent and no report came: not "0s" (the page
    # showed a hung job at 10/40 with ETA 0s), no estimate
    eta, basis = S._eta(j, 20, [report], now=1025.0)
    assert eta is None and basis.startswith("40 steps were due 5 s ago at 100 tokens/s"), basis
    assert basis.endswith("the last report is 25 s old: no estimate")


# --------------------------------------------------------------------------- 4. filters


def test_default_selection_hides_rejected_and_old_finished_jobs():
    states = (
        ["completed"] * 24 + ["paused", "rejected", "queued"] + ["completed"] * 18 + ["training"]
    )
    jobs = [JobState(job=f"{i:04d}", state=s) for i, s in enumerate(states, 1)]
    shown, hidden = S.select(jobs, set(), False, 20)
    ids = [j.job for j in shown]
    # the old paused one, then the last 20
    assert ids == ["0025"] + [f"{i:04d}" for i in range(27, 47)]
    assert hidden == {"rejected": 1, "older": 24}
    assert S.select(jobs, set(), True, 20) == (jobs, {})
    shown, hidden = S.select(jobs, {"rejected", "training"}, False, 20)
    assert [j.job for j in shown] == ["0026", "0046"] and hidden == {"other states": 44}


def test_status_state_and_all_flags(ws, tmp_path, capsys):
    submit(ws, tmp_path, capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert run(capsys, "submit", bad, "--home", ws)[0] == 1
    _, out, _ = run(capsys, "status", "--home", ws)
    assert (
        "0001" in out
        and "0002" not in out
        and "1 job(s) not shown (1 rejected)" in out
        and "--all" in out
    )
    _, out, _ = run(capsys, "status", "--all", "--home", ws)
    assert "0002" in out and "not shown" not in out
    _, out, _ = run(capsys, "status", "--state", "rejected", "--json", "--home", ws)
    assert [j["job"] for j in json.loads(out)["jobs"]] == ["0002"]
    _, out, _ = run(capsys, "status", "--json", "--home", ws)  # a program gets every job
    assert [j["job"] for j in json.loads(out)["jobs"]] == ["0001", "0002"]
    with pytest.raises(SystemExit) as e:
        run(capsys, "status", "--state", "nonsense", "--home", ws)
    assert e.value.code == 1


# --------------------------------------------------------------------------- 5. history


def test_history_last_n_and_since_seq_age_or_time(ws, tmp_path, capsys):
    submit(ws, tmp_path, capsys)
    run(capsys, "pause", "1", "--home", ws)
    run(capsys, "resume", "1", "--home", ws)

    def seqs(*args):
        code, out, err = run(capsys, "history", "--json", *args, "--home", ws)
        assert code == 0, err
        return [e["seq"] for e in json.loads(out)]

    assert seqs() == [1, 2, 3]
    assert seqs("-n", "2") == [2, 3] and seqs("-n", "0") == [] and seqs("-n", "9") == [1, 2, 3]
    assert seqs("--since", "1") == [2, 3]  # a sequence number, as before
    assert seqs("--since", "10m") == [1, 2, 3] and seqs("--since", "1d", "-n", "1") == [3]
    assert seqs("--since", "2999-01-01T00:00") == []
    assert seqs("--since", "2000-01-01T00:00:00+02:00") == [1, 2, 3]
    assert seqs("1", "-n", "1") == [3]  # of one job's stream
    with pytest.raises(SystemExit) as e:
        run(capsys, "history", "--since", "yesterday", "--home", ws)
    assert e.value.code == 1
    _, err = capsys.readouterr()
    assert "not a sequence number, a duration" in err


# --------------------------------------------------------------------------- 6. docs


def test_cli_doc_names_every_option_of_every_command():
    from ftctl.cli.main import build_parser

    doc = (ROOT / "docs" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, parser in sub.choices.items():
        for a in parser._actions:
            for opt in a.option_strings:
                if opt not in ("-h", "--help", "--home"):
                    assert f"{opt}" in doc and f"ftctl {name}" in doc, (name, opt)


def test_a_resume_under_another_environment_is_flagged_and_a_fresh_restart_clears_it(
    ws, tmp_path, capsys
):
    """The fingerprint each attempt recorded: a resume under another BLAS is said in status (note,
    --json) and history; an attempt that starts fresh is bit-exact again."""
    submit(ws, tmp_path, capsys)
    a = {
        "mlx": "0.32.4",
        "mlx_lm": "0.32.2",
        "blas": "openblas /x/libopenblas.so.0 (1 bytes)",
        "blas_threads": "2",
        "platform": "Linux-x86_64",
    }
    b = {**a, "blas": "reference /y/libblas.so.3 (2 bytes)", "blas_threads": "1"}
    changed = [
        "blas: openblas /x/libopenblas.so.0 (1 bytes) -> reference /y/libblas.so.3 (2 bytes)",
        "blas_threads: 2 -> 1",
    ]
    s = job_stream("0001")

    def attempt(ledger, n, env, resume=None, diff=()):
        ledger.commit(
            s,
            ev.TrainingStarted(
                job="0001",
                attempt=n,
                worker_pid=dead_pid(),
                worker_started_at=1.0,
                base_model="/m",
                env=env,
                resume_step=20 if resume else 0,
                resume_checkpoint=resume,
                env_changed=list(diff),
            ),
        )

    ledger = Ledger.open(ws / "journal.db")
    try:
        attempt(ledger, 1, a)
        ledger.commit(
            s,
            ev.CheckpointStarted(job="0001", step=20, global_step=20),
            ev.CheckpointCommitted(job="0001", checkpoint=ckpt(20)),
        )
        ledger.commit(
            s, ev.Crashed(job="0001", category="killed"), ev.Requeued(job="0001", reason="crash")
        )
        attempt(ledger, 2, b, resume=ckpt(20).path, diff=changed)
        j = ledger.state.jobs["0001"]
        assert j.env == b and j.env_changed == changed
        ledger.commit(
            s, ev.Crashed(job="0001", category="killed"), ev.Requeued(job="0001", reason="crash")
        )
        attempt(ledger, 3, b, resume=ckpt(20).path)  # same as the last: still mixed, still said
        assert ledger.state.jobs["0001"].env_changed == changed
    finally:
        ledger.close()
    code, out, _ = run(capsys, "status", "0001", "--json", "--home", ws)
    got = json.loads(out)
    assert got["env"] == b and got["env_changed"] == changed
    assert (
        "resumed under a different environment" in got["note"]
        and "no longer bit-exact" in got["note"]
    )
    code, out, _ = run(capsys, "history", "0001", "--home", ws)
    # the table folds long details
    flat = "".join(c for c in out if not c.isspace() and c not in "│┃")
    assert "NOTbit-exactwiththeearlierattempts" in flat and "openblaslibopenblas.so.0x2" in flat
    ledger = Ledger.open(ws / "journal.db")
    try:
        ledger.commit(
            s, ev.Crashed(job="0001", category="killed"), ev.Requeued(job="0001", reason="crash")
        )
        attempt(ledger, 4, a)  # from step 0: nothing of the earlier attempts is in it
        assert ledger.state.jobs["0001"].env_changed == []
    finally:
        ledger.close()
