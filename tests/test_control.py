"""The control layer in-process, no training: the daemon's stop is always recorded, the CLI's
internal-error handler survives a vanished file system, a job's config_sha256 hashes exactly the
recorded config, and the worker protocol's decoders take anything without crashing."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftctl.adapters import protocol as P
from ftctl.adapters.workspace import Workspace, init_workspace
from ftctl.control.daemon import Daemon
from ftctl.control.ledger import Ledger
from ftctl.control.reporter import Reporter
from ftctl.control.submit import submit
from ftctl.core.state import lineage_stream
from ftctl.events import types as T


def chat(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
    )


@pytest.fixture
def ws(tmp_path, demo) -> Workspace:
    return init_workspace(tmp_path / "home", str(demo.model_dir), {"min_free_disk_gb": 0.0})


def events(ws: Workspace) -> list[T.EventBase]:
    ledger = Ledger(ws.open_journal())
    try:
        return [r.event for r in ledger.journal.read()]
    finally:
        ledger.close()


class Notes(Reporter):
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def note(self, text: str, level: str = "info") -> None:
        self.lines.append((level, text))


def test_a_broken_ftctl_yaml_does_not_stop_an_idle_daemon(ws):
    """Regression: a YAML syntax error made the idle daemon exit 2 without recording its stop."""
    ws.config_path.write_text("model: [unclosed\n")
    notes = Notes()
    assert Daemon(ws, until_idle=True, report=notes).run() == "queue empty (--until-idle)"
    assert type(events(ws)[-1]) is T.DaemonStopped
    skipped = [t for lvl, t in notes.lines if "consolidation skipped" in t]
    assert len(skipped) == 1 and "ftctl.yaml" in skipped[0] and "line 1" in skipped[0], notes.lines


def test_an_internal_error_in_the_daemon_loop_is_recorded_and_releases_the_lock(ws, monkeypatch):
    def boom(self):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(Daemon, "scan_inbox", boom)
    with pytest.raises(RuntimeError):
        Daemon(ws, until_idle=True).run()
    last = events(ws)[-1]
    assert (
        type(last) is T.DaemonStopped
        and last.reason == "internal error: RuntimeError: simulated bug"
    )
    monkeypatch.undo()
    # the lock was released
    assert Daemon(ws, until_idle=True).run() == "queue empty (--until-idle)"
    assert "internal error: RuntimeError: simulated bug" in (ws.logs / "daemon.log").read_text()


def test_internal_error_handler_survives_a_vanished_file_system(ws, capsys, monkeypatch):
    """Regression: with the workspace's mount gone the handler itself raised (ENOTCONN)."""
    from ftctl.cli import jobs as jobs_cli
    from ftctl.cli import main as m

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    def gone(self):
        raise OSError(
            errno.ENOTCONN, "Transport endpoint is not connected", str(self.home / "logs")
        )

    monkeypatch.setattr(jobs_cli, "_ledger", boom)
    monkeypatch.setattr(Workspace, "logs", property(gone))
    code = m.main(["status", "--home", str(ws.home)])
    err = " ".join(capsys.readouterr().err.split())
    assert (
        code == 2
        and "internal error: RuntimeError: simulated bug" in err
        and "Committed events are safe" in err
    )


def _recorded_sha(body_config: dict) -> str:
    return hashlib.sha256(msgspec.json.encode(body_config, order="sorted")).hexdigest()


