"""Replay speed: a journal of a million realistic events, folded from scratch and from a snapshot.

    python bench/replay.py [EVENTS] [--profile] [--keep DIR]

Builds the journal quickly (rows inserted with executemany in big transactions, bodies made by
types.encode), then times
  (a) a full replay, load(journal, snapshot=False)        goal >= 500k events/s
  (b) a rebuild from the latest snapshot + a ~1000-event tail, load(journal)   goal <= 100 ms
--profile runs (a) under cProfile and prints where the time goes.
"""

from __future__ import annotations

import cProfile
import functools
import pstats
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ftctl.core import state as S
from ftctl.events import types as T
from ftctl.events.journal import Journal
from ftctl.recovery.replay import load

CONFIG = {
    "model": "models/Qwen2.5-0.5B-Instruct-4bit",
    "fine_tune_type": "lora",
    "num_layers": 16,
    "batch_size": 4,
    "iters": 2000,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 50,
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "seed": 0,
    "lora_parameters": {
        "rank": 8,
        "scale": 20.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    },
}


def job_events(job: str, rng: random.Random) -> list[T.EventBase]:
    """One job's life: submitted, started, checkpoint pairs, evaluations, retention prunes,
    sometimes a crash and a resume, completed."""
    out: list[T.EventBase] = [
        T.JobSubmitted(
            job=job,
            name=f"alpaca-{job[-5:]}",
            data_path=f"/data/{job}/train.jsonl",
            data_sha256="a" * 64,
            data_format="chat",
            examples=rng.randrange(500, 50_000),
            valid_path=f"/data/{job}/valid.jsonl",
            valid_sha256="b" * 64,
            config=CONFIG,
            config_sha256="c" * 64,
        )
    ]
    ckpts = rng.randrange(20, 60)
    crash_at = rng.randrange(ckpts) if rng.random() < 0.2 else -1
    kept: list[str] = []
    attempt, step = 1, 0
    out.append(
        T.TrainingStarted(
            job=job,
            attempt=attempt,
            worker_pid=rng.randrange(1000, 99999),
            worker_started_at=1.7e9 + rng.random(),
            base_model=CONFIG["model"],
        )
    )
    for c in range(ckpts):
        step += 50
        path = f"checkpoints/{job}/step-{step:07d}"
        out.append(T.CheckpointStarted(job=job, step=step, global_step=step))
        out.append(
            T.CheckpointCommitted(
                job=job,
                checkpoint=T.CheckpointRecord(
                    step=step,
                    global_step=step,
                    path=path,
                    manifest_sha256="d" * 64,
                    bytes=52_428_800,
                    train_loss=2.0 / (1 + c),
                    val_loss=None,
                ),
            )
        )
        kept.append(path)
        if c % 4 == 3:
            out.append(T.Evaluated(job=job, step=step, global_step=step, val_loss=2.1 / (1 + c)))
        if len(kept) > 3:
            out.append(
                T.CheckpointPruned(job=job, step=step - 200, path=kept.pop(0), reason="retention")
            )
        if c == crash_at:
            out.append(
                T.Crashed(
                    job=job,
                    category="oom",
                    step=step,
                    signal=9,
                    evidence="Killed",
                    suggestion="lower batch_size",
                )
            )
            out.append(T.Requeued(job=job, reason="crash: oom", not_before=1.7e9 + 30))
            attempt += 1
            out.append(
                T.TrainingStarted(
                    job=job,
                    attempt=attempt,
                    worker_pid=rng.randrange(1000, 99999),
                    worker_started_at=1.7e9 + rng.random(),
                    resume_step=step,
                    resume_checkpoint=path,
                    base_model=CONFIG["model"],
                )
            )
    out.append(
        T.Completed(
            job=job,
            step=step,
            global_step=step,
            adapter_path=f"adapters/{job}/adapters.safetensors",
            adapter_sha256="e" * 64,
            checkpoint=kept[-1],
        )
    )
    return out


def rows(first_job: int, n_events: int, rng: random.Random, ts: str):
    """(stream, version, ts, type, body) rows for whole jobs, two at a time interleaved."""
    made, k = 0, first_job
    while made < n_events:
        pair = [job_events(f"job-{k + i:07d}", rng) for i in range(2)]
        k += 2
        iters = [iter(enumerate(evs, 1)) for evs in pair]
        while iters:
            for it in list(iters):
                nxt = next(it, None)
                if nxt is None:
                    iters.remove(it)
                    continue
                v, e = nxt
                made += 1
                yield (S.job_stream(e.job), v, ts, e.__struct_config__.tag, T.encode(e).decode())


