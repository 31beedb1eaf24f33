"""The state machines, the reducer and replay: the command path against a live journal,
the derived lookup table against the `transitions` library, snapshots, the upcaster, and the
decoder under fuzzing."""

from __future__ import annotations

import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from transitions import Machine, MachineError

from ftctl.control.ledger import Ledger
from ftctl.core import machine as M
from ftctl.core import state as S
from ftctl.core.config import Config, LoraParameters, config_to_dict
from ftctl.core.machine import IllegalTransition, may, next_state
from ftctl.events import types as T
from ftctl.events.journal import Journal
from ftctl.recovery.replay import load, state_at

JOB_TYPES = [t for t in T.EVENT_TYPES if t in S.JOB_HANDLERS]
LINEAGE_TYPES = list(S.LINEAGE_TYPES)
DAEMON_TYPES = [
    T.DaemonStartedV1,
    *S.DAEMON_HANDLERS,
]  # the old schema too: committed, it is read back upcast
JOBS = ["a", "b"]
LINEAGES = ["main", "exp"]


# --------------------------------------------------------------------------- event builders
# One builder for every event type, fed either by hypothesis (DataPick) or by a seeded
# random.Random (RngPick), so the stateful test and the long histories share them.


class DataPick:
    def __init__(self, data):
        self.d = data

    def i(self) -> int:
        return self.d.draw(st.integers(-(2**40), 2**40))

    def s(self) -> str:
        return self.d.draw(st.text(max_size=6))

    def f(self) -> float:
        return self.d.draw(st.floats(allow_nan=False, allow_infinity=False))

    def opt(self, v):
        return v if self.d.draw(st.booleans()) else None

    def choice(self, seq):
        return self.d.draw(st.sampled_from(list(seq)))


class RngPick:
    WORDS = ["", "a", "ckpt/0000100", "ünïcødé ✓", "x" * 40, 'q"uote\\']

    def __init__(self, rng: random.Random):
        self.r = rng

    def i(self) -> int:
        return self.r.randrange(0, 10**6)

    def s(self) -> str:
        return self.r.choice(self.WORDS)

    def f(self) -> float:
        return self.r.uniform(0, 5)

    def opt(self, v):
        return v if self.r.random() < 0.7 else None

    def choice(self, seq):
        return self.r.choice(list(seq))


PATHS = ["c/1", "c/2", "c/3"]  # few checkpoint paths: commits, prunes and corruptions meet
# Fields whose values matter to the reducer, drawn from a few (a type, or "*" for every type).
CHOICES: dict[tuple[str, str], list] = {
    ("*", "lineage"): LINEAGES,
    ("CheckpointRecord", "path"): PATHS,
    ("CheckpointCommittedV1", "path"): PATHS,
    ("CheckpointPruned", "path"): PATHS,
    ("CheckpointCorrupt", "path"): PATHS,
    ("Crashed", "category"): ["oom", "nan", "signal"],
    ("Completed", "result"): ["", "best", "last"],
    ("CrashReproduced", "crash"): [0, 1, 2, 3],
    ("CrashReproduced", "crash_category"): ["nan", "killed"],
    ("CrashReproduced", "verdict"): ["reproduced", "not reproduced", "different"],
    ("JobSubmitted", "data_format"): ["chat", "completions", "text"],
    ("TrainingStarted", "world_size"): [1, 2, 4],
    ("TrainingStarted", "backend"): ["", "ring"],
    ("ControlRequested", "action"): ["pause", "cancel"],
    ("HeadSet", "job"): ["", "a", "x"],
    ("BasePromoted", "version"): [1, 2, 3],
    ("ModelRemoved", "version"): [1, 2, 3],
    ("ModelImported", "dtype"): [None, "float16", "float32"],
}