def test_config_sha256_hashes_exactly_the_recorded_config_also_after_a_promotion(ws, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(chat(i) for i in range(40)) + "\n")
    ledger = Ledger(ws.open_journal())
    try:
        submit(ws, ledger, data, overrides=["learning_rate=3e-4"])
        # as if the lineage had consolidated: jobs now train on v0001
        promoted = str(ws.models / "v0001")
        shutil.copytree(ledger.state.lineages["main"].base_model, promoted)
        ledger.commit(
            lineage_stream("main"),
            T.ConsolidationStarted(
                lineage="main",
                version=1,
                base_model=ledger.state.lineages["main"].base_model,
                adapter_path="a",
                adapter_sha256="b",
                temp_path="t",
            ),
        )
        ledger.commit(
            lineage_stream("main"),
            T.BasePromoted(
                lineage="main",
                version=1,
                model_path=promoted,
                weights_sha256="w",
                previous_base="x",
            ),
        )
        submit(ws, ledger, data)
        jobs = ledger.state.jobs
        assert jobs["0002"].config.model == promoted
    finally:
        ledger.close()
    bodies = [json.loads(T.encode(e)) for e in events(ws) if isinstance(e, T.JobSubmitted)]
    assert [b["config"]["model"] for b in bodies][1] == promoted
    for b, job in zip(bodies, ("0001", "0002")):
        assert _recorded_sha(b["config"]) == b["config_sha256"] == jobs[job].config_sha256, job


def test_an_old_flat_checkpoint_committed_is_read_as_the_current_record(tmp_path):
    from ftctl.events.journal import Journal

    j = Journal.create(tmp_path / "j.db")
    try:
        j.append(
            "job:0001",
            [
                T.CheckpointCommittedV1(
                    job="0001",
                    step=5,
                    global_step=45,
                    path="p",
                    manifest_sha256="m",
                    bytes=7,
                    val_loss=1.5,
                )
            ],
        )
        (rec,) = j.read()
        assert rec.event == T.CheckpointCommitted(
            job="0001",
            checkpoint=T.CheckpointRecord(
                step=5, global_step=45, path="p", manifest_sha256="m", bytes=7, val_loss=1.5
            ),
        )
    finally:
        j.close()


# --------------------------------------------------------------------------- the worker protocol

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGES = P.WorkerMessage.__args__


@FUZZ
@given(st.data())
def test_every_message_round_trips(data):
    typ = data.draw(st.sampled_from(MESSAGES))
    msg = data.draw(st.from_type(typ))
    got = P.decode_message(P.encode(msg))  # never refused: a NaN or inf arrives as null
    if _finite(msgspec.to_builtins(msg)):
        assert got == msg


def test_a_float_that_is_not_finite_arrives_as_none():
    """Every float field of a message takes null: the fuzz above draws an inf only now and then."""
    for typ in MESSAGES:
        for name, ftype in typ.__annotations__.items():
            if "float" in str(ftype):
                assert "None" in str(ftype), (
                    f"{typ.__name__}.{name}: {ftype} refuses the null a NaN or inf becomes"
                )


def _finite(v) -> bool:
    if isinstance(v, float):
        return v == v and abs(v) != float("inf")
    if isinstance(v, dict):
        return all(map(_finite, v.values()))
    return all(map(_finite, v)) if isinstance(v, list) else True


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_message_decoders_refuse_garbage_with_protocol_error_only(line):
    for decode in (P.decode_message, P.decode_control, P.decode_plan):
        try:
            decode(line)
        except P.ProtocolError:
            pass


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["t", "step", "global_step", "metrics", "checkpoint", "category", "message"]
        ),
        st.none()
        | st.integers()
        | st.floats()
        | st.text(max_size=5)
        | st.sampled_from(["step", "report", "checkpoint", "error", "loaded", "stop"]),
        max_size=6,
    )
)
def test_message_decoders_refuse_wrong_shapes(obj):
    line = json.dumps(obj).encode()
    for decode in (P.decode_message, P.decode_control):
        try:
            msg = decode(line)
        except P.ProtocolError:
            continue
        assert isinstance(msg, P.Message)


# --------------------------------------------------------------------------- logs at a sane rate


def test_progress_lines_come_at_a_sane_rate():
    from ftctl.control.reporter import Every

    t = [0.0]
    every = Every(1000, seconds=60, clock=lambda: t[0])
    due = []
    for step in range(5, 1001, 5):  # a report every 5 steps, one step per 0.1 s
        t[0] = step * 0.1
        if every.due(step):
            due.append(step)
    assert due[0] == 5 and due[-1] == 1000
    assert len(due) <= 12, due  # 200 reports -> about one line per tenth of the run
    slow = Every(1000, seconds=60, clock=lambda: t[0])
    assert slow.due(5) and not slow.due(6)
    t[0] += 61
    assert slow.due(7)  # at least once a minute on a slow run


