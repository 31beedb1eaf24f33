"""Seeing the training, timed: `ftctl metrics` on 100k points, the status page's first load on a
million-event workspace, and training with the page streaming to 5 clients.

    .venv/bin/python bench/metrics.py [--part metrics,page,train] [--events 1000000] [--iters 150]

(1) metrics: a workspace whose job has 100,000 reports (and a crash + resume, so some are
    superseded); `ftctl metrics 1` (text, --csv, --json) as a user runs it, one process each, against
    `ftctl status 1` in the same run (the baseline: start-up + projection load). Goal < 1 s.
(2) page: a workspace of EVENTS events (bench/replay.py's realistic jobs) plus 3 jobs of 10,000
    reports, its snapshot fresh as a daemon keeps it; a fresh `ftctl serve`; the page's first load =
    every request the dashboard makes (the page, its static files, /api/status, the charts' metrics).
    Also the same load in headless Chromium (--dump-dom), against Chromium loading one static file
    of the same server (the baseline). Goal < 1 s.
(3) train: the demo model trains ITERS iterations twice, alternating (none, page, none, page): with
    no page, and with `ftctl serve` and 5 clients that do what the page does (an SSE stream each; on a
    pulse, the increment of new reports, or the status and full curves when the journal moved).
    Tokens/s = trained tokens / wall time between the first and the last report. Goal: ratio >= 0.98.

The machine's CPU may be shared with other work: figures are wall-clock, so noisy; the ratios are
measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ftctl.adapters.workspace import init_workspace  # noqa: E402
from ftctl.control.ledger import Ledger  # noqa: E402
from ftctl.core import state as S  # noqa: E402
from ftctl.events import types as T  # noqa: E402
from ftctl.events.journal import Journal  # noqa: E402
from ftctl.events.types import ts_epoch  # noqa: E402

FTCTL = [sys.executable, "-m", "ftctl.cli"]


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def add_job(ws, job: str, points: int, crash_every: int = 0, t0: float = 1.8e9) -> None:
    """A job with ``points`` reports (one per step), committed by the journal API; with
    ``crash_every``, a crash every that many steps, resumed from 30 steps back."""
    from replay import CONFIG

    j = ws.open_journal()
    sub = T.JobSubmitted(
        job=job,
        name=f"bench-{job}",
        data_path="/data/x.jsonl",
        data_sha256="a" * 64,
        data_format="chat",
        examples=1000,
        valid_path=None,
        valid_sha256=None,
        config={**CONFIG, "iters": points},
        config_sha256="c" * 64,
    )
    stream = S.job_stream(job)
    insert = "INSERT INTO events (stream, version, ts, type, body) VALUES (?, ?, ?, ?, ?)"
    v, t, attempt = 0, t0, 1
    events: list[tuple] = []
    metrics: list[tuple] = []

    def ev(e):
        nonlocal v
        v += 1
        events.append((stream, v, _ts(t), e.__struct_config__.tag, T.encode(e).decode()))

    ev(sub)
    ev(
        T.TrainingStarted(
            job=job, attempt=1, worker_pid=1, worker_started_at=t0, base_model=CONFIG["model"]
        )
    )
    step = 0
    last_ckpt = 0
    crashed: set[int] = set()
    while step < points:
        step += 1
        t += 0.01
        metrics.append(
            (job, _ts(t), step, step, 2.0 / (1 + step / 1000), 1e-5, 1500.0, 1.2, step * 400)
        )
        if step % 100 == 0:
            path = f"checkpoints/{job}/{step}"
            ev(T.CheckpointStarted(job=job, step=step, global_step=step))
            ev(
                T.CheckpointCommitted(
                    job=job,
                    checkpoint=T.CheckpointRecord(
                        step=step, global_step=step, path=path, manifest_sha256="d" * 64, bytes=1000
                    ),
                )
            )
            last_ckpt = step
        if crash_every and step % crash_every == crash_every - 30 and step not in crashed:
            crashed.add(step)
            ev(
                T.Crashed(
                    job=job,
                    category="oom",
                    step=step,
                    signal=9,
                    evidence="Killed",
                    suggestion="lower batch_size",
                )
            )
            ev(T.Requeued(job=job, reason="crash", not_before=0.0))
            attempt += 1
            t += 0.01
            ev(
                T.TrainingStarted(
                    job=job,
                    attempt=attempt,
                    worker_pid=1,
                    worker_started_at=t,
                    resume_step=last_ckpt,
                    resume_checkpoint=f"checkpoints/{job}/{last_ckpt}",
                    base_model=CONFIG["model"],
                )
            )
            step = last_ckpt
    ev(
        T.Completed(
            job=job,
            step=points,
            global_step=points,
            adapter_path="a",
            adapter_sha256="e" * 64,
            checkpoint="c",
        )
    )
    j.conn.execute("BEGIN IMMEDIATE")
    j.conn.executemany(insert, events)
    j.conn.executemany(
        "INSERT INTO metrics (job, ts, step, global_step, loss, lr, tokens_per_s, peak_mem_gb, "
        "trained_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        metrics,
    )
    j.conn.execute("COMMIT")
    j.close()


def timed_cmd(args: list[str], reps: int = 3) -> tuple[float, list[float], float]:
    """Best wall time, every wall time, best CPU time (user + system of the child)."""
    import resource

    walls, cpus = [], []
    for _ in range(reps):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        assert p.returncode == 0, p.stderr
    return min(walls), walls, min(cpus)


def part_metrics(base: Path) -> None:
    ws = init_workspace(base / "m", "models/none")
    t = time.perf_counter()
    add_job(ws, "0001", 100_000, crash_every=20_000)
    out = subprocess.run(
        [*FTCTL, "metrics", "1", "--all", "--json", "--home", str(ws.home)],
        capture_output=True,
        text=True,
    )
    counts = json.loads(out.stdout)["jobs"][0]["counts"]
    print(
        f"(1) built a job of {counts['points']:,} reports ({counts['superseded']} of them superseded by resumes) "
        f"in {time.perf_counter() - t:.1f} s"
    )
    Ledger(ws.open_journal()).close()  # its snapshot, as the daemon keeps one
    home = ["--home", str(ws.home)]
    base_wall, base_runs, base_cpu = timed_cmd([*FTCTL, "status", "1", *home])
    print(
        f"    baseline `ftctl status 1`: {base_wall:.2f} s wall (runs {', '.join(f'{x:.2f}' for x in base_runs)}), "
        f"{base_cpu:.2f} s CPU"
    )
    for extra in ([], ["--csv"], ["--json"], ["--all"]):
        wall, runs, cpu = timed_cmd([*FTCTL, "metrics", "1", *extra, *home])
        print(
            f"    `ftctl metrics 1{' ' + ' '.join(extra) if extra else ''}`: {wall:.2f} s wall (runs "
            f"{', '.join(f'{x:.2f}' for x in runs)}), {cpu:.2f} s CPU = {wall / base_wall:.2f}x the baseline's wall  "
            f"goal < 1 s: {'PASS' if wall < 1 else 'MISS'}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    t = time.perf_counter()
    proc = subprocess.Popen(
        [*FTCTL, "serve", "--port", str(port), "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, time.perf_counter() - t
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()) from None
            time.sleep(0.02)


def get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> bytes:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    assert r.status == 200, (path, r.status, body[:200])
    if conn is None:
        c.close()
    return body


def first_load(port: int) -> tuple[float, int, int]:
    """The dashboard's requests, in its order, one after the other (a browser would run some of them
    in parallel). A connection each: http.client's keep-alive requests wait out TCP's delayed ACK
    (~40 ms each), which a browser's do not."""
    t = time.perf_counter()
    c = None
    n = 0
    for path in (
        "/",
        "/static/vendor/uPlot.min.css",
        "/static/style.css",
        "/static/vendor/uPlot.iife.min.js",
        "/static/common.js",
        "/static/dashboard.js",
    ):
        n += len(get(port, path, c))
    st = json.loads(get(port, "/api/status", c))
    n += len(json.dumps(st))
    points = 0
    for j in st["jobs"]:
        if j["state"] not in ("rejected", "queued"):
            s = json.loads(get(port, f"/api/jobs/{j['job']}/metrics", c))
            points += len(s["columns"]["global_step"])
    return time.perf_counter() - t, n, points


