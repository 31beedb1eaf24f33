"""The SQLite journal: appends, optimistic concurrency, reads, refusal of foreign files, and
durability against a writer killed at a random moment."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftctl.events import types as T
from ftctl.events.journal import (
    APPLICATION_ID,
    ConcurrencyError,
    Journal,
    JournalError,
    NotAJournal,
)


def ev(job: str = "a", n: int = 0, reason: str = "test") -> T.CheckpointDiscarded:
    # The journal does not look at the state machine: any event type will do.
    return T.CheckpointDiscarded(job=job, path=f"p{n}", reason=reason)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def sidecars(p: Path) -> list[Path]:
    return [p.with_name(p.name + s) for s in ("-wal", "-shm") if p.with_name(p.name + s).exists()]


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def journal(jpath: Path):
    j = Journal.create(jpath)
    yield j
    j.close()


# --------------------------------------------------------------------------- create / open


def test_create_open_round_trip(jpath: Path):
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        j = Journal.create(jpath)
        assert mode(jpath) == 0o600
        recs = j.append("job:a", [ev("a", 1), ev("a", 2)], expected_version=0)
        recs += j.append("job:b", [ev("b", 3)])
        assert sidecars(jpath), "a WAL journal that is open after a write has -wal/-shm files"
        for side in sidecars(jpath):
            assert mode(side) == 0o600, side
        assert j.integrity_check() == "ok"
        j.close()
    finally:
        os.umask(old)
    assert sidecars(jpath) == []  # a clean close checkpoints and removes them

    j = Journal.open(jpath)
    assert mode(jpath) == 0o600
    assert list(j.read()) == recs
    assert [(r.seq, r.stream, r.version) for r in recs] == [
        (1, "job:a", 1),
        (2, "job:a", 2),
        (3, "job:b", 1),
    ]
    assert j.last_seq() == 3 and j.stream_version("job:a") == 2 and j.stream_version("job:zzz") == 0
    assert j.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    more = j.append("job:a", [ev("a", 4)], expected_version=2)
    assert (more[0].seq, more[0].version) == (4, 3)
    j.close()


def test_create_refuses_to_overwrite(jpath: Path):
    Journal.create(jpath).close()
    before = sha256(jpath)
    with pytest.raises(JournalError, match="already exists"):
        Journal.create(jpath)
    assert sha256(jpath) == before


def test_open_missing_file(tmp_path: Path):
    with pytest.raises(NotAJournal, match="no journal at .*ftctl init"):
        Journal.open(tmp_path / "nope.db")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- appends


def test_append_with_expected_version(journal: Journal):
    r1 = journal.append("job:a", [ev(n=1)], expected_version=0)
    r2 = journal.append("job:a", [ev(n=2), ev(n=3)], expected_version=1)
    assert [r.version for r in r1 + r2] == [1, 2, 3]
    assert [r.seq for r in r1 + r2] == [1, 2, 3]
    assert journal.append("job:b", [ev("b")], expected_version=0)[0].version == 1
    # None skips the check
    assert journal.append("job:a", [ev(n=4)], expected_version=None)[0].version == 4


@pytest.mark.parametrize("stale", [0, 1, 3, 7])
def test_stale_expected_version_appends_nothing(journal: Journal, stale: int):
    journal.append("job:a", [ev(n=1), ev(n=2)], expected_version=0)
    before = list(journal.read())
    with pytest.raises(ConcurrencyError) as info:
        journal.append("job:a", [ev(n=9), ev(n=10)], expected_version=stale)
    e = info.value
    assert (e.stream, e.expected, e.actual) == ("job:a", stale, 2)
    assert "nothing was appended" in str(e)
    assert list(journal.read()) == before
    assert journal.last_seq() == 2 and journal.stream_version("job:a") == 2
    assert not journal.conn.in_transaction
    # the journal is still usable and the seq has no hole
    assert journal.append("job:a", [ev(n=3)], expected_version=2)[0].seq == 3


def test_append_batch_across_streams_is_atomic(journal: Journal):
    journal.append("job:a", [ev("a")], expected_version=0)
    journal.append("job:b", [ev("b"), ev("b")], expected_version=0)
    before = list(journal.read())
    # the first stream is fine, the second conflicts: neither gets anything
    with pytest.raises(ConcurrencyError) as info:
        journal.append_batch(
            [
                ("job:a", [ev("a", 1), ev("a", 2)], 1),
                ("job:b", [ev("b", 3)], 1),
                ("job:c", [ev("c", 4)], 0),
            ]
        )
    assert (info.value.stream, info.value.expected, info.value.actual) == ("job:b", 1, 2)
    assert list(journal.read()) == before
    assert [journal.stream_version(s) for s in ("job:a", "job:b", "job:c")] == [1, 2, 0]

    recs = journal.append_batch(
        [("job:a", [ev("a", 1)], 1), ("job:b", [ev("b", 2)], 2), ("job:c", [ev("c", 3)], 0)]
    )
    assert [(r.seq, r.stream, r.version) for r in recs] == [
        (4, "job:a", 2),
        (5, "job:b", 3),
        (6, "job:c", 1),
    ]
    assert len({r.ts for r in recs}) == 1  # one transaction, one timestamp
    assert list(journal.read()) == before + recs


def test_unreadable_body_is_refused(journal: Journal):
    """A NaN encodes as JSON null, which would not decode as a (non-optional) float: once
    committed, every replay would fail. The append refuses it, and the whole batch with it."""
    journal.append("job:a", [ev("a")], expected_version=0)
    before = list(journal.read())
    bad = T.TrainingStarted(
        job="b", attempt=1, worker_pid=1, worker_started_at=float("nan"), base_model="m"
    )
    with pytest.raises(JournalError, match="would not read back.*Nothing was appended"):
        journal.append_batch([("job:a", [ev("a", 2)], 1), ("job:b", [bad], 0)])
    wrong_type = T.Failed(job=7, reason="r")  # python does not check field types on construction
    with pytest.raises(JournalError, match="would not read back"):
        journal.append("job:7", [wrong_type])
    assert list(journal.read()) == before
    assert journal.append("job:a", [ev("a", 3)], expected_version=1)[0].seq == 2


def test_seq_is_contiguous(journal: Journal):
    rng = random.Random(7)
    for i in range(40):
        if rng.random() < 0.5:
            journal.append(f"job:{rng.randrange(4)}", [ev(n=i)] * rng.randint(1, 3))
        else:
            journal.append_batch(
                [(f"job:{rng.randrange(4)}", [ev(n=i)], None) for _ in range(rng.randint(1, 3))]
            )
    recs = list(journal.read())
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1)) and journal.last_seq() == len(
        recs
    )
    versions: dict[str, list[int]] = {}
    for r in recs:
        versions.setdefault(r.stream, []).append(r.version)
    for s, vs in versions.items():
        assert vs == list(range(1, len(vs) + 1)), s


# --------------------------------------------------------------------------- reads


def test_read_ranges_streams_and_chunks(journal: Journal):
    rng = random.Random(3)
    streams = ["job:a", "job:b", "lineage:main", "daemon"]
    written = []
    for i in range(30):
        if i % 4 == 3:
            written += journal.append_batch([(s, [ev(s, i)], None) for s in rng.sample(streams, 2)])
        else:
            written += journal.append(rng.choice(streams), [ev("x", i)] * rng.randint(1, 2))
    n = journal.last_seq()
    assert list(journal.read()) == written and n == len(written)
    assert list(journal.read(chunk=1)) == written
    for after in range(0, n + 2):
        for to in sorted(
            {None, 0, after, after + 1, after + 2, after + 3, after + 4, n - 1, n, n + 5},
            key=lambda x: -1 if x is None else x,
        ):
            for stream in [None, *streams, "job:none"]:
                hi = n if to is None else to
                want = [
                    r
                    for r in written
                    if after < r.seq <= hi and (stream is None or r.stream == stream)
                ]
                assert list(journal.read(after, to, stream, chunk=3)) == want, (after, to, stream)


def test_read_odd_strings_round_trip(journal: Journal):
    """Streams and bodies are spliced into a JSON array inside SQLite: quoting must hold."""
    odd = [
        'job:"quoted"',
        "job:back\\slash",
        "job:tab\tnl\n",
        "job:ünï©ødé ✓",
        "job:'single'",
        "job:]},[",
    ]
    written = []
    for s in odd:
        written += journal.append(s, [T.Failed(job=s[4:], reason=s * 3, category="\x00\x1f\u2028")])
    assert list(journal.read(chunk=2)) == written
    for s in odd:
        assert list(journal.read(stream=s, chunk=3)) == [r for r in written if r.stream == s]


# --------------------------------------------------------------------------- foreign and damaged files


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _random_bytes(p: Path) -> None:
    p.write_bytes(random.Random(1).randbytes(16384))


def _foreign_sqlite(p: Path) -> None:
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    c.executemany("INSERT INTO notes (text) VALUES (?)", [("hello",)] * 50)
    c.commit()
    c.close()


def _other_application(p: Path) -> None:
    c = sqlite3.connect(p)
    c.execute("PRAGMA application_id = 1234567")
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, body TEXT)")
    c.commit()
    c.close()


def _our_id_no_tables(p: Path) -> None:
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    c.execute("PRAGMA user_version = 1")
    c.execute("CREATE TABLE other (x)")
    c.commit()
    c.close()


def _future_schema(p: Path) -> None:
    j = Journal.create(p)
    j.append("job:a", [ev()])
    j.close()
    c = sqlite3.connect(p)
    c.execute("PRAGMA user_version = 99")
    c.close()


def _truncated(p: Path) -> None:
    j = Journal.create(p)
    for i in range(200):
        j.append_batch([(f"job:{i % 7}", [ev(str(i % 7), i, reason="r" * 300)], None)])
    j.close()
    assert sidecars(p) == []
    os.truncate(p, p.stat().st_size // 2)


@pytest.mark.parametrize(
    "make, message",
    [
        (_empty, "not an ftctl journal: the file is empty"),
        (_random_bytes, "not an ftctl journal: it is not a SQLite database"),
        (_foreign_sqlite, "not an ftctl journal: it is a SQLite database of another application"),
        (_other_application, r"another application \(application_id 0x12d687\)"),
        (_our_id_no_tables, r"lacks tables \['events', 'meta', 'metrics', 'snapshots'\]"),
        (_future_schema, "journal schema version 99 is not supported"),
        (_truncated, r"the journal is truncated \(\d+ bytes, its header says \d+\)"),
    ],
    ids=[
        "empty",
        "random",
        "foreign-sqlite",
        "other-app-id",
        "our-id-no-tables",
        "future-schema",
        "truncated",
    ],
)
def test_open_refuses_bad_files_untouched(jpath: Path, make, message):
    make(jpath)
    assert sidecars(jpath) == []
    before, size = sha256(jpath), jpath.stat().st_size
    with pytest.raises(NotAJournal, match=message) as info:
        Journal.open(jpath)
    assert isinstance(info.value, JournalError)
    text = str(info.value)
    assert str(jpath) in text and "Nothing was changed" in text  # what happened, what was kept safe
    assert sha256(jpath) == before and jpath.stat().st_size == size
    assert sidecars(jpath) == []
    assert sorted(p.name for p in jpath.parent.iterdir()) == ["journal.db"]


# --------------------------------------------------------------------------- crashes and concurrent writers

CRASH_CHILD = r"""
import random, sys
from ftctl.events.journal import Journal
from ftctl.events.types import CheckpointDiscarded
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
j = Journal.open(path)
streams = [f"job:s{i}" for i in range(5)]
print("go", flush=True)
n = 0
while True:
    n += 1
    pad = "x" * rng.choice([0, 10, 500, 3000])  # rows spanning pages make torn writes likelier
    if rng.random() < 0.4:
        s = rng.choice(streams)
        j.append(s, [CheckpointDiscarded(job=s[4:], path=f"single/{seed}/{n}", reason=pad)], j.stream_version(s))
    else:
        tag = f"batch/{seed}/{n}"
        if rng.random() < 0.3:   # three events to one stream
            s = rng.choice(streams)
            events = [CheckpointDiscarded(job=s[4:], path=f"{tag}/{k}", reason=pad) for k in range(3)]
            parts = [(s, events, j.stream_version(s))]
        else:                    # one event to each of three streams (possibly repeating one)
            parts = [(s, [CheckpointDiscarded(job=s[4:], path=f"{tag}/{k}", reason=pad)], None)
                     for k, s in enumerate(rng.choice([rng.sample(streams, 3),
                                                       [rng.choice(streams) for _ in range(3)]]))]
        j.append_batch(parts)
