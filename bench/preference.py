"""DPO (or ORPO): `ftctl lora --train-mode dpo` vs mlx-lm-lora's `mlx_lm_lora.train --train-mode dpo`.

The same model (a demo llama, default 6 layers, hidden 768: 35M parameters, 141 MB in float32, big
enough that a second copy of the weights shows), the same preference pairs (the demo's), iterations,
batch size, LoRA shape, learning rate and evaluation schedule; each tool a whole process from start to
exit, alternating, several rounds, both on the same BLAS (mlx-lm-lora gets the environment ftctl's
worker gets, adapters/blas.py). Printed side by side, per tool, medians over the rounds:
  wall      process start to exit (ftctl: the workspace made, the job submitted, the daemon, its
            worker, committed checkpoints, the journal; mlx-lm-lora: its own run, fuse off)
  peak RSS  the largest resident set of any process of the run (getrusage of the waited-for tree:
            ftctl's training worker, mlx-lm-lora's one process)
  MLX peak  mx.get_peak_memory() as each tool reports it (ftctl: the last report's peak_mem_gb in
            the journal; mlx-lm-lora: the last "peak_mem" it prints)
and the ratios ftctl / mlx-lm-lora (goals: wall <= 1.0; DPO peak memory below mlx-lm-lora's, whose
reference model is a second copy of the weights — ftctl switches the adapter off instead).

mlx-lm-lora is not a dependency of ftctl: install it into a separate venv, only for this bench, and
name its python (same mlx and mlx-lm versions as ftctl's venv, for like with like):

    python3 -m venv /tmp/mlxlora-venv
    /tmp/mlxlora-venv/bin/pip install mlx-lm-lora "mlx[cpu]==0.32.4"   # ftctl's venv's mlx version
    .venv/bin/python bench/preference.py --mlx-lm-lora-python /tmp/mlxlora-venv/bin/python \
        [--mode dpo|orpo] [--iters 20] [--rounds 2] [--hidden 768 --layers 6] [--batch-size 2]

On Linux (MLX's CPU backend) mlx-lm-lora's DPO and ORPO trainers call
mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]), a key only Metal has: it
is run through a two-line launcher that supplies the key (0: no wired limit, which is what the CPU
backend has anyway); nothing else of it is changed.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ftctl.adapters import blas as blas_setup
from ftctl.adapters.demo import build_demo

LAUNCHER = """\
import sys
import mlx.core as mx
_info = mx.device_info
mx.device_info = lambda: {"max_recommended_working_set_size": 0, **_info()}
from mlx_lm_lora.train import main
sys.argv[0] = "mlx_lm_lora.train"
main()
"""
# runs a command, then prints the largest max RSS (KiB on Linux, bytes on macOS) of its waited-for tree
MEASURE = """\
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print("MAXRSS", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""
TOOLS = ("ftctl lora", "mlx-lm-lora")


def measured(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, str, str]:
    """(wall s, peak RSS GB, stdout, stderr) of one whole run."""
    tic = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], cwd=cwd, capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - tic
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} … failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS (\d+)", p.stderr)[-1])
    return wall, rss * (1 if sys.platform == "darwin" else 1024) / 1e9, p.stdout, p.stderr