def _value(t, owner: str, name: str, p):
    """A value of annotation ``t`` for field ``name`` of ``owner``, drawn from ``p``."""
    import types
    import typing

    for key in ((owner, name), ("*", name)):
        if key in CHOICES:
            return p.choice(CHOICES[key])
    if isinstance(t, type) and issubclass(t, msgspec.Struct):
        return _build(t, p)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return p.opt(_value(inner[0], owner, name, p))
    if origin is list:
        return [_value(args[0], owner, name, p)]
    if origin is dict and args[1] is not typing.Any:
        return {p.s(): _value(args[1], owner, name, p)}
    if origin is dict:  # a job's config
        return config_to_dict(
            Config(
                model=p.choice(["base-a", "base-b"]),
                iters=1 + abs(p.i()),
                seed=abs(p.i()) % 2**32,
                lora_parameters=LoraParameters(keys=p.opt([p.s() or "k"])),
            )
        )
    return {str: p.s, int: p.i, float: p.f, bool: lambda: p.choice([False, True])}[t]()


def _build(typ: type, p, **given):
    hints = typing_hints(typ)
    fields = {
        f.name: _value(hints[f.name], typ.__name__, f.name, p) for f in msgspec.structs.fields(typ)
    }
    return typ(**{**fields, **given})


@functools.cache
def typing_hints(typ: type) -> dict:
    import typing

    return typing.get_type_hints(typ)


def make(typ: type, subject: str, p) -> T.EventBase:
    """An event of type ``typ`` about ``subject`` (a job id, a lineage name; ignored for the daemon)."""
    names = {f.name for f in msgspec.structs.fields(typ)}
    key = "job" if typ in S.JOB_HANDLERS else "lineage" if typ in S.LINEAGE_TYPES else None
    return _build(typ, p, **({key: subject} if key in names else {}))


def test_every_event_type_has_a_builder():
    p = RngPick(random.Random(0))
    for typ in T.EVENT_TYPES:
        e = make(typ, "x", p)
        assert type(e) is typ
        assert T.decode(T.encode(e)) == T.upcast(e)


# --------------------------------------------------------------------------- the oracle


def oracle(state: str, typ: type, *, lineage: bool) -> str | None:
    """The state after an event of ``typ``, asking the transitions library itself (may())
    for triggered events and FACTS for the others; None if the event is illegal."""
    if typ.trigger is not None:
        return (
            state_after_library(state, typ.trigger, lineage=lineage)
            if may(state, typ.trigger, lineage=lineage)
            else None
        )
    allowed = M.FACTS.get(typ.kind())
    return state if allowed is None or state in allowed else None


@functools.cache
def state_after_library(state: str, trigger: str, *, lineage: bool) -> str | None:
    """Fire ``trigger`` on a fresh library machine put in ``state``; None if it refuses.
    (Cached: the declaration is constant, and a Machine costs a millisecond to build.)"""
    states, transitions = (
        (M.LINEAGE_STATES, M.LINEAGE_TRANSITIONS) if lineage else (M.JOB_STATES, M.JOB_TRANSITIONS)
    )

    class Model:
        pass

    model = Model()
    Machine(
        model=model,
        states=states,
        transitions=transitions,
        initial=state,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )
    fire = getattr(model, trigger, None)
    if fire is None:
        return None
    try:
        fire()
    except MachineError:
        return None
    return model.state


def legal_types(state: str, types: list[type], *, lineage: bool) -> list[type]:
    return [t for t in types if oracle(state, t, lineage=lineage) is not None]


# weights that make the random walk look like jobs that mostly train, checkpoint and finish
PROGRESS = {
    T.JobSubmitted: 20,
    T.TrainingStarted: 10,
    T.CheckpointStarted: 10,
    T.CheckpointCommitted: 20,
    T.Evaluated: 4,
    T.EarlyStopped: 1,
    T.Completed: 4,
    T.Crashed: 2,
    T.Requeued: 5,
    T.Resumed: 5,
    T.Retried: 3,
    T.CheckpointPruned: 2,
}