def test_logs_are_rotated_past_their_cap(tmp_path):
    from ftctl.adapters import logs

    log = tmp_path / "daemon.log"
    for i in range(400):
        logs.append(log, f"line {i} " + "x" * 100, max_bytes=4096)
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["daemon.log", "daemon.log.1", "daemon.log.2", "daemon.log.3"]
    assert all(p.stat().st_size <= 4096 + 200 for p in tmp_path.iterdir())
    assert "line 399" in log.read_text() and oct(log.stat().st_mode & 0o777) == "0o600"


def test_the_restart_window_reads_journal_times_as_utc(monkeypatch):
    """Regression: a journal timestamp (UTC) was read as local time, so east of UTC recent crashes
    looked hours old and never used up the restart budget."""
    import time
    from datetime import datetime, timezone

    from ftctl.events.types import ts_epoch

    want = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc).timestamp()
    for tz in ("Asia/Tokyo", "America/Los_Angeles", "UTC"):
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        assert ts_epoch("2026-11-23T12:00:00.000000Z") == want, tz
    monkeypatch.undo()
    time.tzset()


def test_the_first_restart_in_the_window_is_at_once_then_backoff_doubles_up_to_its_cap():
    from ftctl.core.config import RestartPolicy
    from ftctl.core.crash import after_crash
    from ftctl.core.state import CrashRecord
    from ftctl.events.journal import utc_now

    policy = RestartPolicy(max_restarts=10, window_s=300.0, backoff_s=2.0, backoff_max_s=5.0)
    crashes, delays = [], []
    for step in range(5):
        crashes.append(
            CrashRecord(ts=utc_now(), category="killed", step=step, exit_code=-9, signal=9)
        )
        d = after_crash(crashes, time.time(), resume_step=0, policy=policy)
        assert d.action == "requeue", d
        delays.append(d.delay_s)
    assert delays == [0.0, 2.0, 4.0, 5.0, 5.0]
    assert after_crash(crashes[:1], time.time(), resume_step=0, policy=policy).reason.endswith(
        ", at once"
    )


def test_a_later_job_warm_starts_from_the_checkpoint_its_head_published_not_its_last(ws, demo):
    """result: best published job 1's step-10 checkpoint though it trained to 20: job 2 of the
    lineage continues from those weights (and the optimizer moments saved with them), its global
    step after job 1's last."""
    sub = submit(ws, Ledger(ws.open_journal()), demo.train, valid=demo.valid)
    ledger = Ledger(ws.open_journal())
    try:
        j = ledger.state.jobs[sub.job]
        ledger.commit(
            f"job:{j.job}",
            T.TrainingStarted(
                job=j.job, attempt=1, worker_pid=1, worker_started_at=1.0, base_model=j.config.model
            ),
        )
        for step, val in ((10, 1.0), (20, 2.0)):
            rec = T.CheckpointRecord(
                step=step,
                global_step=step,
                path=f"ck/{step}",
                manifest_sha256="x",
                bytes=1,
                val_loss=val,
                val_step=step,
            )
            ledger.commit(
                f"job:{j.job}",
                T.CheckpointStarted(job=j.job, step=step, global_step=step),
                T.CheckpointCommitted(job=j.job, checkpoint=rec),
            )
        ledger.commit(
            f"job:{j.job}",
            T.Completed(
                job=j.job,
                step=20,
                global_step=20,
                adapter_path="a",
                adapter_sha256="s",
                checkpoint="ck/10",
                result="best",
                result_step=10,
                result_val_loss=1.0,
            ),
        )
    finally:
        ledger.close()
    nxt = submit(ws, Ledger(ws.open_journal()), demo.train, valid=demo.valid, again=True)
    d = Daemon(ws)
    d.ledger = Ledger(ws.open_journal())
    try:
        assert d._warm_start(d.ledger.state.jobs[nxt.job]) == ("ck/10", 20, sub.job)
    finally:
        d.ledger.close()
