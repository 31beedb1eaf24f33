"""How close to the hardware: model FLOPs utilisation (MFU) of ftctl and of mlx_lm.lora, same job.

    .venv/bin/python bench/mfu.py [--hidden 256 --layers 4] [--iters 100] [--batch-size 4] [--rounds 2]
                                  [--model DIR]  (an mlx-lm model folder instead of the built demo)

1. The device's matmul peak, measured in this run: a child process with the environment the training
   worker gets (adapters/blas.py: the BLAS preload on Linux; the same MLX device) times square matmuls
   of the model's dtype, several sizes, best of 5 each: peak = max over sizes of 2·n³ / time.
2. The same job run by `ftctl lora` and by `mlx_lm.lora` (the same command line and -c file, whole
   processes, alternating; mlx_lm gets the worker's environment: the same BLAS), each --rounds times.
3. Training tokens/s: each tool's own steady-state figure (the median of its reports after the first,
   which holds the compile): mlx_lm.lora's "Tokens/sec", ftctl's tokens_per_s in the journal.
4. MFU = tokens/s × FLOPs/token ÷ peak, with FLOPs/token = 4·N for LoRA on every layer (forward 2·N; the
   backward pass propagates activation gradients through every adapted layer, 2·N, but computes no
   gradient for the frozen weights), N = the parameters that multiply (every weight matrix, the output
   projection included, the input embedding lookup excluded). Attention's own T·d term and LoRA's
   low-rank matmuls are left out (small beside N at these lengths: stated as a lower bound).

Figures from a shared machine are measured under load: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_CHILD = r"""
import json, sys, time
import mlx.core as mx
dtype = getattr(mx, sys.argv[1])
sizes = [int(x) for x in sys.argv[2].split(",")]
best = {}
for n in sizes:
    a = mx.random.normal((n, n)).astype(dtype); b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b); mx.eval(a @ b)  # warm-up (and the GPU's kernel compile)
    ts = []
    for _ in range(5):
        t = time.perf_counter(); mx.eval(a @ b); ts.append(time.perf_counter() - t)
    best[n] = 2 * n**3 / min(ts) / 1e9
print(json.dumps({"device": str(mx.default_device()), "gflops": best}))
"""


def matmul_peak(env: dict, dtype: str, gpu: bool) -> tuple[float, dict]:
    sizes = "1024,2048,4096,8192" if gpu else "256,512,1024,2048"
    p = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, dtype, sizes],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return max(out["gflops"].values()), out


def matmul_params(model_dir: str) -> tuple[int, str]:
    """N: the parameters of every weight that multiplies (the embedding lookup excluded, unless it is
    tied and so is also the output projection), and the model's dtype."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    model, _ = load(model_dir)
    flat = dict(tree_flatten(model.parameters()))
    total = sum(v.size for v in flat.values())
    emb = [k for k in flat if k.endswith("embed_tokens.weight")]
    tied = not any(k.endswith("lm_head.weight") for k in flat)
    n = total - (0 if tied else sum(flat[k].size for k in emb))
    dtype = next(v.dtype for k, v in flat.items() if k.endswith("weight"))
    return n, str(dtype).split(".")[-1] if dtype != mx.bfloat16 else "bfloat16"