def ftctl_mlx_peak(home: Path) -> float | None:
    out = subprocess.run(
        [sys.executable, "-m", "ftctl.cli", "metrics", "0001", "--json", "--home", str(home)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    peaks = [p["peak_mem_gb"] for p in json.loads(out)["points"] if p["peak_mem_gb"] is not None]
    return peaks[-1] if peaks else None


def mlx_lm_lora_peak(text: str) -> float | None:
    found = re.findall(r"peak_mem ([0-9.]+)GB", text)
    return float(found[-1]) if found else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mlx-lm-lora-python", required=True, help="the python of mlx-lm-lora's venv")
    ap.add_argument("--mode", choices=["dpo", "orpo"], default="dpo")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftctl-bench-pref-"))
    try:
        run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, tmp: Path) -> None:
    demo = build_demo(tmp / "demo", hidden=a.hidden, layers=a.layers, heads=4, vocab=512)
    pairs = tmp / "pairs"
    pairs.mkdir()
    for name in ("train", "valid"):
        shutil.copy(demo.preference[name], pairs / f"{name}.jsonl")
    shared = {
        "batch_size": a.batch_size,
        "num_layers": -1,
        "max_seq_length": 128,
        "learning_rate": 1e-4,
        "optimizer": "adam",
        "steps_per_report": 5,
        "steps_per_eval": a.iters,
        "val_batches": 5,
        "save_every": a.iters,
        "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0},
        "beta": 0.1,
        "seed": 0,
    }
    (tmp / "ftctl.yaml").write_text(yaml.safe_dump(shared))
    # mlx-lm-lora fuses the model after training by default: off, ftctl does not either
    (tmp / "mlx-lm-lora.yaml").write_text(yaml.safe_dump({**shared, "fuse": False}))
    (tmp / "launcher.py").write_text(LAUNCHER)
    setup = blas_setup.choose("auto")
    base = ["--model", str(demo.model_dir), "--train", "--train-mode", a.mode]
    base += ["--data", str(pairs), "--iters", str(a.iters)]
    got = {t: {"wall": [], "rss": [], "mlx": []} for t in TOOLS}
    for r in range(a.rounds):
        for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
            cwd = tmp / f"{tool.split()[0]}-{r}"
            cwd.mkdir()
            if tool == "ftctl lora":
                cmd = [sys.executable, "-m", "ftctl.cli", "lora", *base]
                cmd += ["-c", str(tmp / "ftctl.yaml"), "--home", str(cwd / "ws"), "--quiet"]
                env = dict(os.environ)
            else:
                cmd = [a.mlx_lm_lora_python, str(tmp / "launcher.py"), *base]
                cmd += ["-c", str(tmp / "mlx-lm-lora.yaml")]
                env = {**os.environ, **setup.env}
            wall, rss, out, err = measured(cmd, cwd, env)
            mlx = (
                ftctl_mlx_peak(cwd / "ws") if tool == "ftctl lora" else mlx_lm_lora_peak(out + err)
            )
            for k, v in (("wall", wall), ("rss", rss), ("mlx", mlx)):
                got[tool][k].append(v)
            shutil.rmtree(cwd)
    params = 10 * a.hidden * a.hidden * a.layers + 2 * 512 * a.hidden
    print(
        f"{a.mode.upper()}, LoRA rank 8 on all layers; model: llama {a.layers} layers, hidden {a.hidden} "
        f"(~{params / 1e6:.0f}M parameters, {params * 4 / 1e6:.0f} MB float32); {a.iters} iterations, batch "
        f"{a.batch_size} pairs; {a.rounds} rounds, alternating, whole processes; BLAS for both: "
        f"{setup.describe()} ({setup.threads or '?'} threads)"
    )
    med = {t: {k: _median(v) for k, v in got[t].items()} for t in TOOLS}
    for t in TOOLS:
        w, rss, mlx = (got[t][k] for k in ("wall", "rss", "mlx"))
        print(
            f"  {t:<12} wall {med[t]['wall']:7.2f} s  peak RSS {med[t]['rss']:6.3f} GB  MLX peak "
            f"{_gb(med[t]['mlx'])}   (walls: {', '.join(f'{x:.2f}' for x in w)}; RSS: "
            f"{', '.join(f'{x:.3f}' for x in rss)}; MLX: {', '.join(_gb(x) for x in mlx)})"
        )
    f, m = med["ftctl lora"], med["mlx-lm-lora"]
    print(
        f"ratio ftctl / mlx-lm-lora: wall {f['wall'] / m['wall']:.3f} (goal <= 1.0), peak RSS "
        f"{f['rss'] / m['rss']:.3f}"
        + (f", MLX peak {f['mlx'] / m['mlx']:.3f}" if f["mlx"] and m["mlx"] else "")
        + " (goal < 1.0)"
    )


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _gb(x) -> str:
    return "-" if x is None else f"{x:.3f} GB"


if __name__ == "__main__":
    main()