def part_page(base: Path, events: int) -> None:
    import replay as R

    ws = init_workspace(base / "p", "models/none")
    t = time.perf_counter()
    j = ws.open_journal()
    R.fill(j, events, 0, random.Random(0))
    j.close()
    for k in range(3):
        add_job(
            ws, f"{9_000_000 + k}", 10_000, crash_every=5_000 if k == 1 else 0, t0=1.9e9 + k * 1000
        )
    Ledger(ws.open_journal()).close()  # snapshots, as the daemon keeps them
    j = ws.open_journal()
    total = j.last_seq()
    j.close()
    print(
        f"(2) built a workspace of {total:,} events in {time.perf_counter() - t:.0f} s "
        f"({ws.journal_path.stat().st_size / 1e6:.0f} MB)"
    )
    proc, port, started = start_server(ws.home)
    try:
        print(
            f"    `ftctl serve` listening after {started:.2f} s (projection loaded from its snapshot)"
        )
        walls = []
        for _ in range(3):
            wall, n, points = first_load(port)
            walls.append(wall)
        print(
            f"    first load, every request of the dashboard: {min(walls):.3f} s (runs "
            f"{', '.join(f'{x:.3f}' for x in walls)}; {n / 1e3:.0f} kB, {points:,} chart points)  "
            f"goal < 1 s: {'PASS' if min(walls) < 1 else 'MISS'}"
        )
        chromium = shutil.which("chromium")
        if chromium:

            def browse(path: str) -> float:
                t = time.perf_counter()
                p = subprocess.run(
                    [
                        chromium,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--virtual-time-budget=900",
                        "--dump-dom",
                        f"http://127.0.0.1:{port}{path}",
                    ],
                    capture_output=True,
                    text=True,
                )
                assert p.returncode == 0 and ("data-ready" in p.stdout or path != "/"), p.stderr[
                    -500:
                ]
                return time.perf_counter() - t

            bases = [browse("/static/style.css") for _ in range(3)]
            pages = [browse("/") for _ in range(3)]
            print(
                f"    headless Chromium, whole page drawn: {min(pages):.2f} s vs {min(bases):.2f} s for one static "
                f"file (browser start-up): the page itself {min(pages) - min(bases):.2f} s"
            )
        else:
            print("    (no chromium: the browser timing is skipped)")
    finally:
        proc.terminate()
        proc.wait()


