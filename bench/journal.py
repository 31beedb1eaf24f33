"""Durable append throughput: Journal.append against a raw sqlite3 loop with the same pragmas.

    python bench/journal.py [N] [DIR]

N single-event appends (default 2000) through Journal.append, and N through a bare
``BEGIN IMMEDIATE; INSERT; COMMIT`` loop on a table of the same shape (WAL, synchronous=FULL),
same row, same filesystem (DIR, default a temp dir). Each side runs three times, interleaved;
the median rate counts. Then batched appends: 100 events per Journal.append, in events/s
(and the raw loop with 100 rows per commit, for scale).
Goals: single appends at >= 0.8x the raw loop; 100 events per append at >= 0.9x the raw loop
with 100 rows per commit (issue 10).
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ftctl.events.journal import Journal, utc_now
from ftctl.events.types import CheckpointCommitted, CheckpointRecord, encode

EVENT = CheckpointCommitted(
    job="20260101-120000-alpaca-lora",
    checkpoint=CheckpointRecord(
        step=1200,
        global_step=1200,
        path="checkpoints/20260101-120000-alpaca-lora/step-0001200",
        manifest_sha256="9f2c1e0b7d8a6f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c",
        bytes=52_428_800,
        train_loss=1.2345,
        val_loss=1.3456,
    ),
)
BODY = encode(EVENT).decode()


def raw_rate(path: Path, n: int, per_commit: int = 1) -> float:
    """Events/s of a bare loop: ``per_commit`` inserts per BEGIN IMMEDIATE ... COMMIT."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL, "
        "ts TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL)"
    )
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS idx_events_stream_version ON events (stream, version)"
    )
    stream = "job:raw"
    v = conn.execute(
        "SELECT coalesce(max(version), 0) FROM events WHERE stream = ?", (stream,)
    ).fetchone()[0]
    t0 = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        ts = utc_now()
        for _ in range(per_commit):
            v += 1
            conn.execute(
                "INSERT INTO events (stream, version, ts, type, body) VALUES (?, ?, ?, ?, ?)",
                (stream, v, ts, "checkpoint_committed", BODY),
            )
        conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return n * per_commit / dt


def journal_rate(j: Journal, n: int) -> float:
    stream = "job:bench"
    v = j.stream_version(stream)
    t0 = time.perf_counter()
    for i in range(n):
        j.append(stream, [EVENT], expected_version=v + i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    base = Path(
        tempfile.mkdtemp(prefix="ftctl-bench-", dir=sys.argv[2] if len(sys.argv) > 2 else None)
    )
    try:
        j = Journal.create(base / "journal.db")
        raw_path = base / "raw.db"
        raws, journals = [], []
        for _ in range(3):
            raws.append(raw_rate(raw_path, n))
            journals.append(journal_rate(j, n))
        raw, jr = statistics.median(raws), statistics.median(journals)
        print(f"filesystem dir: {base}  row body: {len(BODY)} bytes  N={n} x3 interleaved")
        print(
            f"raw sqlite3 (WAL, FULL, BEGIN IMMEDIATE): {raw:8.0f} commits/s   runs {[round(r) for r in raws]}"
        )
        print(
            f"Journal.append, 1 event:                  {jr:8.0f} appends/s   runs {[round(r) for r in journals]}"
        )
        ratio = jr / raw
        print(f"ratio: {ratio:.2f}x raw  (goal >= 0.8x): {'PASS' if ratio >= 0.8 else 'MISS'}")

        batch = [EVENT] * 100
        appends = max(20, n // 10)
        raws, journals = [], []
        for _ in range(3):
            raws.append(raw_rate(raw_path, appends, per_commit=100))
            v = j.stream_version("job:batch")
            t0 = time.perf_counter()
            for i in range(appends):
                j.append("job:batch", batch, expected_version=v + 100 * i)
            journals.append(appends * 100 / (time.perf_counter() - t0))
        raw, jr = statistics.median(raws), statistics.median(journals)
        print(
            f"raw sqlite3, 100 rows per commit:         {raw:8.0f} events/s   runs {[round(r) for r in raws]}"
        )
        print(
            f"Journal.append, 100 events per append:    {jr:8.0f} events/s   runs {[round(r) for r in journals]}"
            f"  ({jr / 100:.0f} appends/s)"
        )
        ratio = jr / raw
        print(
            f"ratio: {ratio:.2f}x raw, 100 per transaction  (goal >= 0.9x): {'PASS' if ratio >= 0.9 else 'MISS'}"
        )
        assert j.integrity_check() == "ok"
        j.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