ALL_TRIGGERS = sorted({t["trigger"] for t in M.JOB_TRANSITIONS + M.LINEAGE_TRANSITIONS} | {"bogus"})


@pytest.mark.parametrize("lineage", [False, True], ids=["job", "lineage"])
def test_derived_table_equals_the_library(lineage: bool):
    states, table = (M.LINEAGE_STATES, M.LINEAGE_TABLE) if lineage else (M.JOB_STATES, M.JOB_TABLE)
    answers = {}
    for s in states:
        for trig in ALL_TRIGGERS:
            dest = state_after_library(s, trig, lineage=lineage)
            answers[(s, trig)] = dest
            assert next_state(s, trig, lineage=lineage) == dest, (s, trig)
            assert may(s, trig, lineage=lineage) == (dest is not None), (s, trig)
            # a command is checked by the machine itself, and lands where replay's table says
            assert M.command(s, trig, lineage=lineage) == dest, (s, trig)
    assert table == {k: v for k, v in answers.items() if v is not None}
    assert table  # the declaration is not empty


def test_the_ledger_checks_a_command_through_the_declared_machine(tmp_path, monkeypatch):
    """Ledger.commit asks the transitions library, not the replay table: a machine that refuses
    everything refuses the command (nothing appended), while replay's table is untouched."""
    from ftctl.core import state as S
    from ftctl.events.journal import Journal

    ledger = Ledger(Journal.create(tmp_path / "j.db"))
    asked = []
    monkeypatch.setattr(S, "command", lambda s, t, lineage=False: asked.append((s, t)))
    with pytest.raises(M.IllegalTransition):
        ledger.commit("job:0001", make(T.JobSubmitted, "0001", RngPick(random.Random(1))))
    assert asked == [("new", "submit")] and ledger.journal.last_seq() == 0
    ledger.close()


def test_catalogue_and_machines_agree():
    job_triggers = {t["trigger"] for t in M.JOB_TRANSITIONS}
    lineage_triggers = {t["trigger"] for t in M.LINEAGE_TRANSITIONS}
    performed = [t.trigger for t in T.EVENT_TYPES if t.trigger is not None]
    assert len(performed) == len(set(performed)), "two event types perform the same trigger"
    assert set(performed) == job_triggers | lineage_triggers
    assert {t.trigger for t in JOB_TYPES if t.trigger} == job_triggers
    assert {t.trigger for t in LINEAGE_TYPES if t.trigger} == lineage_triggers
    kinds = {t.kind() for t in T.EVENT_TYPES}
    assert set(M.FACTS) <= kinds
    # every untriggered job event is restricted by FACTS, so none slips through in state "new"
    assert all(t.kind() in M.FACTS for t in JOB_TYPES if t.trigger is None)
    assert set(M.TERMINAL) | set(M.ACTIVE) <= set(M.JOB_STATES)
    for s in M.TERMINAL:
        ways_out = {t for t in job_triggers if may(s, t)}
        assert ways_out == ({"retry"} if s in M.RETRYABLE else set()), (
            f"terminal state {s} has a way out: {ways_out}"
        )


