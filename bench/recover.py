"""How long does recovery take on a workspace whose journal holds a million events?

    python bench/recover.py [--events 1000000] [--tail 400] [--ckpt-kb 16] [--repeat 3] [--keep DIR]

Builds a workspace:
  * journal.db with EVENTS realistic events over many jobs, one after another as the daemon runs
    them: most completed (some after a crash and a resume), some failed after three crashes at
    the same step, some cancelled mid-training, some rejected; the daemon stopped and started
    every 50 jobs. Rows go in with executemany in large transactions (as bench/replay.py does),
    bodies made by events.types.encode; retention is core.retention.to_prune (keep_last 3 + best).
  * every checkpoint the journal still holds exists on disk, as hard links to one small valid
    checkpoint (--ckpt-kb), so recovery's verification really opens, reads and hashes files;
  * a snapshot written by one call to recovery.replay.load, then a small tail: a daemon that
    started, trained a job and died (dead worker pid), leaving a temp checkpoint folder.
    Recovery has three things to repair: the daemon, the job, the folder.

Timed, each on a fresh copy of that journal (warm page cache):
  (1) `ftctl recover --json` as a subprocess, end to end (interpreter start-up included);
  (2) in-process, what the command does: Ledger(Journal.open) = snapshot + tail, then
      reconcile.recover (plan, apply, plan again until nothing is left), with its phases;
  (3) for comparison, snapshots disabled: load(journal, snapshot=False) in-process, and (1) on a
      journal whose snapshots were deleted (the first start after losing them writes a new one).
  (4) `ftctl status` and `status --json`, (6) `ftctl replay JOB --to SEQ --json` at points all over the
      journal, on the recovered workspace; (0) `python -c pass` in the same run is the baseline each
      subprocess figure is divided by.
Goal (issue 10): (1), (2), (4) and every (6) <= 0.5 s with snapshots.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from ftctl.adapters import checkpoint as ck
from ftctl.adapters.workspace import Workspace, init_workspace
from ftctl.control import recover as control_recover
from ftctl.control.ledger import Ledger
from ftctl.core.config import Config, config_sha256, config_to_dict, decode_config
from ftctl.core.retention import to_prune
from ftctl.core.state import DAEMON_STREAM, SNAPSHOT_FORMAT, JobState, job_stream
from ftctl.events import types as T
from ftctl.events.journal import Journal
from ftctl.recovery import reconcile
from ftctl.recovery.replay import load

SAVE_EVERY = 50
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_config(model: str) -> tuple[dict, str]:
    cfg, _ = decode_config(
        {
            "model": model,
            "iters": 2000,
            "batch_size": 4,
            "learning_rate": 1e-5,
            "steps_per_report": 10,
            "steps_per_eval": 200,
            "save_every": SAVE_EVERY,
            "max_seq_length": 2048,
            "num_layers": 16,
            "lora_parameters": {
                "rank": 8,
                "scale": 20.0,
                "dropout": 0.0,
                "keys": ["self_attn.q_proj", "self_attn.v_proj"],
            },
        }
    )
    return config_to_dict(cfg), config_sha256(cfg)


class Gen:
    """Job lives as event lists, and the checkpoint folders the journal ends up holding."""

    def __init__(self, home: Path, config: dict, sha: str, rng: random.Random):
        self.home, self.config, self.sha, self.rng = home, config, sha, rng
        self.typed = msgspec.convert(config, Config)
        self.kept: list[str] = []  # checkpoint paths still committed (not pruned) at the end

    def _ckpt_path(self, job: str, step: int) -> str:
        return str(self.home / "jobs" / job / "checkpoints" / ck.step_dir_name(step))

    def _started(
        self, job: str, attempt: int, resume: int = 0, path: str | None = None
    ) -> T.TrainingStarted:
        r = self.rng
        return T.TrainingStarted(
            job=job,
            attempt=attempt,
            worker_pid=r.randrange(1000, 4_000_000),
            worker_started_at=T0 + r.random() * 1e7,
            resume_step=resume,
            resume_checkpoint=path,
            base_model=self.config["model"],
        )

    def _checkpoints(
        self, job: str, out: list, refs: list[T.CheckpointRecord], steps: range
    ) -> None:
        for step in steps:
            if step % 200 == 0:
                out.append(
                    T.Evaluated(
                        job=job,
                        step=step,
                        global_step=step,
                        val_loss=2.0 / (1 + step / 300) + self.rng.random() * 0.05,
                    )
                )
            val = out[-1].val_loss if isinstance(out[-1], T.Evaluated) else None
            path = self._ckpt_path(job, step)
            out.append(T.CheckpointStarted(job=job, step=step, global_step=step))
            record = T.CheckpointRecord(
                step=step,
                global_step=step,
                path=path,
                manifest_sha256="d" * 64,
                bytes=16_384,
                train_loss=2.1 / (1 + step / 300),
                val_loss=val,
            )
            out.append(T.CheckpointCommitted(job=job, checkpoint=record))
            refs[:] = [c for c in refs if c.path != path]
            refs.append(record)
            victims = to_prune(JobState(job=job, config=self.typed, checkpoints=refs))
            out += [
                T.CheckpointPruned(
                    job=job,
                    step=c.step,
                    path=c.path,
                    reason="retention: keep_last=3, keep_best=True",
                )
                for c in victims
            ]
            gone = {c.path for c in victims}
            refs[:] = [c for c in refs if c.path not in gone]

    def submitted(self, job: str) -> T.JobSubmitted:
        return T.JobSubmitted(
            job=job,
            name=f"alpaca-{job}",
            data_path=f"/data/{job}/train.jsonl",
            data_sha256="a" * 64,
            data_format="chat",
            examples=self.rng.randrange(500, 50_000),
            valid_path=f"/data/{job}/valid.jsonl",
            valid_sha256="b" * 64,
            config=self.config,
            config_sha256=self.sha,
        )

    def rejected(self, job: str) -> T.JobRejected:
        return T.JobRejected(
            job=job,
            name=f"data-{job}",
            data_path=f"/data/{job}.jsonl",
            data_sha256="a" * 64,
            reasons=["12% of the lines are bad (more than 5%)"],
            problems=["line 3: not JSON"],
        )

    def live_job(self, job: str, pid: int, upto: int) -> list[T.EventBase]:
        """Submitted, trained by a worker that is gone now, left `training` after a checkpoint."""
        out: list[T.EventBase] = [
            self.submitted(job),
            T.TrainingStarted(
                job=job,
                attempt=1,
                worker_pid=pid,
                worker_started_at=time.time() - 60,
                base_model=self.config["model"],
            ),
        ]
        refs: list[T.CheckpointRecord] = []
        self._checkpoints(job, out, refs, range(SAVE_EVERY, upto + 1, SAVE_EVERY))
        self.kept += [c.path for c in refs]
        return out

    def job(self, n: int) -> list[T.EventBase]:
        r, job = self.rng, f"{n:04d}"
        kind = r.random()
        if kind < 0.03:
            return [self.rejected(job)]
        out: list[T.EventBase] = [self.submitted(job)]
        last = SAVE_EVERY * r.randrange(20, 60)
        refs: list[T.CheckpointRecord] = []
        out.append(self._started(job, 1))
        if kind < 0.07:  # fails: the same exception at the same step three times
            at = SAVE_EVERY * r.randrange(2, 10)
            self._checkpoints(job, out, refs, range(SAVE_EVERY, at + 1, SAVE_EVERY))
            for attempt in range(2, 5):
                out.append(
                    T.Crashed(
                        job=job,
                        category="exception",
                        step=at + 7,
                        exit_code=1,
                        evidence="Traceback ...\nValueError: bad batch",
                        suggestion="read the traceback",
                    )
                )
                if attempt == 4:
                    out.append(
                        T.Failed(
                            job=job,
                            reason="exception three times at the same step",
                            category="exception",
                        )
                    )
                else:
                    out.append(
                        T.Requeued(
                            job=job,
                            reason=f"restart {attempt - 1}/3 after exception",
                            not_before=T0,
                        )
                    )
                    out.append(self._started(job, attempt, at, refs[-1].path))
        elif kind < 0.10:  # cancelled mid-training
            at = SAVE_EVERY * r.randrange(2, 10)
            self._checkpoints(job, out, refs, range(SAVE_EVERY, at + 1, SAVE_EVERY))
            out.append(T.ControlRequested(job=job, action="cancel"))
            out.append(
                T.Crashed(
                    job=job,
                    category="killed",
                    step=at + 3,
                    exit_code=-9,
                    signal=9,
                    evidence="cancelled by user",
                )
            )
            out.append(T.Cancelled(job=job, reason="cancelled by user"))
        else:  # completed, one in six after a crash and a resume
            crash = SAVE_EVERY * r.randrange(1, last // SAVE_EVERY) if r.random() < 0.17 else 0
            self._checkpoints(job, out, refs, range(SAVE_EVERY, (crash or last) + 1, SAVE_EVERY))
            if crash:
                out.append(
                    T.Crashed(
                        job=job,
                        category="oom",
                        step=crash + 13,
                        exit_code=-9,
                        signal=9,
                        evidence="exit code -9 (signal SIGKILL)",
                        suggestion="lower batch_size",
                    )
                )
                out.append(
                    T.Requeued(job=job, reason="restart 1/3 after oom, in 2 s", not_before=T0)
                )
                out.append(self._started(job, 2, crash, refs[-1].path))
                self._checkpoints(job, out, refs, range(crash + SAVE_EVERY, last + 1, SAVE_EVERY))
            out.append(
                T.Completed(
                    job=job,
                    step=last,
                    global_step=last,
                    adapter_path=str(self.home / "jobs" / job / "adapters"),
                    adapter_sha256="e" * 64,
                    checkpoint=refs[-1].path,
                )
            )
        self.kept += [c.path for c in refs]
        return out


class Writer:
    """Rows with per-stream versions and increasing timestamps, inserted in big transactions."""

    SQL = "INSERT INTO events (stream, version, ts, type, body) VALUES (?, ?, ?, ?, ?)"

    def __init__(self, conn: sqlite3.Connection, now: float):
        self.conn, self.now, self.rows, self.count = conn, now, [], 0
        self.versions: dict[str, int] = {}

    def add(self, stream: str, events: list[T.EventBase]) -> None:
        v = self.versions.get(stream, 0)
        for e in events:
            v += 1
            self.now += 1.7
            ts = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.now))
                + f".{int(self.now % 1 * 1e6):06d}Z"
            )
            self.rows.append((stream, v, ts, e.__struct_config__.tag, T.encode(e).decode()))
        self.versions[stream] = v
        self.count += len(events)
        if len(self.rows) >= 100_000:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(self.SQL, self.rows)
            self.conn.execute("COMMIT")
            self.rows = []


def template_checkpoint(dest: Path, kb: int) -> Path:
    """One small valid checkpoint (adapter + optimizer tensors of about kb KiB together)."""
    import mlx.core as mx

    n = max(1, kb * 1024 // 4 // 6)
    arrays = {
        f"model.layers.{i}.self_attn.q_proj.lora_a": mx.random.normal((n // 8, 8)) for i in range(2)
    }
    opt = {
        **{f"{k}.m": v for k, v in arrays.items()},
        **{f"{k}.v": v for k, v in arrays.items()},
        "step": mx.array(100),
    }
    info = ck.save_checkpoint(
        dest,
        ck.Checkpoint(
            adapters=arrays,
            adapter_config={
                "fine_tune_type": "lora",
                "num_layers": 16,
                "lora_parameters": {"rank": 8},
            },
            optimizer=opt,
            state=ck.TrainState(job_step=100, global_step=100, cursor=ck.Cursor(0, 400), seed=0),
        ),
    )
    return Path(info.path)


def place_checkpoints(paths: list[str], template: Path) -> int:
    files = sorted(p.name for p in template.iterdir())
    for path in paths:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(template / f, d / f)
    return len(paths) * len(files)


def build(base: Path, n_events: int, tail: int, kb: int) -> dict:
    home = base / "ws"
    init_workspace(home, str(base / "models" / "base-0.5B"))
    config, sha = make_config(str(base / "models" / "base-0.5B"))
    rng = random.Random(0)
    gen = Gen(home, config, sha, rng)
    conn = sqlite3.connect(home / "journal.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # building only; the timed runs use the journal's own settings
    conn.execute("PRAGMA synchronous=OFF")
    w = Writer(conn, T0)
    t0 = time.perf_counter()

    def daemon_started() -> T.DaemonStarted:
        return T.DaemonStarted(
            process=T.ProcessId(rng.randrange(1000, 4_000_000), T0 + rng.random() * 1e7),
            host="trainbox",
            version="0.1.0",
        )

    w.add(DAEMON_STREAM, [daemon_started()])
    n = 0
    body_target = n_events - tail
    while w.count < body_target:
        n += 1
        w.add(job_stream(f"{n:04d}"), gen.job(n))
        if n % 50 == 0:
            w.add(
                DAEMON_STREAM, [T.DaemonStopped(pid=1, reason="ftctl shutdown"), daemon_started()]
            )
    w.add(DAEMON_STREAM, [T.DaemonStopped(pid=1, reason="queue empty (--until-idle)")])
    w.flush()
    built = time.perf_counter() - t0

    # the snapshot: one load, as any daemon start or CLI read would do
    j = Journal.open(home / "journal.db")
    t0 = time.perf_counter()
    p = load(j)
    full = time.perf_counter() - t0
    snap_seq = j.latest_snapshot(SNAPSHOT_FORMAT)[0]
    j.close()

    # the tail: a daemon starts and trains one job, dies mid-run; more jobs wait in the queue
    n += 1
    live = f"{n:04d}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    w.add(DAEMON_STREAM, [daemon_started()])
    w.add(job_stream(live), gen.live_job(live, dead.pid, upto=SAVE_EVERY * 12))
    while w.count < n_events:
        n += 1
        job = f"{n:04d}"
        w.add(job_stream(job), [gen.submitted(job) if rng.random() > 0.03 else gen.rejected(job)])
    w.flush()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    total = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    conn.close()

    t0 = time.perf_counter()
    template = template_checkpoint(base / "template", kb)
    links = place_checkpoints(gen.kept, template)
    placed = time.perf_counter() - t0
    shutil.copyfile(home / "journal.db", base / "pristine.db")
    return {
        "home": home,
        "jobs": len(p.jobs) + 1,
        "total": total,
        "snap_seq": snap_seq,
        "built_s": built,
        "full_load_s": full,
        "checkpoints": len(gen.kept),
        "links": links,
        "placed_s": placed,
        "ckpt_bytes": sum(f.stat().st_size for f in template.iterdir()),
        "live": live,
        "mb": (home / "journal.db").stat().st_size / 1e6,
    }


def restore(info: dict, *, drop_snapshots: bool = False) -> None:
    home = info["home"]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home / 'journal.db'}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(home.parent / "pristine.db", home / "journal.db")
    os.chmod(home / "journal.db", 0o600)
    debris = home / "jobs" / info["live"] / "checkpoints" / ".tmp-step-99999999-4242"
    debris.mkdir(parents=True, exist_ok=True)
    (debris / "adapters.safetensors").write_bytes(b"\0" * 1024)
    if drop_snapshots:
        con = sqlite3.connect(home / "journal.db", isolation_level=None)
        con.execute("DELETE FROM snapshots")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()


def subprocess_recover(home: Path, label: str = "recover") -> tuple[float, dict]:
    c0, t0 = _child_cpu(), time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "ftctl.cli", "recover", "--json", "--home", str(home)],
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t0
    CPU.setdefault(label, []).append(_child_cpu() - c0)
    if p.returncode != 0:
        raise SystemExit(f"ftctl recover exited {p.returncode}:\n{p.stderr}")
    return dt, json.loads(p.stdout)


CPU: dict[str, list[float]] = {}  # label -> CPU seconds (user + system) of each subprocess run


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def precompile() -> int:
    """Write ftctl's .pyc files, as an install (or any first run without PYTHONDONTWRITEBYTECODE) does."""
    import compileall
    import importlib

    n = 0
    for name in ("cli", "control", "core", "events", "recovery", "adapters"):
        folder = Path(importlib.import_module(f"ftctl.{name}").__file__).parent
        compileall.compile_dir(str(folder), quiet=1, maxlevels=0)
        n += len(list(folder.glob("*.py")))
    return n


