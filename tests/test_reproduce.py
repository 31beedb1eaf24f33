"""`ftctl reproduce` with real workers and the tiny model: a poisoned example is reproduced and named (by the
daemon's own replay, which pauses the job, and by the command), a SIGKILL is not (and the job's files stay
byte-identical), a changed data file is refused, a pruned checkpoint falls back to the previous one, and
two replays trace identically. The verdict function is checked on its own, with a property."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import crash_env, ftctl, history, make_workspace, run, status
from hypothesis import given
from hypothesis import strategies as st

from ftctl.core.reproduction import Outcome, Step, judge

POISON_STEP = 8  # the step whose batch holds the poisoned example: after checkpoint 5, before 10


# --------------------------------------------------------------------------- the verdict (pure)


def test_verdict_cases():
    nan = [
        Step(step=6, loss=1.0, grad_norm=2.0),
        Step(step=7, loss="nan", grad_norm="nan", nonfinite_groups=["a", "b"], group_count=2),
    ]
    v = judge("nan", 8, "", Outcome(category="nan", step=8), nan)
    assert (v.verdict, v.first_nonfinite_step, v.first_nonfinite, v.failing_step) == (
        "reproduced",
        7,
        "loss and gradient norm",
        7,
    )
    # another step
    assert judge("nan", 8, "", Outcome(category="nan", step=9), nan).verdict == "different"
    assert judge("killed", 17, "", Outcome(category=None, step=18), []).verdict == "not reproduced"
    same = judge(
        "exception",
        4,
        "ValueError: bad row",
        Outcome(category="exception", step=4, message="ValueError: bad row"),
        [],
    )
    assert (same.verdict, same.failing_step) == ("reproduced", 5)
    other = judge(
        "exception",
        4,
        "ValueError: bad row",
        Outcome(category="exception", step=4, message="KeyError: 'x'"),
        [],
    )
    assert other.verdict == "different"
    grad = judge(
        "inf",
        3,
        "",
        Outcome(category="inf", step=3),
        [Step(step=3, loss=1.0, grad_norm="inf", nonfinite_groups=["b"])],
    )
    assert (grad.first_nonfinite, grad.groups) == ("gradient norm", ["b"])


_num = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["nan", "inf", "-inf"]),
)
_cat = st.sampled_from(["nan", "inf", "exception", "killed", "oom", "hang"])


@given(
    crash=_cat,
    crash_step=st.integers(0, 50),
    message=st.sampled_from(["", "ValueError: a", "ValueError: b"]),
    category=st.one_of(st.none(), _cat),
    step=st.integers(0, 50),
    replay_message=st.sampled_from(["", "ValueError: a"]),
    losses=st.lists(st.tuples(_num, _num), max_size=8),
)
def test_verdict_properties(crash, crash_step, message, category, step, replay_message, losses):
    trace = [Step(step=i + 1, loss=l, grad_norm=g) for i, (l, g) in enumerate(losses)]
    v = judge(
        crash,
        crash_step,
        message,
        Outcome(category=category, step=step, message=replay_message),
        trace,
    )
    same = (
        category == crash
        and step == crash_step
        and (crash in ("nan", "inf") or not message or message == replay_message)
    )
    # reproduced exactly when the replay failed like the crash, at its step; a clean replay never is
    assert (v.verdict == "reproduced") == same
    assert (v.verdict == "not reproduced") == (category is None)
    bad = [
        t.step
        for t in trace
        if not all(isinstance(x, float) and abs(x) != float("inf") for x in (t.loss, t.grad_norm))
    ]
    # the first step where anything went non-finite
    assert v.first_nonfinite_step == (bad[0] if bad else None)
    # the batch to blame: that first non-finite step, else the one that failed
    if category is not None:
        assert v.failing_step == (bad[0] if bad else step + 1)


# --------------------------------------------------------------------------- a poisoned example


# renamed pair keys (mlx-lm-lora's *_feature): the lines must be counted as the trainer reads them
RENAMED = {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"}


def _marker(demo, step: int, train: Path | None = None, cfg: dict | None = None) -> tuple[str, int]:
    """Text found in exactly one line of the training data (``train``: the demo's chat examples by
    default), of an example (a preference pair, with ``cfg``'s train_mode and keys) in the batch of
    ``step`` (TEST_CONFIG's batches): (the text, its line). The poison seam then makes that step's
    loss NaN (tests/test_alerts.py: scales it)."""
    from helpers import TEST_CONFIG
    from mlx_lm.utils import load_tokenizer

    from ftctl.adapters.batches import TrainBatches
    from ftctl.adapters.trainer import load_items
    from ftctl.core.config import decode_config, features
    from ftctl.core.dataset import record_lines, valid_records

    train, cfg = Path(train or demo.train), cfg or {}
    feats = features(decode_config({"model": "m", **cfg})[0])
    mode = cfg.get("train_mode", "sft")
    data = train.read_bytes()
    items = load_items(str(train), load_tokenizer(Path(demo.model_dir)), False, feats, mode)
    batches = TrainBatches(
        items, TEST_CONFIG["batch_size"], TEST_CONFIG["max_seq_length"], TEST_CONFIG["seed"]
    )
    records, lines = valid_records(data, feats), record_lines(data, feats)
    raw = data.decode().split("\n")
    for i in batches.indices(step - 1):
        r = records[i]
        text = json.dumps(r["messages"][1]["content"] if mode == "sft" else r["prompt"])[1:-1]
        if sum(text in line for line in raw) == 1:
            return text, lines[i]
    pytest.skip("no example of that batch has a unique text")


@pytest.fixture(scope="module")
def poisoned(request, tmp_path_factory, demo):
    """A job whose batch at POISON_STEP holds an example the poison seam makes NaN, run by the daemon
    until its NaN guard stopped it and its replay paused it: (home, the text, the example's line in
    the job's train.jsonl, its line in the submitted file). sft (the default): the demo's chat
    examples, submitted with --valid (the same lines). dpo: the demo's preference pairs under renamed
    keys, submitted without --valid (submit holds every 20th pair out: the lines differ)."""
    mode = getattr(request, "param", "sft")
    tmp = tmp_path_factory.mktemp(f"poison-{mode}")
    if mode == "sft":
        cfg, src, valid = {}, Path(demo.train), ["--valid", str(demo.valid)]
    else:
        cfg = {"train_mode": "dpo", **{f"{k}_feature": v for k, v in RENAMED.items()}}
        src, valid = tmp / "pairs.jsonl", []
        rows = [json.loads(x) for x in demo.preference["train"].read_text().splitlines()]
        src.write_text(
            "".join(json.dumps({RENAMED[k]: v for k, v in r.items()}) + "\n" for r in rows)
        )
    home = make_workspace(tmp / "ws", demo.model_dir, iters=20, **cfg)
    ftctl(home, "submit", str(src), *valid)
    text, line = _marker(demo, POISON_STEP, home / "jobs" / "0001" / "data" / "train.jsonl", cfg)
    (source_line,) = [n for n, l in enumerate(src.read_text().split("\n"), 1) if text in l]
    ftctl(home, "start", "--until-idle", "--quiet", env={"FTCTL_POISON": text}, check=False)
    return home, text, line, source_line


# a DPO job's non-finite loss is handled as SFT's: stopped, replayed, paused, its pair named
SFT_AND_DPO = pytest.mark.parametrize("poisoned", ["sft", "dpo"], indirect=True)


@SFT_AND_DPO
def test_the_daemon_replays_a_nan_and_pauses_the_job(poisoned):
    home, _, line, source_line = poisoned
    s = status(home, "0001")
    assert s["state"] == "paused", s
    assert s["crashes"][-1]["category"] == "nan" and s["crashes"][-1]["verdict"] == "reproduced"
    assert "reproduced" in s["reason"] and "lines" in s["reason"] and str(line) in s["reason"]
    e = [e["data"] for e in history(home) if e["type"] == "crash_reproduced"][0]
    assert e["by"] == "daemon" and e["crash"] == 1 and e["first_nonfinite_step"] == POISON_STEP
    assert (line, source_line) in [(x["line"], x["source_line"]) for x in e["examples"]]


def test_the_status_page_links_a_crash_to_its_reproduction(poisoned):
    """The page's crash timeline (control/dashboard.py) carries each crash's number and its latest
    replay: the verdict and the crash_reproduced event the link opens on the job page."""
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.dashboard import Viewer

    home, _, line, _ = poisoned
    viewer = Viewer(Workspace(home))
    try:
        (crash,) = viewer.crashes()
    finally:
        viewer.close()
    assert crash.number == 1 and crash.event.category == "nan"
    recorded = [e for e in history(home) if e["type"] == "crash_reproduced"][-1]
    assert crash.reproduced is not None and crash.reproduced.seq == recorded["seq"]
    assert (
        crash.reproduced.event.verdict == "reproduced"
        and str(line) in crash.reproduced.event.summary
    )


@SFT_AND_DPO
def test_reproduce_names_the_poisoned_line_and_traces_identically(
    poisoned, capsys, monkeypatch, tmp_path
):
    home, text, line, source_line = poisoned
    # the seam is active in the replay's worker as in the daemon's
    monkeypatch.setenv("FTCTL_POISON", text)
    traces = []
    for n in (1, 2):
        code, out, err = run(
            capsys, "reproduce", "1", "--trace", tmp_path / f"t{n}.jsonl", "--home", home
        )
        assert code == 0, err
        traces.append((tmp_path / f"t{n}.jsonl").read_bytes())
    assert (
        "REPRODUCED" in out
        and f"non-finite: the loss and gradient norm at step {POISON_STEP}" in " ".join(out.split())
    )
    # the failing batch's table: the example's (the pair's) line in the job's copy and in the
    # submitted file
    cells = [[c.strip() for c in row.split("│")] for row in out.splitlines() if "│" in row]
    assert any(c[2:4] == [str(line), str(source_line)] for c in cells), out
    e = [e["data"] for e in history(home) if e["type"] == "crash_reproduced"][-1]
    assert (e["verdict"], e.get("by", "user"), e["failing_step"]) == (
        "reproduced",
        "user",
        POISON_STEP,
    )
    assert (line, source_line) in [(x["line"], x["source_line"]) for x in e["examples"]]
    lines = ", ".join(str(x["line"]) for x in e["examples"])
    sources = ", ".join(str(x["source_line"]) for x in e["examples"])
    assert f"train.jsonl lines {lines} (lines {sources} of the submitted file)" in e["summary"]
    assert e["from_step"] == 5 and e["step"] == e["crash_step"]
    # determinism of the replay itself
    assert traces[0] == traces[1] and traces[0].count(b"\n") == e["target_step"] - 5
    rows = [json.loads(x) for x in traces[0].splitlines()]
    assert rows[POISON_STEP - 6]["loss"] == "nan" and rows[0]["loss"] != "nan"


# --------------------------------------------------------------------------- a SIGKILL


def _tree(home: Path) -> dict[str, str]:
    return {
        str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((home / "jobs").rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def killed(tmp_path_factory, demo):
    """A job SIGKILLed after step 17 with no restart budget: it fails, its checkpoints 5, 10 and (when its
    background write landed before the kill, two steps later) 15 committed: see _committed."""
    tmp = tmp_path_factory.mktemp("killed")
    home = make_workspace(tmp / "ws", demo.model_dir)
    ftctl(
        home,
        "submit",
        str(demo.train),
        "--valid",
        str(demo.valid),
        "--set",
        "restart.max_restarts=0",
    )
    ftctl(home, "start", "--until-idle", "--quiet", env=crash_env(tmp, "mid_step:17"), check=False)
    return home


def _committed(home: Path) -> list[int]:
    """The steps of job 0001's committed checkpoints, as the journal has them."""
    return [
        e["data"]["checkpoint"]["step"]
        for e in history(home)
        if e["type"] == "checkpoint_committed"
    ]


def test_a_kill_is_not_reproduced_and_nothing_of_the_job_changes(killed, capsys):
    s = status(killed, "0001")
    assert (
        s["state"] == "failed"
        and s["crashes"][-1]["category"] in ("killed", "oom")
        and s["crashes"][-1]["step"] == 17
    )
    before = _tree(killed)
    code, out, err = run(capsys, "reproduce", "1", "--home", killed)
    assert code == 0, err
    assert "NOT REPRODUCED" in out
    assert _tree(killed) == before  # byte-identical: the replay wrote only its scratch copy
    assert not list((killed / "run").glob("reproduce-*"))  # and removed it
    e = [e["data"] for e in history(killed) if e["type"] == "crash_reproduced"][-1]
    assert _committed(killed)[:2] == [5, 10]
    assert (e["verdict"], e["from_step"], e["step"], e["target_step"]) == (
        "not reproduced",
        _committed(killed)[-1],
        18,
        18,
    )
    assert status(killed, "0001")["crashes"][-1]["verdict"] == "not reproduced"
    code, out, _ = run(capsys, "crashes", "--home", killed)
    assert "not reproduced" in out


def test_changed_data_is_refused(killed, capsys):
    data = killed / "jobs" / "0001" / "data" / "train.jsonl"
    original = data.read_bytes()
    n = len([e for e in history(killed) if e["type"] == "crash_reproduced"])
    try:
        data.write_bytes(original.replace(b"plus", b"minus", 1))
        code, _, err = run(capsys, "reproduce", "1", "--home", killed)
    finally:
        data.write_bytes(original)
    assert (
        code == 1
        and "changed since the job was submitted" in err
        and "Nothing was run or recorded" in err
    )
    assert len([e for e in history(killed) if e["type"] == "crash_reproduced"]) == n


def test_a_pruned_checkpoint_falls_back_to_the_previous_one(killed, capsys):
    from ftctl.control.ledger import Ledger
    from ftctl.events import types as ev

    # what retention does: the event first, then the folder goes
    *_, previous, last = _committed(killed)  # 10, 15 or 5, 10: the newest, and the one before it
    ledger = Ledger.open(killed / "journal.db")
    try:
        c = next(c for c in ledger.state.jobs["0001"].checkpoints if c.step == last)
        ledger.commit(
            "job:0001",
            ev.CheckpointPruned(job="0001", step=last, path=c.path, reason="test: as retention"),
        )
    finally:
        ledger.close()
    shutil.rmtree(killed / c.path)  # recorded relative to the workspace
    code, out, err = run(capsys, "reproduce", "1", "--home", killed)
    assert code == 0, err
    assert (
        f"step {last}, was pruned by retention: replaying from checkpoint step {previous}"
        in " ".join(out.split())
    )
    e = [e["data"] for e in history(killed) if e["type"] == "crash_reproduced"][-1]
    assert (e["verdict"], e["from_step"]) == ("not reproduced", previous)


def test_a_job_with_no_crash(ws, demo, capsys):
    assert run(capsys, "submit", demo.train, "--home", ws)[0] == 0
    code, _, err = run(capsys, "reproduce", "1", "--home", ws)
    assert code == 1 and "has no recorded crash" in err and "--step S" in err
    code, _, err = run(capsys, "reproduce", "1", "--crash", "2", "--home", ws)
    assert code == 1


def test_ctrl_c_leaves_no_worker_no_scratch_and_records_nothing(killed):
    import signal
    import subprocess
    import sys

    from helpers import stray_workers, wait_for

    n = len([e for e in history(killed) if e["type"] == "crash_reproduced"])
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ftctl.cli",
            "reproduce",
            "1",
            "--until-crash",
            "--home",
            str(killed),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # as a terminal's Ctrl-C
    try:
        # the state, not a delay: its worker runs, on its scratch copy, writing the replay's log
        wait_for(
            lambda: (
                stray_workers(killed)
                and any(f.stat().st_size for f in (killed / "run").glob("reproduce-*/replay.log"))
            ),
            timeout=60,
            every=0.05,
        )
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "interrupted" in err
    wait_for(lambda: not stray_workers(killed), timeout=10)  # its worker went with it
    assert not list((killed / "run").glob("reproduce-*"))
    assert len([e for e in history(killed) if e["type"] == "crash_reproduced"]) == n


def test_a_warm_started_job_replays_from_its_parent_adapter_exactly(baseline, capsys, tmp_path):
    """Job 0002 of the baseline warm-started from job 0001's final adapter; its early checkpoints are pruned, so
    `--step 10` replays from the start of the job, from the parent adapter it recorded. The replay's losses
    give back, to the bit, the training reports the job itself recorded (mean loss of steps 6-10)."""
    from ftctl.events.journal import Journal

    code, out, err = run(
        capsys,
        "reproduce",
        "2",
        "--step",
        "10",
        "--trace",
        tmp_path / "t.jsonl",
        "--home",
        baseline.home,
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert (
        "ran cleanly up to step 10" in text
        and "warm-started from" in text
        and "jobs/0001/checkpoints" in text
    )
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[0]["global_step"] == 41
    with Journal.open(baseline.home / "journal.db") as j:
        reports = {m["step"]: m["loss"] for m in j.recent_metrics("0002", limit=100)}
    assert sum(r["loss"] for r in rows[5:10]) / 5 == reports[10]
    assert "nothing recorded" in out


def test_the_daemons_replay_of_a_crash_stops_when_the_user_pauses_cancels_or_shuts_down(
    ws, tmp_path, capsys
):
    """A replay after a crash runs inside the daemon's supervision: it asks, between polls of its
    worker, whether to stop — so `ftctl pause`, `cancel` and `shutdown` are acted on during it."""
    import types

    from ftctl.control import jobs
    from ftctl.control.ledger import Ledger
    from ftctl.control.supervise import Attempt, StopFlags
    from ftctl.core.state import DAEMON_STREAM, job_stream
    from ftctl.events import types as ev

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(40)))
    ftctl(ws, "submit", str(data))
    ledger = Ledger.open(ws / "journal.db")
    try:
        ledger.commit(
            job_stream("0001"),
            ev.TrainingStarted(
                job="0001", attempt=1, worker_pid=1, worker_started_at=1.0, base_model="/m"
            ),
        )
        s = Attempt.__new__(Attempt)  # only what replay_cancelled reads
        s.job, s.host = "0001", types.SimpleNamespace(stop=StopFlags(), ledger=ledger)
        assert s.replay_cancelled() == ""
        other = Ledger.open(ws / "journal.db")  # the user's command, another connection
        jobs.request(other, "0001", "pause")
        assert s.replay_cancelled() == "pause of job 0001 was requested"
        other.commit(job_stream("0001"), ev.Paused(job="0001", reason="x"))
        assert s.replay_cancelled() == ""
        other.commit(DAEMON_STREAM, ev.ShutdownRequested())
        assert s.replay_cancelled() == "`ftctl shutdown` was requested"
        s.host.stop.why = "SIGTERM"
        assert s.replay_cancelled() == "the daemon is stopping"
        other.close()
    finally:
        ledger.close()


def test_recovery_removes_the_scratch_of_a_killed_reproduction_and_nothing_else(ws, capsys):
    """A reproduction SIGKILLed mid-run leaves run/reproduce-JOB-PID/: recovery deletes it (recorded as
    debris_removed) — not a folder without ftctl's marker, nor the scratch of a reproduction still running."""
    import subprocess
    import sys

    from ftctl.adapters.workspace import SCRATCH_MARKER

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is gone
    dead = ws / "run" / f"reproduce-0001-{p.pid}"
    live = ws / "run" / "reproduce-0001-1"  # pid 1 lives
    users = ws / "run" / f"reproduce-0002-{p.pid}"  # no marker: not ours
    for d in (dead, live, users):
        (d / "job").mkdir(parents=True)
        (d / "job" / "adapters.safetensors").write_bytes(b"x")
    (dead / SCRATCH_MARKER).write_text("made by ftctl reproduce")
    (live / SCRATCH_MARKER).write_text("made by ftctl reproduce")
    code, out, _ = run(capsys, "recover", "--json", "--home", ws)
    assert code == 0 and not dead.exists() and live.exists() and users.exists(), out
    removed = [e["data"] for e in history(ws) if e["type"] == "debris_removed"]
    assert [r["path"] for r in removed] == [f"run/{dead.name}"] and "reproduction" in removed[0][
        "reason"
    ]