# --------------------------------------------------------------------------- the command path, stateful


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ftctl-sm-"))
        self.path = self.dir / "journal.db"
        self.ledger = Ledger(Journal.create(self.path))

    def teardown(self):
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def subject_state(self, stream: str) -> tuple[str, int]:
        p = self.ledger.state
        kind, _, name = stream.partition(":")
        if kind == "job":
            j = p.jobs.get(name)
            return (j.state, j.version) if j else ("new", 0)
        if kind == "lineage":
            lin = p.lineages.get(name)
            return (lin.state, lin.version) if lin else ("idle", 0)
        return ("-", p.daemon.version)

    def issue(self, stream: str, events: list[T.EventBase]) -> None:
        lineage = stream.startswith("lineage:")
        journal = self.ledger.journal
        state, version = self.subject_state(stream)
        before_seq = journal.last_seq()
        before = S.from_snapshot(S.to_snapshot(self.ledger.state))
        expect, refused = state, None
        if stream != S.DAEMON_STREAM:
            for e in events:
                nxt = oracle(expect, type(e), lineage=lineage)
                if type(e).trigger is not None:  # the table and the library agree, event by event
                    assert (
                        next_state(expect, type(e).trigger, lineage=lineage) is not None
                    ) == may(expect, type(e).trigger, lineage=lineage)
                if nxt is None:
                    refused = (expect, type(e).kind())
                    break
                expect = nxt
        if refused is None:
            recs = self.ledger.commit(stream, *events)
            assert [r.seq for r in recs] == list(
                range(before_seq + 1, before_seq + 1 + len(events))
            )
            assert [r.version for r in recs] == list(range(version + 1, version + 1 + len(events)))
            assert journal.last_seq() == self.ledger.state.seq == before_seq + len(events)
            state, version2 = self.subject_state(stream)
            assert version2 == version + len(events)
            if stream != S.DAEMON_STREAM:
                assert state == expect
        else:
            with pytest.raises(IllegalTransition) as info:
                self.ledger.commit(stream, *events)
            err = info.value
            assert (err.state, err.event) == refused
            assert repr(refused[0]) in str(err) and repr(refused[1]) in str(err)
            assert journal.last_seq() == before_seq
            assert self.ledger.state == before

    # ------------------------------------------------------------------ rules
    @rule(data=st.data())
    def any_job_command(self, data):
        job = data.draw(st.sampled_from(JOBS))
        typ = data.draw(st.sampled_from(JOB_TYPES))
        self.issue(S.job_stream(job), [make(typ, job, DataPick(data))])

    @rule(data=st.data(), steps=st.integers(1, 4))
    def legal_job_commands(self, data, steps):
        """A few commands the job's state allows, mostly the ones that move it forward."""
        job = data.draw(st.sampled_from(JOBS))
        for _ in range(steps):
            state, _ = self.subject_state(S.job_stream(job))
            legal = legal_types(state, JOB_TYPES, lineage=False)
            typ = data.draw(st.sampled_from([t for t in legal for _ in range(PROGRESS.get(t, 1))]))
            self.issue(S.job_stream(job), [make(typ, job, DataPick(data))])

    @rule(data=st.data())
    def two_job_events_at_once(self, data):
        job = data.draw(st.sampled_from(JOBS))
        state, _ = self.subject_state(S.job_stream(job))
        first = data.draw(st.sampled_from(legal_types(state, JOB_TYPES, lineage=False)))
        second = data.draw(st.sampled_from(JOB_TYPES))
        if data.draw(st.booleans()) and state == "training":  # the usual checkpoint pair
            first, second = T.CheckpointStarted, T.CheckpointCommitted
        p = DataPick(data)
        self.issue(S.job_stream(job), [make(first, job, p), make(second, job, p)])

    @rule(data=st.data())
    def lineage_command(self, data):
        name = data.draw(st.sampled_from(LINEAGES))
        typ = data.draw(st.sampled_from(LINEAGE_TYPES))
        self.issue(S.lineage_stream(name), [make(typ, name, DataPick(data))])

    @rule(data=st.data())
    def daemon_command(self, data):
        typ = data.draw(st.sampled_from(DAEMON_TYPES))
        e = make(typ, "", DataPick(data))
        self.issue(S.DAEMON_STREAM, [e])
        d = self.ledger.state.daemon
        if typ is T.DaemonStartedV1:  # committed in the old schema, read back upcast
            assert d.process == T.ProcessId(e.pid, 0.0) and d.running
        elif typ is T.DaemonStarted:
            assert d.process == e.process and d.running and not d.shutdown_requested

    @rule()
    def snapshot(self):
        self.ledger.snapshot()
        assert self.ledger.journal.latest_snapshot(S.SNAPSHOT_FORMAT)[0] == self.ledger.state.seq

    @rule()
    def restart(self):
        before = self.ledger.state
        self.ledger.close()
        self.ledger = Ledger.open(self.path)
        assert self.ledger.state == before

    # ------------------------------------------------------------------ invariants
    @invariant()
    def replayed_equals_live(self):
        journal, live = self.ledger.journal, self.ledger.state
        assert load(journal, snapshot=False) == live
        assert load(journal) == live
        assert state_at(journal, journal.last_seq()) == live


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_event_addressed_to_another_stream_is_refused(tmp_path: Path):
    """Replay files an event by its body: one appended to a stream that is not its own would
    make the journal unreplayable, so the command path refuses it."""
    ledger = Ledger(Journal.create(tmp_path / "j.db"))
    try:
        p = RngPick(random.Random(1))
        ledger.commit("job:a", make(T.JobSubmitted, "a", p))
        before = ledger.state.seq
        for stream, e in [
            ("job:a", T.Paused(job="b", reason="r")),
            ("daemon", T.Paused(job="a", reason="r")),
            ("job:a", T.ShutdownRequested()),
            ("lineage:main", make(T.ConsolidationStarted, "exp", p)),
        ]:
            with pytest.raises(ValueError, match="belongs to stream"):
                ledger.commit(stream, e)
        assert ledger.journal.last_seq() == before
        assert load(ledger.journal, snapshot=False) == ledger.state
    finally:
        ledger.close()