def subprocess_cli(*argv: str, label: str | None = None) -> float:
    """Wall seconds of one `ftctl ARGV` (its CPU seconds go to CPU[label]: on a shared machine the
    CPU figure is the one that does not depend on what else runs)."""
    c0, t0 = _child_cpu(), time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ftctl.cli", *argv], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    CPU.setdefault(label or " ".join(argv[:2]), []).append(_child_cpu() - c0)
    if p.returncode != 0:
        raise SystemExit(f"ftctl {' '.join(argv)} exited {p.returncode}:\n{p.stderr}")
    return dt


def subprocess_bare() -> float:
    """The same-run baseline: an interpreter that starts and exits (what no command can beat)."""
    c0, t0 = _child_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    dt = time.perf_counter() - t0
    CPU.setdefault("bare", []).append(_child_cpu() - c0)
    return dt


class Verify:
    """Counts and times checkpoint verification inside reconcile.plan."""

    def __init__(self):
        self.calls, self.seconds, self.orig = 0, 0.0, ck.verify_checkpoint

    def __enter__(self):
        def timed(path):
            t0 = time.perf_counter()
            try:
                return self.orig(path)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - t0

        ck.verify_checkpoint = timed
        return self

    def __exit__(self, *exc):
        ck.verify_checkpoint = self.orig