"""


def _check_journal(path: Path) -> list[tuple]:
    """Everything a reopened journal must satisfy after a crash; returns its rows."""
    j = Journal.open(path)
    try:
        assert j.integrity_check() == "ok"
        rows = j.conn.execute(
            "SELECT seq, stream, version, type, body FROM events ORDER BY seq"
        ).fetchall()
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "seq has a hole"
        versions: dict[str, list[int]] = {}
        batches: dict[str, list[int]] = {}
        for _seq, stream, version, typ, body in rows:
            versions.setdefault(stream, []).append(version)
            e = T.decode(body)
            assert isinstance(e, T.CheckpointDiscarded) and typ == "checkpoint_discarded"
            assert stream == f"job:{e.job}"
            if e.path.startswith("batch/"):
                tag, k = e.path.rsplit("/", 1)
                batches.setdefault(tag, []).append(int(k))
        for stream, vs in versions.items():
            assert vs == list(range(1, len(vs) + 1)), f"{stream} versions not contiguous"
        for tag, ks in batches.items():
            assert sorted(ks) == [0, 1, 2], f"batch {tag} is partial: {ks}"
        assert len(list(j.read(chunk=500))) == len(rows)
        return rows
    finally:
        j.close()


def test_sigkilled_writer_leaves_a_consistent_journal(jpath: Path):
    Journal.create(jpath).close()
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    rounds, kept, grew = 15, [], 0
    for r in range(rounds):
        seed = rng.randrange(1 << 30)
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(jpath), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=jpath.parent,
        )
        try:
            assert child.stdout.readline().strip() == "go", child.stderr.read()
            time.sleep(rng.uniform(0.05, 0.4))
            assert child.poll() is None, (
                f"writer died on its own (seed {seed}): {child.stderr.read()}"
            )
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        rows = _check_journal(jpath)
        # what earlier rounds committed is still there, unchanged
        assert rows[: len(kept)] == kept, f"round {r} (seed {seed}) lost committed events"
        grew += len(rows) > len(kept)
        kept = rows
    assert grew >= rounds // 2, "the writer hardly ever committed before it was killed"


CONTEND_CHILD = r"""
import json, os, random, sys, time
from ftctl.events.journal import Journal, ConcurrencyError
from ftctl.events.types import CheckpointDiscarded
path, who, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
j = Journal.open(path)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
ok, lost = [], []
for i in range(n):
    v = j.stream_version("job:shared")
    time.sleep(random.random() * 0.002)   # widen the read-then-append race a little
    marker = f"{who}/{i}"
    try:
        event = CheckpointDiscarded(job="shared", path=marker, reason="contend")
        recs = j.append("job:shared", [event], expected_version=v)
        ok.append([marker, recs[0].version])
    except ConcurrencyError as e:
        assert e.expected == v and e.actual > v, (e.expected, e.actual, v)
        lost.append(marker)