def test_adapter_evaluated_is_kept_on_a_completed_job_only(tmp_path: Path):
    ledger = Ledger(Journal.create(tmp_path / "j.db"))
    try:
        p = RngPick(random.Random(2))
        ledger.commit("job:a", make(T.JobSubmitted, "a", p))
        e = make(T.AdapterEvaluated, "a", p)
        with pytest.raises(IllegalTransition, match="adapter_evaluated"):
            ledger.commit("job:a", e)  # queued: no adapter yet
        ledger.commit("job:a", make(T.TrainingStarted, "a", p))
        with pytest.raises(IllegalTransition):
            ledger.commit("job:a", e)
        ledger.commit("job:a", make(T.Completed, "a", p))
        ledger.commit("job:a", e)
        j = ledger.state.jobs["a"]
        assert j.state == "completed" and j.last_eval == e and j.last_eval_at
        assert load(ledger.journal, snapshot=False) == ledger.state
        assert S.from_snapshot(S.to_snapshot(ledger.state)) == ledger.state
    finally:
        ledger.close()


# --------------------------------------------------------------------------- snapshots and state_at


def random_history(rng: random.Random, n: int) -> list[tuple[str, list[T.EventBase]]]:
    """``n`` legal events as (stream, events) commands: jobs walking their lifecycle, lineages,
    the daemon."""
    p = RngPick(rng)
    jobs: dict[str, str] = {}
    lineages = {name: "idle" for name in LINEAGES}
    out, count = [], 0
    while count < n:
        r = rng.random()
        if r < 0.08:
            typ = rng.choice(DAEMON_TYPES)
            out.append((S.DAEMON_STREAM, [make(typ, "", p)]))
            count += 1
            continue
        if r < 0.16:
            name = rng.choice(LINEAGES)
            typ = rng.choice(legal_types(lineages[name], LINEAGE_TYPES, lineage=True))
            lineages[name] = oracle(lineages[name], typ, lineage=True)
            out.append((S.lineage_stream(name), [make(typ, name, p)]))
            count += 1
            continue
        job = f"j{rng.randrange(15)}"
        state = jobs.get(job, "new")
        events = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            legal = legal_types(state, JOB_TYPES, lineage=False)
            typ = rng.choices(legal, [PROGRESS.get(t, 1) for t in legal])[0]
            state = oracle(state, typ, lineage=False)
            events.append(make(typ, job, p))
        jobs[job] = state
        out.append((S.job_stream(job), events))
        count += len(events)
    return out


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A journal of ~400 legal events, written in a few transactions, in which a job ends with
    committed checkpoints (the first seed from 42 that gives one: adding an event type reshuffles
    what a seed draws)."""
    folder = tmp_path_factory.mktemp("history")
    for seed in range(42, 142):
        path = folder / f"journal-{seed}.db"
        j = Journal.create(path)
        cmds = random_history(random.Random(seed), 400)
        for i in range(0, len(cmds), 50):
            j.append_batch([(s, evs, None) for s, evs in cmds[i : i + 50]])
        recs = list(j.read())
        j.close()
        if any(js.checkpoints for js in S.fold(recs).jobs.values()):
            break
    return path, recs


def test_snapshot_plus_tail_equals_full_replay(history):
    path, recs = history
    j = Journal.open(path)
    j.conn.execute("DELETE FROM snapshots")
    try:
        full = load(j, snapshot=False)
        assert full == S.fold(recs) and full.seq == len(recs) >= 400
        assert len(full.jobs) > 5 and any(js.checkpoints for js in full.jobs.values())
        reads = []
        real_rows = j.rows
        j.rows = lambda *a, **k: (
            reads.append(k.get("after", a[0] if a else 0)),
            real_rows(*a, **k),
        )[1]
        for at in [1, 57, 150, 151, 299, len(recs) - 1, len(recs)]:
            p_at = S.fold(recs[:at])
            assert p_at.seq == at
            j.save_snapshot(at, S.SNAPSHOT_FORMAT, S.to_snapshot(p_at))
            reads.clear()
            assert load(j) == full, at
            assert reads == [at]  # the snapshot was used: only the tail was read
        # a snapshot of another format is ignored
        j.save_snapshot(len(recs) + 1000, S.SNAPSHOT_FORMAT + 1, b"not msgpack of this shape")
        assert load(j) == full
    finally:
        j.close()


def test_state_at_equals_folding_the_prefix(history):
    path, recs = history
    j = Journal.open(path)
    j.conn.execute("DELETE FROM snapshots")
    try:
        points = [0, 1, 2, 33, 100, 200, 201, 333, len(recs)]
        for seq in points:  # no snapshot: full replay up to seq
            assert state_at(j, seq) == S.fold(recs[:seq]), seq
        for snap in (
            100,
            250,
        ):  # the two newest are kept: state_at uses the newest at or before seq
            j.save_snapshot(snap, S.SNAPSHOT_FORMAT, S.to_snapshot(S.fold(recs[:snap])))
        for seq in points:
            assert state_at(j, seq) == S.fold(recs[:seq]), seq
    finally:
        j.close()


def test_snapshot_round_trip_is_exact(history):
    _, recs = history
    for at in (10, 200, len(recs)):
        p = S.fold(recs[:at])
        assert S.from_snapshot(S.to_snapshot(p)) == p


# --------------------------------------------------------------------------- the upcaster

V1_BODY = '{"type":"daemon_started","pid":4242,"host":"old-box"}'


def test_daemon_started_v1_is_upcast(tmp_path: Path):
    want = T.DaemonStarted(process=T.ProcessId(pid=4242, started_at=0.0), host="old-box")
    assert T.decode(V1_BODY) == want and T.decode(V1_BODY.encode()) == want
    assert T.to_dict(T.decode(V1_BODY))["type"] == "daemon_started.v2"

    j = Journal.create(tmp_path / "j.db")
    try:
        # as an old ftctl appended it
        j.append("daemon", [T.DaemonStartedV1(pid=4242, host="old-box")])
        j.conn.execute(  # and a raw row, exactly as schema 1 stored it
            "INSERT INTO events (stream, version, ts, type, body) VALUES ('daemon', 2, "
            "'2024-01-01T00:00:00.000000Z', 'daemon_started', ?)",
            (V1_BODY,),
        )
        assert j.conn.execute("SELECT body FROM events WHERE seq = 1").fetchone()[0] == V1_BODY
        recs = list(j.read())
        assert [r.event for r in recs] == [want, want]
        assert all(type(r.event) is T.DaemonStarted for r in recs)
        assert list(j.read(chunk=1, stream="daemon")) == recs
        p = load(j, snapshot=False)
        assert (
            p.daemon.process == T.ProcessId(4242, 0.0)
            and p.daemon.running
            and p.daemon.version == 2
        )
        assert p.daemon.started_at == "2024-01-01T00:00:00.000000Z"
        assert T.decode_columns("[1]", '["daemon"]', "[1]", '["t"]', f"[{V1_BODY}]") == [
            T.Recorded(1, "daemon", 1, "t", want)
        ]
        assert T.decode_bodies('["t"]', f"[{V1_BODY}]") == (["t"], [want])
    finally:
        j.close()


# --------------------------------------------------------------------------- decoder fuzzing

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TAGS = sorted(T.BY_TAG)
FIELDS = sorted({f for t in T.EVENT_TYPES for f in t.__struct_fields__} | {"pid", "started_at"})
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
event_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8).flatmap(
    lambda d: st.one_of(
        st.just(d),
        st.sampled_from(TAGS + ["nope", "daemon_started.v3", ""]).map(lambda t: {**d, "type": t}),
    )
)


def decodes_or_refuses(body) -> T.EventBase | None:
    try:
        e = T.decode(body)
    except T.DecodeError as err:
        assert str(err).startswith("not a valid ftctl event")
        return None
    assert isinstance(e, T.EventBase) and type(e) not in T.UPCASTERS  # always the current schema
    return e


def batch_decodes_or_refuses(bodies) -> list | None:
    """The replay path's decoders (Journal.read -> decode_columns, Journal.rows -> decode_bodies),
    given ``bodies`` as the JSON array of event bodies SQLite's group_concat builds."""
    n = len(json.loads(bodies)) if _is_json_list(bodies) else 1
    cols = (
        "[" + ",".join(["1"] * n) + "]",
        json.dumps(["s"] * n),
        "[" + ",".join(["1"] * n) + "]",
        json.dumps(["t"] * n),
    )
    results = []
    for call in (
        lambda: T.decode_columns(*cols, bodies),
        lambda: T.decode_bodies(cols[3], bodies)[1],
    ):
        try:
            results.append(call())
        except T.DecodeError:
            results.append(None)
    rows, events = results
    assert (rows is None) == (events is None)  # the two decoders agree on what a journal may hold
    if rows is None:
        return None
    assert [r.event for r in rows] == events
    assert all(isinstance(r, T.Recorded) and type(r.event) not in T.UPCASTERS for r in rows)
    return rows


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except (ValueError, RecursionError, UnicodeError):
        return False