def mlx_lm_tokens_per_s(stdout: str) -> list[float]:
    """mlx_lm.lora's reported tokens/s: 0.32's table rows ('  10    6.094 ▼    1,690    0.9k', colours
    stripped) or the older 'Iter 10: ... Tokens/sec 1690.0' lines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    old = re.findall(r"Tokens/sec ([0-9.]+)", text)
    if old:
        return [float(x) for x in old]
    row = re.compile(
        r"^\s*\d+\s+[0-9.]+(?:\s+[^\s\d.,]+)?\s+([0-9][0-9,]*(?:\.\d+)?)\s+[0-9.]+k?\s*$"
    )
    return [
        float(m.group(1).replace(",", "")) for line in text.splitlines() if (m := row.match(line))
    ]


def ftctl_tokens_per_s(home: Path) -> list[float]:
    from ftctl.events.journal import Journal

    with Journal.open_readonly(home / "journal.db") as j:
        # (id, ts, step, global_step, loss, lr, tokens_per_s, ...)
        return [r[6] for r in j.metric_rows("0001") if r[6] is not None]


def steady(rates: list[float]) -> float | None:
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--model", help="an mlx-lm model folder (default: the demo Llama, built offline)"
    )
    ap.add_argument(
        "--data", help="a folder with train.jsonl and valid.jsonl (default: the demo's)"
    )
    a = ap.parse_args()

    import yaml
    from bytecode import compile_ftctl

    from ftctl.adapters import blas
    from ftctl.adapters.demo import build_demo
    from ftctl.adapters.telemetry import probe_backend

    compile_ftctl()  # whole processes: ftctl byte-compiled, as mlx-lm is (bench/bytecode.py)
    setup = blas.choose("auto")
    backend = probe_backend(setup.env)
    gpu = backend.device is not None and backend.device.backend in ("cuda", "metal")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.model:
            model_dir, data_dir = a.model, a.data
            if not data_dir:
                data_dir = str(build_demo(tmp / "demo").data_dir)
        else:
            demo = build_demo(tmp / "demo", hidden=a.hidden, layers=a.layers, heads=4, vocab=512)
            model_dir, data_dir = str(demo.model_dir), str(demo.data_dir)
        n, dtype = matmul_params(model_dir)
        peak, peak_detail = matmul_peak(setup.env, dtype, gpu)
        conf = tmp / "lora.yaml"
        conf.write_text(
            yaml.safe_dump(
                {
                    "batch_size": a.batch_size,
                    "num_layers": -1,
                    "max_seq_length": 256,
                    "learning_rate": 1e-4,
                    "steps_per_report": 10,
                    "steps_per_eval": a.iters,
                    "val_batches": 5,
                    "save_every": 50,
                    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
                }
            )
        )
        args = ["--model", model_dir, "--train", "--data", data_dir, "--iters", str(a.iters)]
        args += ["-c", str(conf)]
        runs: dict[str, dict[str, list]] = {
            k: {"wall": [], "tps": []} for k in ("ftctl lora", "mlx_lm.lora")
        }
        for r in range(a.rounds):
            order = ("ftctl lora", "mlx_lm.lora") if r % 2 == 0 else ("mlx_lm.lora", "ftctl lora")
            for kind in order:
                cwd = tmp / f"{kind.split()[0]}-{r}"
                cwd.mkdir()
                if kind == "ftctl lora":
                    cmd = [
                        sys.executable,
                        "-m",
                        "ftctl.cli",
                        "lora",
                        *args,
                        "--home",
                        str(cwd / "ws"),
                    ]
                    env = dict(os.environ)
                else:
                    cmd = [sys.executable, "-m", "mlx_lm", "lora", *args]
                    env = {**os.environ, **setup.env}
                t0 = time.perf_counter()
                p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    sys.exit(
                        f"{kind} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
                    )
                rates = (
                    ftctl_tokens_per_s(cwd / "ws")
                    if kind == "ftctl lora"
                    else mlx_lm_tokens_per_s(p.stdout + p.stderr)
                )
                runs[kind]["wall"].append(wall)
                runs[kind]["tps"].append(steady(rates))

    dev = backend.device.label() if backend.device else "?"
    print(f"device: {dev} ({backend.why})")
    print(f"BLAS for both (CPU backend): {setup.describe()} ({setup.threads or '?'} threads)")
    print(
        f"matmul peak, measured now on this device, {dtype}: {peak:.1f} GFLOP/s "
        f"(best of 5 per size: {', '.join(f'{k}: {v:.1f}' for k, v in peak_detail['gflops'].items())})"
    )
    print(
        f"model: {'demo llama ' + str(a.layers) + ' layers, hidden ' + str(a.hidden) if not a.model else a.model}"
        f", N = {n:,} matmul parameters; LoRA rank 8 on every layer; batch {a.batch_size}, "
        f"{a.iters} iterations, {a.rounds} round(s), alternating"
    )
    print(
        "formula: MFU = tokens/s x 4·N / peak  (4·N FLOPs per trained token: forward 2·N + backward "
        "through the frozen weights to the activations 2·N; attention's T·d term and LoRA's matmuls left "
        "out: a lower bound)"
    )
    for kind, r in runs.items():
        tps = [x for x in r["tps"] if x is not None]
        t = statistics.median(tps) if tps else None
        mfu = t * 4 * n / (peak * 1e9) if t else None
        print(
            f"  {kind:<12} wall median {statistics.median(r['wall']):7.2f} s  "
            f"(all: {', '.join(f'{w:.2f}' for w in r['wall'])}); tokens/s "
            + (
                f"{t:,.0f} -> {4 * n * t / 1e9:.2f} GFLOP/s, MFU {100 * mfu:.1f} %"
                if t
                else "not reported"
            )
        )
    fw, mw = (statistics.median(runs[k]["wall"]) for k in ("ftctl lora", "mlx_lm.lora"))
    print(f"ratio ftctl lora / mlx_lm.lora: wall median {fw / mw:.3f}")


if __name__ == "__main__":
    main()