print(json.dumps({"ok": ok, "lost": lost}), flush=True)
"""


def test_two_processes_appending_with_expected_versions(jpath: Path):
    Journal.create(jpath).close()
    go = jpath.parent / "go"
    n = 120
    kids = [
        subprocess.Popen(
            [sys.executable, "-c", CONTEND_CHILD, str(jpath), who, str(n), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=jpath.parent,
        )
        for who in ("A", "B")
    ]
    try:
        for k in kids:
            assert k.stdout.readline().strip() == "ready", k.stderr.read()
        go.touch()
        results = []
        for k in kids:
            out, err = k.communicate(timeout=60)
            assert k.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for k in kids:
            if k.poll() is None:
                k.kill()
                k.wait()
    ok = {m: v for r in results for m, v in r["ok"]}
    lost = {m for r in results for m in r["lost"]}
    assert len(ok) + len(lost) == 2 * n
    assert lost, "the two writers never raced: the test did not exercise ConcurrencyError"

    j = Journal.open(jpath)
    try:
        rows = j.conn.execute("SELECT stream, version, body FROM events ORDER BY seq").fetchall()
        assert j.integrity_check() == "ok"
    finally:
        j.close()
    assert len(rows) == len(ok), "appended events != successes counted by both writers"
    assert len({(s, v) for s, v, _ in rows}) == len(rows), "duplicate (stream, version)"
    assert sorted(v for _, v, _ in rows) == list(range(1, len(rows) + 1))
    stored = {T.decode(b).path: v for _, v, b in rows}
    assert stored == ok  # each success is stored at the version it was told
    assert not (lost & stored.keys()), "a ConcurrencyError left its event behind"


def test_rows_matches_read_and_survives_a_gap(journal: Journal):
    """The replay path (seq, ts, event) agrees with read(); it derives seq from the count only
    when a chunk has no gap, so a journal with a hole (never written by ftctl) still replays right."""
    for i in range(25):
        journal.append(f"job:{i % 3}", [ev(str(i % 3), i)])
    want = [(r.seq, r.ts, r.event) for r in journal.read()]
    assert list(journal.rows(chunk=4)) == want
    journal.conn.execute("DELETE FROM events WHERE seq IN (6, 7, 19)")
    want = [w for w in want if w[0] not in (6, 7, 19)]
    assert list(journal.rows(chunk=4)) == want
    assert list(journal.rows(after=5, to=20, chunk=3)) == [w for w in want if 5 < w[0] <= 20]


def test_a_batch_naming_a_stream_twice_continues_its_versions_and_seqs_are_the_rows(jpath: Path):
    j = Journal.create(jpath)
    try:
        j.append("job:a", [T.CheckpointDiscarded(job="a", path="p0", reason="r")])
        e = [T.CheckpointDiscarded(job="a", path=f"p{k}", reason="r") for k in range(1, 4)]
        recs = j.append_batch([("job:a", e[:1], 1), ("job:b", e[1:2], 0), ("job:a", e[2:], 2)])
        assert [(r.stream, r.version) for r in recs] == [("job:a", 2), ("job:b", 1), ("job:a", 3)]
        assert [r.seq for r in recs] == [2, 3, 4]
        assert [(r.seq, r.stream, r.version, r.event) for r in j.read(after=1)] == [
            (r.seq, r.stream, r.version, r.event) for r in recs
        ]
        # the second part expects the version before the first part
        with pytest.raises(ConcurrencyError):
            j.append_batch([("job:a", e[:1], 3), ("job:a", e[1:2], 3)])
        assert j.last_seq() == 4
    finally:
        j.close()
