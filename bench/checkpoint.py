"""What does an atomic, hashed, fsynced checkpoint cost over mlx-lm's plain save?

Same arrays (LoRA weights + Adam moments + step) written three ways:
  plain        mx.save_safetensors of the adapters and of the optimizer state (what
               mlx-lm does for adapters: no fsync, no hash, written in place)
  plain+fsync  the same, then fsync of both files (the least a durable save needs)
  ftctl        save_checkpoint: sha256 every file (on 2 threads, while writing), write
               each under a temp dir with fsync, manifest last, fsync dir, rename, fsync
               parent
  ftctl-nosync the same with os.fsync stubbed out: a diagnostic that separates the cost
               of the protocol and hashing from the cost of durability
  async        what the training loop does since checkpoints are written in the background:
               stall   the loop's own time per checkpoint: tree_flatten + checkpoint_files
                       (evaluate and hold the arrays) and CheckpointWriter.submit (a queue put);
                       the safetensors headers and buffer views, the write, the hashing and the
                       finiteness check of the adapter weights (numpy bit tests of the same
                       buffers) run on the writer thread and the I/O threads
               durable stall + the writer thread's time to a durable, renamed checkpoint (the
                       write runs alone here: no training competes for the cores)
Ratios, each against baselines measured in the same run, same arrays:
  async stall / plain            goal <= 0.10
  async durable / plain+fsync    goal <= 1.1 (the durability floor)
  ftctl (sync) / plain           the old, synchronous cost, for comparison

    .venv/bin/python bench/checkpoint.py [--repeats 7]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ftctl.adapters.checkpoint import (
    ADAPTERS,
    Checkpoint,
    CheckpointWriter,
    Cursor,
    TrainState,
    checkpoint_files,
    nonfinite_tensors,
    save_checkpoint,
)

# (label, hidden, intermediate, layers trained, rank)
SIZES = [
    ("bench model: 4 layers, hidden 256, rank 8", 256, 512, 4, 8),
    ("1B-like: 16 layers, hidden 2048, rank 8", 2048, 8192, 16, 8),
    ("7B-like: 16 layers, hidden 4096, rank 16", 4096, 11008, 16, 16),
]


def lora_arrays(hidden, inter, layers, rank):
    """Adapter weights and Adam state of LoRA on every linear layer of a llama block."""
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    adapters = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"model.layers.{layer}.{name}"
            adapters[f"{key}.lora_a"] = mx.random.normal((fan_in, rank))
            adapters[f"{key}.lora_b"] = mx.random.normal((rank, fan_out))
    optimizer = {"step": mx.array(100, mx.uint64), "learning_rate": mx.array(1e-4)}
    for k, v in adapters.items():
        optimizer[f"{k}.m"] = v * 0.1
        optimizer[f"{k}.v"] = v * v
    mx.eval(adapters, optimizer)
    return adapters, optimizer


def plain(out: Path, adapters, optimizer, sync: bool):
    files = [str(out / "adapters.safetensors"), str(out / "optimizer.safetensors")]
    mx.save_safetensors(files[0], adapters)
    mx.save_safetensors(files[1], optimizer)
    if sync:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def ours(out: Path, adapters, optimizer, sync: bool = True):
    state = TrainState(job_step=100, global_step=100, cursor=Cursor(epoch=0, position=100), seed=0)
    config = {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 8}}
    ckpt = Checkpoint(adapters, config, optimizer, state)
    if sync:
        save_checkpoint(out, ckpt)
        return
    real, os.fsync = os.fsync, lambda fd: None  # diagnostic only: what fsync costs
    try:
        save_checkpoint(out, ckpt)
    finally:
        os.fsync = real


WRITER = {}


def async_save(out: Path, adapters, optimizer, parts: dict):
    """One checkpoint the way the training loop takes it now; records the stall and the durable
    time in `parts`."""
    t0 = time.perf_counter()
    state = TrainState(job_step=100, global_step=100, cursor=Cursor(epoch=0, position=100), seed=0)
    config = {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 8}}
    tree = {"model": {"layers": adapters}}  # the loop flattens the module tree
    files = checkpoint_files(
        Checkpoint(dict(tree_flatten(tree)), config, dict(tree_flatten(optimizer)), state)
    )
    # one per run, as in the loop
    w = WRITER.setdefault("w", CheckpointWriter(out, None, lambda record: None))
    w.job_dir = out

    def finite(buffers):  # as the trainer does: beside the write, on an I/O thread
        t = time.perf_counter()
        assert not nonfinite_tensors(buffers[ADAPTERS])
        parts.setdefault("finite", []).append(time.perf_counter() - t)

    w.submit(files, state, check=finite)
    t1 = time.perf_counter()
    w.wait()
    t2 = time.perf_counter()
    parts.setdefault("stall", []).append(t1 - t0)
    parts.setdefault("durable", []).append(t2 - t0)


def hash_only(adapters, optimizer) -> float:
    """A profile of the durable cost: sha256 of the same bytes on the same 2 threads, nothing written."""
    from concurrent.futures import ThreadPoolExecutor

    from ftctl.adapters.checkpoint import _digest, safetensors_chunks

    chunks = [safetensors_chunks(adapters), safetensors_chunks(optimizer)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_digest, chunks))
    return time.perf_counter() - t0


def once(fn, out: Path) -> float:
    """Time one save into the empty directory `out`, then remove it (both untimed).
    A job's checkpoints/ folder exists after its first save, so it exists here too."""
    (out / "checkpoints").mkdir(parents=True)
    t0 = time.perf_counter()
    fn(out)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out)
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        print(f"writing under {root}; median of {a.repeats} saves each, methods interleaved")
        for label, hidden, inter, layers, rank in SIZES:
            adapters, optimizer = lora_arrays(hidden, inter, layers, rank)
            mb = sum(v.nbytes for v in (*adapters.values(), *optimizer.values())) / 1e6
            parts = {}
            fns = {
                "async": lambda o: async_save(o, adapters, optimizer, parts),
                "plain": lambda o: plain(o, adapters, optimizer, sync=False),
                "plain+fsync": lambda o: plain(o, adapters, optimizer, sync=True),
                "ftctl": lambda o: ours(o, adapters, optimizer),
                "ftctl-nosync": lambda o: ours(o, adapters, optimizer, sync=False),
            }
            times = {name: [] for name in fns}
            for i in range(a.repeats + 1):  # round 0 warms up
                for name, fn in fns.items():
                    t = once(fn, root / f"{name}-{i}")
                    if i:
                        times[name].append(t)
            m = {name: statistics.median(v) for name, v in times.items()}
            # [0]: the warm-up round
            p = {name: statistics.median(v[1:]) for name, v in parts.items()}
            print(f"{label}: {mb:.1f} MB")
            for name in fns:
                if name == "async":
                    print(f"  {'async stall':<12} {p['stall'] * 1000:9.2f} ms")
                    print(
                        f"  {'async durable':<12} {p['durable'] * 1000:9.2f} ms  (the finiteness check beside the "
                        f"write took {p['finite'] * 1000:.2f} ms)"
                    )
                    continue
                print(f"  {name:<12} {m[name] * 1000:9.2f} ms")
            h = statistics.median(hash_only(adapters, optimizer) for _ in range(3))
            print(
                f"  {'sha256 only':<12} {h * 1000:9.2f} ms  (profile: the 2 hashing threads alone, nothing written)"
            )
            print(
                f"  ratio async stall / plain: {p['stall'] / m['plain']:.3f}  (goal <= 0.10); "
                f"async durable / plain+fsync: {p['durable'] / m['plain+fsync']:.2f}  (goal <= 1.1)"
            )
            print(
                f"  ratio ftctl (synchronous) / plain: {m['ftctl'] / m['plain']:.2f}; "
                f"ftctl / plain+fsync: {m['ftctl'] / m['plain+fsync']:.2f}; "
                f"without fsyncs on either side: {m['ftctl-nosync'] / m['plain']:.2f}"
            )


if __name__ == "__main__":
    main()