@FUZZ
@given(st.binary(max_size=400))
def test_decode_arbitrary_bytes(body):
    decodes_or_refuses(body)
    batch_decodes_or_refuses(body)
    batch_decodes_or_refuses(b"[" + body + b"]")


@FUZZ
@given(event_like)
def test_decode_arbitrary_json_objects(obj):
    body = json.dumps(obj)
    decodes_or_refuses(body)
    decodes_or_refuses(body.encode())
    batch_decodes_or_refuses(json.dumps([obj]))


@FUZZ
@given(st.lists(st.one_of(json_values, event_like), max_size=4))
def test_decode_arbitrary_body_arrays(rows):
    batch_decodes_or_refuses(json.dumps(rows))


@FUZZ
@given(st.data())
def test_decode_mutated_valid_bodies(data):
    typ = data.draw(st.sampled_from(T.EVENT_TYPES))
    e = make(typ, data.draw(st.text(max_size=4)), DataPick(data))
    body = bytearray(T.encode(e))
    assert T.decode(bytes(body)) == T.upcast(e)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body)))
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        byte = data.draw(st.sampled_from(list(b'{}[]",:0-.e\\nutfa\x00\xff')) | st.integers(0, 255))
        if op == "flip" and at < len(body):
            body[at] = byte
        elif op == "delete" and at < len(body):
            del body[at]
        elif op == "insert":
            body.insert(at, byte)
        elif op == "truncate":
            del body[at:]
    decodes_or_refuses(bytes(body))
    batch_decodes_or_refuses(b"[" + bytes(body) + b"]")
    batch_decodes_or_refuses(b"[" + T.encode(e) + b"," + bytes(body) + b"]")


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"\x80onsolidation_requested","lineage":""}',  # found by the fuzzer: msgspec raised UnicodeDecodeError
        b'{"type":"control_requested","job":"\xff\xfe","action":"x"}',
        b'\xef\xbb\xbf{"type":"resumed","job":"a"}',
    ],
)
def test_decode_invalid_utf8_is_a_decode_error(body):
    decodes_or_refuses(body)
    batch_decodes_or_refuses(b"[" + body + b"]")


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_decode_deeply_nested_is_a_decode_error(depth):
    """msgspec raises RecursionError on deep nesting; the decoder's contract is DecodeError only."""
    nested = "[" * depth + "]" * depth
    for body in (
        f'{{"type":"control_requested","job":"a","action":"x","extra":{nested}}}',
        f'{{"type":"job_submitted","config":{{"a":{nested}}}}}',
    ):
        decodes_or_refuses(body)
        batch_decodes_or_refuses(f"[{body}]")
    batch_decodes_or_refuses(nested)


