"""Data-parallel jobs on this machine: scaling, and what ftctl's supervision costs.

1. Scaling: the same ftctl job (same global batch) on 1 rank and on --ranks ranks (ring backend,
   loopback), for the demo model (hidden 64) and a hidden-512 model. Tokens/s = the median of the
   job's reported tokens/s (trained tokens over training time, all ranks together), the first report
   (compilation) left out. Efficiency = tokens/s(N) / (N x tokens/s(1)).
2. Overhead: the same N-rank job, end to end, as `ftctl start --until-idle` (daemon, recovery,
   mlx.launch, ranks connected to the daemon, atomic hashed checkpoints, journal) vs a bare
   `mlx.launch -n N --backend ring -- python -m mlx_lm lora -c cfg.yaml` (same model, data, iters,
   batch, LoRA, save and eval cadence, same BLAS and threads). Alternating, --rounds rounds; the ratio of
   the median wall times is printed (goal <= 1.03).

    .venv/bin/python bench/distributed.py [--iters 100] [--ranks 2] [--hidden 64,512] [--rounds 2]
        [--skip-scaling] [--skip-overhead]

On a machine with few cores the ranks share them: N ranks cannot be N times faster than one process
that already uses every core (each rank gets cores / N BLAS threads); what it shows then is the cost
of the all-reduce and of the sharding, not a speed-up. Timings vary with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ftctl.adapters import blas
from ftctl.adapters.demo import build_demo
from ftctl.adapters.group import Layout, blas_threads, launcher
from ftctl.adapters.workspace import Workspace, init_workspace

LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def job_config(a, iters: int) -> dict:
    return {
        "iters": iters,
        "batch_size": a.batch_size,
        "learning_rate": 1e-4,
        "steps_per_report": 10,
        "steps_per_eval": iters,
        "val_batches": 2,
        "save_every": max(1, iters // 2),
        "max_seq_length": 256,
        "num_layers": -1,
        "seed": 0,
        "optimizer": "adam",
        "lora_parameters": {**LORA, "keys": None},
        "standby": False,
        "min_free_disk_gb": 0.01,
    }


def ftctl_run(
    demo, home: Path, cfg: dict, ranks: int, env: dict | None = None
) -> tuple[float, list[float]]:
    """Wall time of `ftctl start --until-idle` for one job, and its reported tokens/s."""
    if ranks > 1:
        cfg = {
            **cfg,
            "distributed": {"backend": "ring", "hosts": ["127.0.0.1"], "processes_per_host": ranks},
        }
    init_workspace(home, str(demo.model_dir), cfg)
    cli = [sys.executable, "-m", "ftctl.cli"]
    subprocess.run(
        [*cli, "submit", str(demo.train), "--valid", str(demo.valid), "--home", str(home)],
        check=True,
        capture_output=True,
    )
    t0 = time.perf_counter()
    subprocess.run(
        [*cli, "start", "--until-idle", "--quiet", "--home", str(home)],
        check=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - t0
    with Workspace(home).open_journal() as j:
        rates = [
            m["tokens_per_s"] for m in j.recent_metrics("0001", limit=10000) if m["tokens_per_s"]
        ]
    return wall, rates


def bare_run(demo, out: Path, cfg: dict, ranks: int, env: dict) -> float:
    """Wall time of `mlx.launch -n N --backend ring -- python -m mlx_lm lora -c cfg.yaml`."""
    out.mkdir(parents=True)
    c = {
        "model": str(demo.model_dir),
        "train": True,
        "data": str(demo.train.parent),
        "iters": cfg["iters"],
        "batch_size": cfg["batch_size"],
        "num_layers": -1,
        "learning_rate": cfg["learning_rate"],
        "steps_per_report": cfg["steps_per_report"],
        "steps_per_eval": cfg["steps_per_eval"],
        "val_batches": cfg["val_batches"],
        "save_every": cfg["save_every"],
        "max_seq_length": cfg["max_seq_length"],
        "seed": 0,
        "optimizer": "adam",
        "fine_tune_type": "lora",
        "lora_parameters": LORA,
        "adapter_path": str(out / "adapters"),
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(c))
    cmd = [
        *launcher(),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        str(ranks),
        "--",
        sys.executable,
        "-m",
        "mlx_lm",
        "lora",
        "-c",
        str(out / "cfg.yaml"),
    ]
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, stdin=subprocess.PIPE, capture_output=True, text=True, env={**os.environ, **env}
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not (out / "adapters" / "adapters.safetensors").exists():
        raise SystemExit(
            f"bare mlx_lm run failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        )
    return wall


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--hidden", default="64,512", help="hidden sizes of the models scaled (comma-separated)"
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="overhead: alternating rounds of each side"
    )
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    a = ap.parse_args()
    if a.batch_size % a.ranks:
        raise SystemExit(f"--batch-size {a.batch_size} must be a multiple of --ranks {a.ranks}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start; {a.iters} iterations, global batch "
        f"{a.batch_size}, ranks 1 vs {a.ranks} (ring, loopback)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not a.skip_scaling:
            for h in [int(x) for x in a.hidden.split(",")]:
                demo = build_demo(tmp / f"demo{h}", hidden=h)
                cfg = job_config(a, a.iters)
                w1, r1 = ftctl_run(demo, tmp / f"s{h}-1", cfg, 1)
                # one process with the BLAS threads one rank gets
                share = str(max(1, cores // a.ranks))
                ws, rs = ftctl_run(
                    demo,
                    tmp / f"s{h}-1t",
                    cfg,
                    1,
                    {"OPENBLAS_NUM_THREADS": share, "OMP_NUM_THREADS": share},
                )
                wn, rn = ftctl_run(demo, tmp / f"s{h}-{a.ranks}", cfg, a.ranks)
                t1, ts, tn = steady(r1), steady(rs), steady(rn)
                print(
                    f"hidden {h}: 1 rank {t1:.0f} tok/s (run {w1:.1f} s; with {share} BLAS thread(s) as one rank "
                    f"gets: {ts:.0f} tok/s, run {ws:.1f} s), {a.ranks} ranks {tn:.0f} tok/s (run {wn:.1f} s): "
                    f"speed-up {tn / t1:.2f}x, scaling efficiency {tn / (a.ranks * t1):.2f} "
                    f"(vs the same threads per rank: {tn / (a.ranks * ts):.2f})"
                )
        if not a.skip_overhead:
            demo = build_demo(tmp / "demo-ovh")
            cfg = job_config(a, a.iters)
            lib = blas.choose("auto")
            env = dict(lib.env)
            threads = blas_threads(
                Layout(hosts=["127.0.0.1"] * a.ranks, world_size=a.ranks, local=True), env
            )
            if threads:
                env.update({"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads})
            ours, bare = [], []
            for i in range(a.rounds):
                bare.append(bare_run(demo, tmp / f"bare{i}", cfg, a.ranks, env))
                ours.append(ftctl_run(demo, tmp / f"ours{i}", cfg, a.ranks)[0])
                print(
                    f"round {i + 1}: bare mlx.launch + mlx_lm lora {bare[-1]:.2f} s, ftctl {ours[-1]:.2f} s"
                )
            ratio = statistics.median(ours) / statistics.median(bare)
            print(
                f"overhead ({a.ranks} ranks, {a.iters} iterations, end to end): ftctl / bare = {ratio:.3f} "
                f"(goal <= 1.03); load average {os.getloadavg()[0]:.1f} at the end"
            )


if __name__ == "__main__":
    main()
