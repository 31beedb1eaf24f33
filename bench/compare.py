"""Comparing runs, timed: `ftctl compare` and the compare view on 200 jobs in a million-event journal.

    .venv/bin/python bench/compare.py [--events 1000000] [--jobs 200] [--points 2500] [--keep DIR]

Builds a workspace of EVENTS journal events: bench/replay.py's realistic jobs (about 150 events
each) plus JOBS jobs of a sweep (lineage "sweep": learning rate x LoRA rank), each with POINTS
training reports (the metrics table: JOBS x POINTS rows), an evaluation every 100 steps, a
checkpoint every 100 and a crash and resume in one of 10; its snapshot fresh, as a daemon keeps it.
Then, against `ftctl status JOB --json` (a sweep job) in the same run (the baseline: start-up + projection load):
  (1) `ftctl compare --lineage sweep` as a user runs it (table, --json, --csv, --sort), one process each;
  (2) a fresh `ftctl serve`: /api/compare?lineage=sweep (the runs table of the view), and the view's
      whole load (its page, static files, /api/compare, /api/status, the curves of 3 selected runs);
  (3) headless Chromium drawing /compare?lineage=sweep&jobs=3 runs, against one static file of the
      same server (browser start-up).
Goal: (1) and (2) answer in < 1 s. Wall-clock figures on a shared machine: the baseline is measured
in the same run.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from metrics import FTCTL, add_job, get, start_server, timed_cmd  # noqa: E402

from ftctl.adapters.workspace import init_workspace  # noqa: E402
from ftctl.control.ledger import Ledger  # noqa: E402

RATES = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4]
RANKS = [4, 8, 16, 32]


def build(base: Path, events: int, jobs: int, points: int):
    import replay as R

    ws = init_workspace(base / "ws", "models/none")
    t = time.perf_counter()
    per_job = points // 100 * 3 + 8  # checkpoint pairs, evaluations, submit/start/complete, a crash
    j = ws.open_journal()
    R.fill(j, max(0, events - jobs * per_job), 0, random.Random(0))
    j.close()
    ids = []
    for k in range(jobs):
        job = f"{9_000_000 + k}"
        cfg = {
            "learning_rate": RATES[k % 5],
            "lora_parameters": {**R.CONFIG["lora_parameters"], "rank": RANKS[k // 5 % 4]},
        }
        add_job(
            ws,
            job,
            points,
            crash_every=points // 2 if k % 10 == 0 else 0,
            t0=1.9e9 + k * 100,
            config=cfg,
            eval_every=100,
            lineage="sweep",
        )
        ids.append(job)
    Ledger(ws.open_journal()).close()  # snapshots, as the daemon keeps them
    j = ws.open_journal()
    total, reports = j.last_seq(), j.last_metric_id()
    j.close()
    print(
        f"built a workspace of {total:,} events and {reports:,} training reports ({jobs} sweep jobs) in "
        f"{time.perf_counter() - t:.0f} s ({ws.journal_path.stat().st_size / 1e6:.0f} MB)"
    )
    return ws, ids


def verdict(x: float) -> str:
    return f"goal < 1 s: {'PASS' if x < 1 else 'MISS'}"


def part_cli(home: Path, job: str) -> None:
    base, _, base_cpu = timed_cmd([*FTCTL, "status", job, "--json", "--home", str(home)])
    print(f"(1) baseline `ftctl status {job} --json`: {base:.3f} s (cpu {base_cpu:.3f} s)")
    for extra in (
        [],
        ["--json"],
        ["--csv"],
        ["--sort", "best_val_loss", "--reverse", "--json"],
        ["--all", "--json"],
    ):
        args = [*FTCTL, "compare", "--lineage", "sweep", *extra, "--home", str(home)]
        wall, walls, cpu = timed_cmd(args)
        print(
            f"    `ftctl compare --lineage sweep {' '.join(extra)}`: {wall:.3f} s (runs "
            f"{', '.join(f'{x:.3f}' for x in walls)}; cpu {cpu:.3f} s; {wall - base:+.3f} s over the "
            f"baseline)  {verdict(wall)}"
        )


def part_page(home: Path, ids: list[str]) -> None:
    proc, port, started = start_server(home)
    try:
        print(f"(2) `ftctl serve` listening after {started:.2f} s")
        walls = []
        for _ in range(3):
            t = time.perf_counter()
            body = get(port, "/api/compare?lineage=sweep")
            walls.append(time.perf_counter() - t)
        print(
            f"    /api/compare?lineage=sweep ({len(ids)} rows, {len(body) / 1e3:.0f} kB): {min(walls):.3f} s "
            f"(runs {', '.join(f'{x:.3f}' for x in walls)})  {verdict(min(walls))}"
        )
        sel = ids[:3]
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            n = 0
            for path in (
                "/compare",
                "/static/compare.js",
                "/static/common.js",
                "/static/style.css",
                "/static/vendor/uPlot.iife.min.js",
                "/api/compare?lineage=sweep",
                "/api/status",
                *[f"/api/jobs/{j}/metrics" for j in sel],
            ):
                n += len(get(port, path))
            loads.append(time.perf_counter() - t)
        print(
            f"    the view's whole load (page, static files, /api/compare, /api/status, 3 runs' curves; "
            f"{n / 1e3:.0f} kB): {min(loads):.3f} s (runs {', '.join(f'{x:.3f}' for x in loads)})  "
            f"{verdict(min(loads))}"
        )
        chromium = shutil.which("chromium")
        if not chromium:
            print("(3) no chromium: the browser timing is skipped")
            return

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
            assert p.returncode == 0 and ('data-ready="1"' in p.stdout or "static" in path), (
                p.stderr[-500:]
            )
            if "static" not in path:
                assert f'data-runs="{len(sel)}"' in p.stdout, (
                    "the overlay did not draw the selected runs"
                )
            return time.perf_counter() - t

        bases = [browse("/static/style.css") for _ in range(3)]
        pages = [browse(f"/compare?lineage=sweep&jobs={','.join(sel)}") for _ in range(3)]
        print(
            f"(3) headless Chromium, the compare view drawn ({len(ids)} rows, 3 runs overlaid): {min(pages):.2f} s "
            f"vs {min(bases):.2f} s for one static file (browser start-up): the view itself "
            f"{min(pages) - min(bases):.2f} s"
        )
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--events", type=int, default=1_000_000)
    a.add_argument("--jobs", type=int, default=200)
    a.add_argument("--points", type=int, default=2500)
    a.add_argument("--keep", type=Path)
    args = a.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="ftctl-compare-"))
    try:
        if args.keep and (base / "ws" / "journal.db").exists():
            from ftctl.adapters.workspace import Workspace

            ws = Workspace(base / "ws")
            j = ws.open_journal()
            ids = [x for x in j.job_ids() if x.startswith("9")][-args.jobs :]
            j.close()
            print(f"reusing {base / 'ws'}")
        else:
            ws, ids = build(base, args.events, args.jobs, args.points)
        part_cli(ws.home, ids[0])
        part_page(ws.home, ids)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