class PageClient(threading.Thread):
    """What one open dashboard does: an SSE stream; on each pulse the increment or the full reload."""

    def __init__(self, port: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.stop, self.requests, self.pulses = port, stop, 0, 0

    def run(self) -> None:
        try:
            self.follow()
        except (OSError, http.client.HTTPException):
            # the server going away at the end is expected, anything else not
            if not self.stop.is_set():
                raise

    def follow(self) -> None:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        api = None  # a connection per request: the server closes idle keep-alive ones after 5 s
        c.request("GET", "/api/events")
        r = c.getresponse()
        last, last_ids = None, {}
        while not self.stop.is_set():
            line = r.fp.readline()
            if not line:
                return
            if not line.startswith(b"data: "):
                continue
            p = json.loads(line[6:])
            self.pulses += 1
            if last is None or p["seq"] != last["seq"] or p["alive"] != last["alive"]:
                st = json.loads(get(self.port, "/api/status", api))
                self.requests += 1
                for j in st["jobs"]:
                    s = json.loads(get(self.port, f"/api/jobs/{j['job']}/metrics", api))
                    last_ids[j["job"]] = s["last_id"]
                    self.requests += 1
            else:
                for job, after in list(last_ids.items()):
                    s = json.loads(get(self.port, f"/api/jobs/{job}/metrics?after_id={after}", api))
                    last_ids[job] = s["last_id"]
                    self.requests += 1
            last = p


def train_once(
    base: Path, name: str, model: Path, train: Path, valid: Path, iters: int, page: bool
) -> tuple[float, int, int]:
    ws = init_workspace(
        base / name,
        str(model),
        {
            "iters": iters,
            "steps_per_report": 5,
            "steps_per_eval": 50,
            "save_every": 50,
            "batch_size": 2,
            "max_seq_length": 96,
            "num_layers": -1,
            "standby": False,
            "min_free_disk_gb": 0.01,
        },
    )
    subprocess.run(
        [*FTCTL, "submit", str(train), "--valid", str(valid), "--home", str(ws.home)],
        check=True,
        capture_output=True,
    )
    stop, clients, proc = threading.Event(), [], None
    if page:
        proc, port, _ = start_server(ws.home)
        clients = [PageClient(port, stop) for _ in range(5)]
        for c in clients:
            c.start()
    try:
        p = subprocess.run(
            [*FTCTL, "start", "--until-idle", "--quiet", "--home", str(ws.home)],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            raise RuntimeError(f"ftctl start exited {p.returncode}: {p.stderr[-2000:]}")
    finally:
        stop.set()
        if proc:
            proc.terminate()
            proc.wait()
    j = Journal.open(ws.journal_path)
    rows = j.metric_rows("0001")
    j.close()
    # (id, ts, step, global_step, loss, lr, tokens_per_s, peak, trained_tokens), from a fifth of the way in:
    # the first steps include compilation and warm-up
    first, last = rows[len(rows) // 5], rows[-1]
    tps = (last[8] - first[8]) / (ts_epoch(last[1]) - ts_epoch(first[1]))
    return tps, sum(c.requests for c in clients), sum(c.pulses for c in clients)


def part_train(base: Path, iters: int) -> None:
    from ftctl.adapters.demo import build_demo

    demo = build_demo(base / "demo")
    runs: dict[bool, list[float]] = {False: [], True: []}
    for k, page in enumerate((False, True, False, True)):
        tps, requests, pulses = train_once(
            base, f"t{k}", demo.model_dir, demo.train, demo.valid, iters, page
        )
        runs[page].append(tps)
        print(
            f"(3) run {k + 1}: {'5 page clients' if page else 'no page     '}  {tps:,.0f} tokens/s"
            + (f"  ({pulses} pulses, {requests} API requests served)" if page else "")
        )
    a, b = statistics.median(runs[False]), statistics.median(runs[True])
    print(
        f"    tokens/s with the page streaming to 5 clients / without: {b / a:.3f} (medians {b:,.0f} / {a:,.0f})  "
        f"goal >= 0.98: {'PASS' if b / a >= 0.98 else 'MISS'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="metrics,page,train")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=150)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ftctl-bench-metrics-"))
    try:
        parts = a.part.split(",")
        if "metrics" in parts:
            part_metrics(base)
        if "page" in parts:
            part_page(base, a.events)
        if "train" in parts:
            part_train(base, a.iters)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