def test_milestones_make_every_point_a_snapshot_plus_a_short_tail(history, monkeypatch):
    """The first load of a long journal leaves milestones every SNAPSHOT_INTERVAL events (compressed,
    at most SNAPSHOT_MILESTONES: past that the spacing doubles); state_at from them is exact."""
    from ftctl.recovery import replay as L

    path, recs = history
    monkeypatch.setattr(L, "SNAPSHOT_INTERVAL", 20)
    monkeypatch.setattr(L, "SNAPSHOT_MILESTONES", 6)
    j = Journal.open(path)
    j.conn.execute("DELETE FROM snapshots")
    try:
        # a query writes nothing
        assert L.load(j, write=False) == S.fold(recs) and j.snapshot_seqs(S.SNAPSHOT_FORMAT) == []
        full = L.load(j)
        assert full == S.fold(recs)
        seqs = [s for s, _ in j.snapshot_seqs(S.SNAPSHOT_FORMAT)]
        milestones = seqs[:-2]
        # the last tail < SNAPSHOT_EVERY
        assert 0 < len(milestones) <= 6 and len(recs) - 20 <= seqs[-1] < len(recs)
        gaps = [b - a for a, b in zip([0] + milestones, milestones)]
        # thinned by halving, never more
        assert all(g >= 20 for g in gaps) and max(gaps) <= 20 * 2**5
        for s in milestones:  # stored compressed, read back exactly
            raw = j.conn.execute("SELECT body FROM snapshots WHERE seq = ?", (s,)).fetchone()[0]
            assert raw.startswith(b"\x00zlib\x00")
            assert S.from_snapshot(j.latest_snapshot(S.SNAPSHOT_FORMAT, at_most=s)[1]) == S.fold(
                recs[:s]
            )
        reads = []
        real_rows = j.rows
        j.rows = lambda *a, **k: (reads.append((k.get("after"), k.get("to"))), real_rows(*a, **k))[
            1
        ]
        for seq in range(0, len(recs) + 1, 7):
            reads.clear()
            assert L.state_at(j, seq) == S.fold(recs[:seq]), seq
            start = max([s for s in seqs if s <= seq], default=0)
            assert reads == [(start, seq)]  # the nearest snapshot at or before seq, then its tail
        # more snapshots later keep the bound
        live = Ledger(j)
        for _ in range(5):
            live.snapshot()
        assert len(j.snapshot_seqs(S.SNAPSHOT_FORMAT)) <= 6 + 2
    finally:
        j.close()