def in_process(info: dict, *, snapshot: bool) -> dict:
    home = info["home"]
    ws = Workspace(home)
    t0 = time.perf_counter()
    j = Journal.open(home / "journal.db")
    if snapshot:
        ledger = Ledger(j)
    else:
        ledger = Ledger.__new__(Ledger)
        ledger.journal, ledger.state = j, load(j, snapshot=False)
        ledger.write_snapshots, ledger.snapshot_seq = True, ledger.state.seq
    t1 = time.perf_counter()
    with Verify() as v1:
        repairs = reconcile.plan(ws, ledger)
    t2 = time.perf_counter()
    with Verify() as v2:
        done = control_recover.recover(ws, ledger)
    t3 = time.perf_counter()
    ledger.close()
    return {
        "open_load": t1 - t0,
        "plan": t2 - t1,
        "verify": v1.seconds,
        "verified": v1.calls,
        "planned": len(repairs),
        "recover": t3 - t2,
        "recover_verify": v2.seconds,
        "repairs": len(done),
        "total": (t1 - t0) + (t3 - t2),
    }


def med(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--tail", type=int, default=400, help="events after the snapshot")
    ap.add_argument(
        "--ckpt-kb", type=int, default=16, help="size of each on-disk checkpoint's tensors"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="build in (and keep) this folder")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ftctl-recover-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        info = build(base, args.events, args.tail, args.ckpt_kb)
        print(
            f"workspace {info['home']}: {info['total']:,} events ({info['mb']:.0f} MB), {info['jobs']:,} jobs, "
            f"snapshot at seq {info['snap_seq']:,} (tail {info['total'] - info['snap_seq']} events); built in "
            f"{info['built_s']:.1f} s; full replay + snapshot write {info['full_load_s']:.2f} s"
        )
        print(
            f"on disk: {info['checkpoints']:,} committed checkpoints ({info['ckpt_bytes'] / 1024:.0f} KiB each, "
            f"{info['links']:,} hard links, placed in {info['placed_s']:.1f} s)"
        )

        compiled = precompile()
        print(
            f"bytecode: compiled {compiled} ftctl modules first (PYTHONDONTWRITEBYTECODE="
            f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r} here; an installed ftctl has its .pyc files, "
            "and without them every subprocess below would also compile ftctl from source)"
        )
        restore(info)
        first = subprocess_recover(info["home"], "recover (first)")[1]
        print("repairs found: " + "; ".join(r["what"] for r in first["repairs"]))

        empty = base / "empty"
        if not (empty / "journal.db").exists():
            init_workspace(empty, str(base / "models" / "base-0.5B"))
        startup = [
            subprocess_recover(empty, "recover (empty workspace)")[0] for _ in range(args.repeat)
        ]

        # The queries, on the recovered journal: `status` (a person's table and --json), and time
        # travel to points all over the journal (snapshot milestones make each a short tail away).
        restore(info)
        # the state a user finds after `ftctl start` / `recover`
        subprocess_recover(info["home"], "recover (setup)")
        total, home = info["total"], str(info["home"])
        points = [1_000, total // 4 + 17, total // 2 + 1, 3 * total // 4 - 123, total - 300, total]
        job_at = {}
        j = Journal.open(info["home"] / "journal.db")
        for seq in points:
            row = j.conn.execute(
                "SELECT stream FROM events WHERE seq <= ? AND stream LIKE 'job:%' ORDER BY seq DESC LIMIT 1",
                (seq,),
            ).fetchone()
            job_at[seq] = row[0][4:]
        snaps = j.snapshot_seqs(SNAPSHOT_FORMAT)
        j.close()
        print(
            f"snapshots kept: {len(snaps)} ({sum(b for _, b in snaps) / 1e6:.1f} MB stored) at seq "
            + ", ".join(f"{s:,}" for s, _ in snaps)
        )
        bare, status_, status_json, travel = [], [], [], {s: [] for s in points}
        for _ in range(args.repeat):
            bare.append(subprocess_bare())
            status_.append(subprocess_cli("status", "--home", home, label="status"))
            status_json.append(
                subprocess_cli("status", "--json", "--home", home, label="status --json")
            )
            for s in points:
                travel[s].append(
                    subprocess_cli(
                        "replay",
                        job_at[s],
                        "--to",
                        str(s),
                        "--json",
                        "--home",
                        home,
                        label=f"replay {s}",
                    )
                )

        sub, sub_nosnap, ip, ip_nosnap = [], [], [], []
        for _ in range(args.repeat):
            restore(info)
            sub.append(subprocess_recover(info["home"])[0])
            restore(info)
            ip.append(in_process(info, snapshot=True))
            restore(info)
            ip_nosnap.append(in_process(info, snapshot=False))
            restore(info, drop_snapshots=True)
            sub_nosnap.append(subprocess_recover(info["home"], "recover (no snapshots)")[0])

        def row(name, xs, goal=None, cpu=None):
            verdict = "" if goal is None else ("  PASS" if med(xs) <= goal else "  MISS")
            extra = ""
            if cpu in CPU:
                c = CPU[cpu]
                extra = f"   CPU {med(c):.3f} s (runs {', '.join(f'{x:.3f}' for x in c)})"
                if goal is not None:
                    extra += "  PASS (CPU)" if med(c) <= goal else "  MISS (CPU)"
            print(
                f"  {name:<58} {med(xs):7.3f} s   (runs {', '.join(f'{x:.3f}' for x in xs)}){verdict}{extra}"
            )

        print(
            f"\nqueries on {info['total']:,} events, subprocess end to end (median of {args.repeat}; goal <= 0.5 s)"
        )
        row("(0) baseline: `python -c pass` (interpreter start)", bare, cpu="bare")
        b = med(bare)
        row(f"(4) `ftctl status`  ({med(status_) / b:.1f}x baseline)", status_, 0.5, cpu="status")
        row(
            f"(5) `ftctl status --json` (every job)  ({med(status_json) / b:.1f}x baseline)",
            status_json,
            cpu="status --json",
        )
        for s in points:
            row(
                f"(6) `ftctl replay {job_at[s]} --to {s:,} --json`  ({med(travel[s]) / b:.1f}x baseline)",
                travel[s],
                0.5,
                cpu=f"replay {s}",
            )

        print(
            f"\nrecovery of {info['total']:,} events (median of {args.repeat}; goal <= 0.5 s with snapshots)"
        )
        row(
            f"(1) `ftctl recover --json`, subprocess, end to end  ({med(sub) / b:.1f}x baseline)",
            sub,
            0.5,
            cpu="recover",
        )
        row(
            "    of which interpreter + imports (empty workspace)",
            startup,
            cpu="recover (empty workspace)",
        )
        row(
            "(2) in-process: open + load + recover (control.recover)", [r["total"] for r in ip], 0.5
        )
        row("      Journal.open + Ledger (snapshot + tail)", [r["open_load"] for r in ip])
        row("      reconcile.recover (plan, apply, plan again)", [r["recover"] for r in ip])
        row("        of which checkpoint verification", [r["recover_verify"] for r in ip])
        row("      one reconcile.plan alone (= --dry-run's work)", [r["plan"] for r in ip])
        row(
            f"        of which verifying {ip[0]['verified']:,} checkpoints",
            [r["verify"] for r in ip],
        )
        print("snapshots disabled, for comparison")
        row(
            "(3) in-process: open + load(snapshot=False) + recover", [r["total"] for r in ip_nosnap]
        )
        row("      Journal.open + full replay", [r["open_load"] for r in ip_nosnap])
        row("(1') subprocess, journal without snapshots (writes one)", sub_nosnap)
        per = med([r["verify"] for r in ip]) / max(1, ip[0]["verified"])
        print(
            f"\nverification costs {per * 1e3:.2f} ms per checkpoint of {info['ckpt_bytes'] / 1024:.0f} KiB here; "
            f"recovery verified {ip[0]['verified']} of {info['checkpoints']:,} committed "
            "checkpoints: those of unfinished "
            f"jobs and of jobs changed since the last recovery."
        )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