def fill(j: Journal, events: int, first_job: int, rng: random.Random) -> int:
    insert = "INSERT INTO events (stream, version, ts, type, body) VALUES (?, ?, ?, ?, ?)"
    gen = rows(first_job, events, rng, "2026-01-01T00:00:00.000000Z")
    conn = j.conn
    while True:
        chunk = [r for _, r in zip(range(100_000), gen)]
        if not chunk:
            break
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, chunk)
        conn.execute("COMMIT")
    return j.last_seq()


def timed(f, reps: int):
    """Best wall-clock and best CPU seconds of ``reps`` runs of f, and its last result. The CPU
    figure is the one to compare across runs when other processes share the machine."""
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        out = f()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), walls, out


def main() -> None:
    args = sys.argv[1:]
    profile = "--profile" in args
    keep = args[args.index("--keep") + 1] if "--keep" in args else None
    nums = [a for a in args if a.isdigit()]
    n = int(nums[0]) if nums else 1_000_000
    base = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="ftctl-replay-"))
    base.mkdir(parents=True, exist_ok=True)
    path = base / "journal.db"
    rng = random.Random(0)
    try:
        if path.exists():
            j = Journal.open(path)
            print(f"reusing {path}: {j.last_seq()} events")
        else:
            t0 = time.perf_counter()
            j = Journal.create(path)
            fill(j, n, 0, rng)
            j.conn.execute("DELETE FROM snapshots")
            print(
                f"built {j.last_seq():,} events in {time.perf_counter() - t0:.1f} s "
                f"({path.stat().st_size / 1e6:.0f} MB)"
            )
        total = j.last_seq()

        # the same-run baseline: sqlite3 alone handing Python every row's time and body (no decode, no fold)
        def scan():
            n = 0
            for _ in j.conn.execute("SELECT ts, body FROM events ORDER BY seq"):
                n += 1
            return n

        base_wall, base_cpu, base_walls, _ = timed(scan, 3)
        print(
            f"(0) baseline, a bare sqlite3 scan of (ts, body): {base_wall:.2f} s wall "
            f"(runs {', '.join(f'{t:.2f}' for t in base_walls)}), {base_cpu:.2f} s CPU"
        )

        # (a) full replay
        wall, cpu, walls, p = timed(lambda: load(j, snapshot=False), 3)
        assert p.seq == total
        rate = total / wall
        print(
            f"(a) full replay: {total:,} events in {wall:.2f} s wall (runs {', '.join(f'{t:.2f}' for t in walls)}), "
            f"{cpu:.2f} s CPU = {rate / 1e3:,.0f}k events/s wall, {total / cpu / 1e3:,.0f}k/s CPU  "
            f"goal >= 500k: {'PASS' if rate >= 500_000 else 'MISS'}"
        )
        print(
            f"    = {wall / base_wall:.2f}x the bare scan's wall time, {cpu / base_cpu:.2f}x its CPU time"
        )
        _, read_cpu, _, _ = timed(lambda: sum(1 for _ in j.rows()), 2)
        _, fold_cpu, _, _ = timed(functools.partial(S.fold_rows, list(j.rows())), 2)
        print(
            f"    of which: Journal.rows (SQLite + decode) {read_cpu / total * 1e6:.2f} us/event CPU, "
            f"fold (reducer) {fold_cpu / total * 1e6:.2f} us/event CPU"
        )
        print(
            f"    projection: {len(p.jobs):,} jobs, states {sorted({js.state for js in p.jobs.values()})}"
        )
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            load(j, snapshot=False)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)

        # (b) snapshot near the end, a realistic tail after it, then rebuild
        blob = S.to_snapshot(p)
        j.save_snapshot(p.seq, S.SNAPSHOT_FORMAT, blob)
        tail_from = total
        fill(j, 1000, len(p.jobs) + 10, rng)
        tail = j.last_seq() - tail_from
        wall, cpu, walls, q = timed(lambda: load(j), 5)
        assert q.seq == j.last_seq() and q == load(j, snapshot=False)
        _, snap_cpu, _, _ = timed(
            lambda: S.from_snapshot(j.latest_snapshot(S.SNAPSHOT_FORMAT)[1]), 5
        )
        ms = wall * 1e3
        print(
            f"(b) snapshot ({len(blob) / 1e6:.1f} MB for {len(p.jobs):,} jobs) + {tail} tail events: {ms:.0f} ms wall "
            f"(runs {', '.join(f'{t * 1e3:.0f}' for t in walls)}), {cpu * 1e3:.0f} ms CPU, of which reading and "
            f"decoding the snapshot {snap_cpu * 1e3:.0f} ms  goal <= 100 ms: {'PASS' if ms <= 100 else 'MISS'}"
        )
        j.close()
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
