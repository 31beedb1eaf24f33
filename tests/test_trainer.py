"""Real MLX training on the tiny demo model: determinism across stops and resumes,
warm starts, corruption, divergence, and mlx-lm compatibility of the result."""

import json
import math
import os
import shutil
import threading
import time

import mlx.core as mx
import mlx_lm
import msgspec
import numpy as np
import pytest
from mlx_lm.tuner.trainer import iterate_batches

from ftctl.adapters import protocol as P
from ftctl.adapters import trainer as trainer_mod
from ftctl.adapters.batches import TrainBatches, make_batch, validation_batches
from ftctl.adapters.checkpoint import (
    ADAPTERS,
    OPTIMIZER,
    CheckpointCorrupt,
    adapter_sha256,
    checkpoint_step,
    list_checkpoint_dirs,
    load_checkpoint,
    temp_dirs,
    verify_checkpoint,
)
from ftctl.adapters.demo import build_demo
from ftctl.adapters.protocol import TrainPlan
from ftctl.adapters.trainer import TrainingDiverged, run, step_seed
from ftctl.core.config import decode_config

ITERS = 40
# the bit-exactness tests run for every fine-tune type; tests about other things for LoRA only
LORA_ONLY = pytest.mark.parametrize("ftt", ["lora"], indirect=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module", params=["lora", "full"])
def ftt(request) -> str:
    """The fine-tune type the reference run (and the test) trains."""
    return request.param


def config(demo, fine_tune_type="lora", **over):
    base = {
        "model": str(demo.model_dir),
        "iters": ITERS,
        "batch_size": 4,
        "save_every": 5,
        "steps_per_report": 10,
        "steps_per_eval": 10,
        "val_batches": 2,
        "max_seq_length": 64,
        "num_layers": -1,
        "optimizer": "adamw",
        "lr_schedule": {"name": "cosine_decay", "warmup": 4, "arguments": [2e-3, ITERS, 1e-4]},
        "lora_parameters": {"rank": 4, "dropout": 0.1},
        "seed": 7,
        "fine_tune_type": fine_tune_type,
    }
    base.update(over)
    cfg, _ = decode_config(base)
    return cfg


def plan(demo, job_dir, cfg, **kw):
    return TrainPlan(
        job_id=os.path.basename(job_dir),
        job_dir=str(job_dir),
        config=cfg,
        train_path=str(demo.train),
        valid_path=str(demo.valid),
        **kw,
    )


def flat(msg) -> dict:
    """A protocol message as one flat dict (a report's metrics and a checkpoint's record inlined)."""
    d = msgspec.to_builtins(msg)
    for nested in ("metrics", "checkpoint"):
        if isinstance(d.get(nested), dict):
            d.update(d.pop(nested))
    return d


def train(p, stop_at=None):
    """Run a plan; ask to stop once step stop_at is done. Returns (messages, result) as flat dicts."""
    msgs = []
    steps = []

    def emit(m):
        line = P.encode(m)
        assert P.decode_message(line) == m  # every message survives the wire
        json.loads(line)  # and is plain JSON (no NaN)
        msgs.append(flat(m))
        if isinstance(m, P.Step):
            steps.append(m.step)

    result = run(p, emit, lambda: stop_at is not None and bool(steps) and steps[-1] >= stop_at)
    return msgs, flat(result)


def kinds(msgs, t):
    return [m for m in msgs if m["t"] == t]


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory, ftt):
    """One uninterrupted run of the fine-tune type ``ftt``: (job_dir, messages, result)."""
    job = tmp_path_factory.mktemp("ref") / "job"
    msgs, result = train(plan(demo, job, config(demo, ftt)))
    return job, msgs, result


def test_uninterrupted_run_reports_everything(reference):
    job, msgs, result = reference
    assert msgs[0]["t"] == "loaded" and msgs[0]["step"] == 0
    assert [m["step"] for m in kinds(msgs, "step")] == list(range(1, ITERS + 1))
    assert [m["step"] for m in kinds(msgs, "report")] == [10, 20, 30, 40]
    assert [m["step"] for m in kinds(msgs, "eval")] == [0, 10, 20, 30, 40]  # 0: the base model's
    assert msgs[1]["t"] == "eval_begin" and msgs[2] == {
        **msgs[2],
        "t": "eval",
        "step": 0,
        "global_step": 0,
    }
    assert [m["step"] for m in kinds(msgs, "checkpoint")] == list(range(5, ITERS + 1, 5))
    # an evaluation's begin comes right before its result, in the training thread's messages (the
    # background writer reports a checkpoint whenever its write ends: during an evaluation, too)
    loop = [m for m in msgs if m["t"] not in ("checkpoint_begin", "checkpoint")]
    for i, m in enumerate(loop):
        if m["t"] == "eval":
            assert loop[i - 1]["t"] == "eval_begin" and loop[i - 1]["step"] == m["step"]
    # a checkpoint is written in the background (steps may run meanwhile), at most one in flight:
    # begin N, written N, begin N+1, written N+1... strictly in order
    ckpt_msgs = [(m["t"], m["step"]) for m in msgs if m["t"] in ("checkpoint_begin", "checkpoint")]
    assert ckpt_msgs == [
        (t, n) for n in range(5, ITERS + 1, 5) for t in ("checkpoint_begin", "checkpoint")
    ]
    reports = kinds(msgs, "report")
    assert reports[-1]["loss"] < reports[0]["loss"]  # it learns
    assert reports[-1]["trained_tokens"] > 0 and reports[-1]["tokens_per_s"] > 0
    assert result == msgs[-1] and result["t"] == "completed" and result["step"] == ITERS
    assert result["adapter_sha256"] == adapter_sha256(result["adapter_path"])
    assert result["checkpoint"] == kinds(msgs, "checkpoint")[-1]["path"]
    final = load_checkpoint(result["checkpoint"])
    # step 0's is reported, not kept
    assert final.state.job_step == ITERS and final.state.eval_count == 4
    # step 5: no trained weights evaluated yet
    assert kinds(msgs, "checkpoint")[0]["val_loss"] is None
    assert final.state.val_loss == kinds(msgs, "eval")[-1]["val_loss"]
    assert final.optimizer["step"].item() == ITERS
    assert temp_dirs(job) == []


@pytest.mark.parametrize("stop_at", [3, 17, 35])
def test_stop_and_resume_gives_the_same_adapter(demo, reference, ftt, tmp_path, stop_at):
    _, _, ref = reference
    job = tmp_path / "job"
    msgs, result = train(plan(demo, job, config(demo, ftt)), stop_at=stop_at)
    assert result["t"] == "stopped" and result["step"] == stop_at
    assert result["checkpoint"].endswith(f"step-{stop_at:08d}")
    assert kinds(msgs, "checkpoint")[-1]["step"] == stop_at
    assert not (job / "adapters").exists()
    msgs, result = train(plan(demo, job, config(demo, ftt), resume_from=result["checkpoint"]))
    assert msgs[0] == {**msgs[0], "t": "loaded", "step": stop_at}
    assert kinds(msgs, "step")[0]["step"] == stop_at + 1
    # a resumed job is not evaluated at step 0 again
    assert 0 not in [m["step"] for m in kinds(msgs, "eval")]
    assert result["t"] == "completed"
    assert result["adapter_sha256"] == ref["adapter_sha256"]


def test_resume_from_an_earlier_checkpoint_rewrites_identical_checkpoints(
    demo, reference, ftt, tmp_path
):
    ref_job, ref_msgs, ref = reference
    job = tmp_path / "job"
    shutil.copytree(ref_job, job)
    shutil.rmtree(job / "adapters")
    earlier = job / "checkpoints" / "step-00000015"
    msgs, result = train(plan(demo, job, config(demo, ftt), resume_from=str(earlier)))
    assert result["adapter_sha256"] == ref["adapter_sha256"]
    again = {m["step"]: m["manifest_sha256"] for m in kinds(msgs, "checkpoint")}
    first = {m["step"]: m["manifest_sha256"] for m in kinds(ref_msgs, "checkpoint")}
    assert sorted(again) == [20, 25, 30, 35, 40]
    assert all(again[s] == first[s] for s in again)  # byte-identical, state.json included


def test_resume_at_the_end_only_publishes(demo, reference, ftt, tmp_path):
    ref_job, _, ref = reference
    job = tmp_path / "job"
    shutil.copytree(ref_job, job)
    shutil.rmtree(job / "adapters")
    final = ref["checkpoint"].replace(str(ref_job), str(job))
    msgs, result = train(plan(demo, job, config(demo, ftt), resume_from=final))
    assert [m["t"] for m in msgs] == ["loaded", "completed"]
    assert result["adapter_sha256"] == ref["adapter_sha256"]


@LORA_ONLY
def test_evaluation_does_not_perturb_training(demo, reference, tmp_path):
    _, _, ref = reference
    msgs, result = train(plan(demo, tmp_path / "job", config(demo, steps_per_eval=ITERS)))
    assert [m["step"] for m in kinds(msgs, "eval")] == [0, ITERS]
    assert result["adapter_sha256"] == ref["adapter_sha256"]
    p = plan(demo, tmp_path / "noval", config(demo))
    p.valid_path = None
    msgs, result = train(p)
    assert kinds(msgs, "eval") == [] and kinds(msgs, "eval_begin") == []
    assert result["adapter_sha256"] == ref["adapter_sha256"]


@LORA_ONLY
def test_step_zero_evaluation_is_the_base_models_loss(demo, reference):
    """LoRA starts as the identity (B = 0), so step 0's val loss is the base model's own."""
    from ftctl.adapters.evaluate import evaluate_loss
    from ftctl.adapters.trainer import load_items

    _, msgs, _ = reference
    cfg = config(demo)
    model, tokenizer = mlx_lm.load(str(demo.model_dir))
    val = validation_batches(
        load_items(str(demo.valid), tokenizer, cfg.mask_prompt),
        cfg.batch_size,
        cfg.max_seq_length,
        cfg.val_batches,
    )
    loss, tokens, _ = evaluate_loss(model, val)
    first = kinds(msgs, "eval")[0]
    assert first["step"] == 0 and tokens > 0
    assert math.isclose(first["val_loss"], loss, rel_tol=1e-5)
    assert kinds(msgs, "eval")[-1]["val_loss"] < loss  # and training beat it


@LORA_ONLY
def test_the_seed_matters(demo, reference, tmp_path):
    _, _, ref = reference
    _, other = train(plan(demo, tmp_path / "job", config(demo, seed=8)))
    assert other["adapter_sha256"] != ref["adapter_sha256"]


@LORA_ONLY
def test_gradient_clipping_applies_and_resumes_bit_for_bit(demo, reference, tmp_path):
    cfg = config(demo, iters=12, max_grad_norm=1e-3, steps_per_eval=12)
    _, ref = train(plan(demo, tmp_path / "ref", cfg))
    _, unclipped = train(plan(demo, tmp_path / "free", config(demo, iters=12, steps_per_eval=12)))
    assert ref["adapter_sha256"] != unclipped["adapter_sha256"]  # the norm really was clipped
    job = tmp_path / "job"
    _, stopped = train(plan(demo, job, cfg), stop_at=7)
    _, result = train(plan(demo, job, cfg, resume_from=stopped["checkpoint"]))
    assert result["adapter_sha256"] == ref["adapter_sha256"]


def test_grad_accumulation_stops_on_an_update_boundary(demo, tmp_path):
    cfg = config(demo, iters=20, grad_accumulation_steps=2, save_every=4, steps_per_eval=20)
    _, ref = train(plan(demo, tmp_path / "ref", cfg))
    job = tmp_path / "job"
    msgs, stopped = train(plan(demo, job, cfg), stop_at=5)
    assert stopped["t"] == "stopped" and stopped["step"] == 6  # finishes the update
    assert load_checkpoint(stopped["checkpoint"]).optimizer["step"].item() == 3
    _, result = train(plan(demo, job, cfg, resume_from=stopped["checkpoint"]))
    assert result["adapter_sha256"] == ref["adapter_sha256"]


def test_warm_started_job_is_deterministic_and_restarts_the_schedule(
    demo, reference, ftt, tmp_path
):
    _, _, ref = reference
    cfg2 = config(demo, ftt, iters=20, lr_schedule=None, learning_rate=5e-4, seed=3)
    warm = ref["checkpoint"]

    def job2(name, **kw):
        return plan(demo, tmp_path / name, cfg2, warm_start_from=warm, global_step_base=ITERS, **kw)

    msgs, a = train(job2("a"))
    assert msgs[0]["global_step"] == ITERS
    assert kinds(msgs, "eval")[0] == {
        **kinds(msgs, "eval")[0],
        "step": 0,
        "global_step": ITERS,
    }  # the warm start's
    assert [m["global_step"] for m in kinds(msgs, "step")][:2] == [ITERS + 1, ITERS + 2]
    ck = load_checkpoint(kinds(msgs, "checkpoint")[1]["path"])
    assert ck.state.job_step == 10 and ck.state.global_step == ITERS + 10
    assert ck.optimizer["step"].item() == 10  # the schedule restarted at this job's step 0
    assert math.isclose(ck.optimizer["learning_rate"].item(), 5e-4, rel_tol=1e-6)

    b_dir = tmp_path / "b"
    _, stopped = train(job2("b"), stop_at=9)
    _, b = train(job2("b", resume_from=stopped["checkpoint"]))
    assert b["adapter_sha256"] == a["adapter_sha256"]
    assert load_checkpoint(b_dir / "checkpoints" / "step-00000020").state.global_step == ITERS + 20

    _, cold = train(plan(demo, tmp_path / "cold", cfg2, global_step_base=ITERS))
    assert cold["adapter_sha256"] != a["adapter_sha256"]  # the warm start did carry over


@LORA_ONLY
def test_warm_start_from_an_incompatible_adapter_is_refused(demo, reference, tmp_path):
    _, _, ref = reference
    cfg = config(demo, lora_parameters={"rank": 8, "dropout": 0.1})
    with pytest.raises(ValueError, match="rank"):
        train(plan(demo, tmp_path / "job", cfg, warm_start_from=ref["checkpoint"]))
    with pytest.raises(ValueError, match="fine_tune_type: 'lora' there, 'full' here"):
        train(
            plan(demo, tmp_path / "full", config(demo, "full"), warm_start_from=ref["checkpoint"])
        )


@LORA_ONLY
def test_corrupt_newest_checkpoint_is_refused_and_the_older_one_still_works(
    demo, reference, tmp_path
):
    ref_job, _, ref = reference
    job = tmp_path / "job"
    shutil.copytree(ref_job, job)
    shutil.rmtree(job / "adapters")
    newest, older = list_checkpoint_dirs(job)[-1], list_checkpoint_dirs(job)[-2]
    f = newest / ADAPTERS
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt) as e:
        verify_checkpoint(newest)
    assert e.value.file == ADAPTERS and ADAPTERS in str(e.value)
    os.truncate(newest / OPTIMIZER, 100)
    with pytest.raises(CheckpointCorrupt):
        train(plan(demo, job, config(demo), resume_from=str(newest)))
    verify_checkpoint(older)
    _, result = train(plan(demo, job, config(demo), resume_from=str(older)))
    assert result["adapter_sha256"] == ref["adapter_sha256"]


@LORA_ONLY
def test_resume_from_another_jobs_checkpoint_is_refused(demo, reference, tmp_path):
    _, _, ref = reference
    with pytest.raises(ValueError, match="not a checkpoint of job"):
        train(plan(demo, tmp_path / "job", config(demo), resume_from=ref["checkpoint"]))


def test_published_adapter_loads_and_generates_with_mlx_lm(demo, reference, ftt):
    _, _, ref = reference
    model, tokenizer = mlx_lm.load(str(demo.model_dir), adapter_path=ref["adapter_path"])
    trained = mx.load(os.path.join(ref["adapter_path"], ADAPTERS))
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    assert trained and all(mx.array_equal(params[k], v).item() for k, v in trained.items())
    text = mlx_lm.generate(model, tokenizer, "What is 2 plus 3?", max_tokens=4)
    assert isinstance(text, str)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True
    )
    out = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=4))
    assert 1 <= len(out) <= 4


def test_huge_learning_rate_diverges_and_is_never_checkpointed(demo, tmp_path):
    huge = {"optimizer": "sgd", "lr_schedule": None, "learning_rate": 1e20}
    cfg = config(demo, save_every=1, iters=10, **huge)
    job = tmp_path / "every"
    msgs = []
    with pytest.raises(TrainingDiverged) as e:
        run(plan(demo, job, cfg), lambda m: msgs.append(flat(m)))
    assert e.value.category == "nan" and "learning rate" in str(e.value)
    saved = [checkpoint_step(p) for p in list_checkpoint_dirs(job)]
    assert saved and max(saved) < e.value.step
    for p in list_checkpoint_dirs(job):
        assert math.isfinite(load_checkpoint(p).state.train_loss)
    assert kinds(msgs, "checkpoint_begin")[-1]["step"] < e.value.step

    job = tmp_path / "rarely"
    with pytest.raises(TrainingDiverged) as e:
        run(plan(demo, job, config(demo, **huge)), lambda m: None)
    assert e.value.category == "nan" and "3 steps in a row" in str(e.value)
    assert list_checkpoint_dirs(job) == [] and temp_dirs(job) == []


def test_an_infinite_loss_stops_training_at_once(demo, tmp_path, monkeypatch):
    real_loss, real_batch = trainer_mod.default_loss, TrainBatches.batch

    def loss(model, batch, lengths):  # +inf when the first token is the pad id
        value, toks = real_loss(model, batch, lengths)
        return value + mx.where(batch[0, 0] == 0, mx.array(math.inf), mx.array(0.0)), toks

    def batch(self, n):
        b, lengths = real_batch(self, n)
        if n == 6:  # iteration 7
            b = mx.concatenate([mx.zeros((1, b.shape[1]), b.dtype), b[1:]])
        return b, lengths

    monkeypatch.setattr(trainer_mod, "default_loss", loss)
    monkeypatch.setattr(TrainBatches, "batch", batch)
    job = tmp_path / "job"
    with pytest.raises(TrainingDiverged) as e:
        run(plan(demo, job, config(demo)), lambda m: None)
    assert (e.value.category, e.value.step) == ("inf", 7)
    assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] == [5]


def test_disk_errors_propagate_and_keep_earlier_checkpoints(demo, tmp_path):
    import errno

    from ftctl.adapters.fs import FS

    class FullAfter(FS):
        def write_bytes(self, path, data, sync=True):
            if "step-00000010" in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            super().write_bytes(path, data, sync)

    job = tmp_path / "job"
    with pytest.raises(OSError) as e:
        run(plan(demo, job, config(demo)), lambda m: None, fs=FullAfter())
    assert e.value.errno == errno.ENOSPC
    assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] == [5]
    assert temp_dirs(job) == []


# ------------------------------------------------------------------ epochs, early stopping, the result


def test_early_stopping_ends_the_run_and_a_resume_takes_the_same_decision(demo, tmp_path):
    """patience 2 and a min_delta no loss can beat: the evaluation at 10 is the reference, 20 and 30
    do not improve on it, so training stops at 30 (of 40) with a checkpoint there and the job
    completes. Stopped at 25 and resumed, it decides at 30 again, from the state its checkpoint
    carries, and publishes the same bytes; resumed from the step-30 checkpoint it only publishes."""
    cfg = config(demo, early_stopping={"patience": 2, "min_delta": 100.0})
    msgs, ref = train(plan(demo, tmp_path / "ref", cfg))
    assert ref["t"] == "completed" and ref["step"] == 30 and ref["global_step"] == 30
    assert [m["step"] for m in kinds(msgs, "step")][-1] == 30
    assert ref["stopped_early"].startswith("early stopping at step 30: ")
    assert "in 2 evaluations since step 10" in ref["stopped_early"]
    assert kinds(msgs, "checkpoint")[-1]["step"] == 30
    assert load_checkpoint(ref["checkpoint"]).state.stopped_early == ref["stopped_early"]
    job = tmp_path / "job"
    _, stopped = train(plan(demo, job, cfg), stop_at=25)
    assert stopped["step"] == 25
    _, resumed = train(plan(demo, job, cfg, resume_from=stopped["checkpoint"]))
    assert (resumed["step"], resumed["stopped_early"]) == (30, ref["stopped_early"])
    assert resumed["adapter_sha256"] == ref["adapter_sha256"]
    end = str(job / "checkpoints" / "step-00000030")
    msgs, again = train(plan(demo, job, cfg, resume_from=end))
    assert [m["t"] for m in msgs] == ["loaded", "completed"] and again["step"] == 30
    assert again["adapter_sha256"] == ref["adapter_sha256"]
    # without early stopping the same run goes on to iters
    _, full_run = train(plan(demo, tmp_path / "all", config(demo)))
    assert full_run["step"] == ITERS and full_run["stopped_early"] is None


def test_result_best_publishes_the_lowest_validation_loss_and_last_the_final_step(demo, tmp_path):
    """A full fine-tune at a high constant learning rate: its validation loss is lowest before the
    end. Evaluations every 5 steps, saves every 20: the best evaluation is checkpointed when it is
    measured, so it can be published; `result: last` publishes step 40. A resume after the best step
    still publishes the best one, bit for bit."""
    over = dict(lr_schedule=None, learning_rate=2e-2, save_every=20, steps_per_eval=5)
    cfg = config(demo, "full", **over)
    msgs, best = train(plan(demo, tmp_path / "best", cfg))
    evals = [(m["val_loss"], m["step"]) for m in kinds(msgs, "eval") if m["step"] > 0]
    low, at = min(evals)
    assert at % 20 and at < ITERS, f"this run's best evaluation ({at}) must fall between saves"
    assert (best["result"], best["result_step"], best["result_val_loss"]) == ("best", at, low)
    assert best["step"] == ITERS and best["checkpoint"].endswith(f"step-{at:08d}")
    assert best["adapter_sha256"] == adapter_sha256(best["checkpoint"])
    _, last = train(plan(demo, tmp_path / "last", config(demo, "full", result="last", **over)))
    assert last["result"] == "last" and last["result_step"] == ITERS
    assert last["adapter_sha256"] == adapter_sha256(tmp_path / "last/checkpoints/step-00000040")
    assert last["adapter_sha256"] != best["adapter_sha256"]
    job = tmp_path / "job"
    _, stopped = train(plan(demo, job, cfg), stop_at=at + 1)
    _, resumed = train(plan(demo, job, cfg, resume_from=stopped["checkpoint"]))
    assert (resumed["result_step"], resumed["adapter_sha256"]) == (at, best["adapter_sha256"])


@pytest.mark.parametrize("examples, batch_size, epochs", [(37, 4, 3), (8, 8, 2), (200, 6, 1)])
def test_epochs_are_whole_passes_of_the_batch_iterator(examples, batch_size, epochs):
    """`epochs: N` records iters = N x batches per epoch: exactly N passes of TrainBatches, every
    batch once in each, and status's epoch of a step is the cursor's."""
    from ftctl.core.config import epoch_of, resolve_epochs

    cfg = resolve_epochs(
        decode_config({"model": "m", "epochs": epochs, "batch_size": batch_size})[0], examples
    )
    b = TrainBatches(items(examples), batch_size, 64, seed=1)
    assert cfg.iters == epochs * b.n_batches == epochs * (examples // batch_size)
    assert b.cursor(cfg.iters - 1).epoch == epochs - 1 and b.cursor(cfg.iters).position == 0
    seen = [tuple(b.indices(n)) for n in range(cfg.iters)]
    assert all(seen.count(tuple(g)) == epochs for g in b.groups)
    for step in range(1, cfg.iters + 1):
        assert epoch_of(cfg, step) == (b.cursor(step - 1).epoch + 1, epochs)


# ---------------------------------------------------------------------------- batches


def items(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (list(rng.integers(1, 100, size=int(rng.integers(3, 90)))), int(rng.integers(0, 3)))
        for _ in range(n)
    ]


def test_batch_at_any_iteration_is_a_pure_function():
    data = items(37)
    b1 = TrainBatches(data, 4, 64, seed=5)
    seq = [b1.batch(n) for n in range(25)]
    b2 = TrainBatches(data, 4, 64, seed=5)
    for n in [24, 3, 17, 0, 9]:  # any order, fresh instance: no hidden state
        np.random.seed(n)  # the global RNG (mlx-lm's) has no say
        np.random.permutation(10)
        got = b2.batch(n)
        assert mx.array_equal(got[0], seq[n][0]).item() and mx.array_equal(got[1], seq[n][1]).item()
    assert b1.n_batches == 9
    assert (b1.cursor(20).epoch, b1.cursor(20).position) == (2, 2)
    for epoch in range(3):  # every batch exactly once per epoch
        seen = sorted(tuple(b1.indices(epoch * 9 + p)) for p in range(9))
        assert seen == sorted(tuple(g) for g in b1.groups)
    assert list(b1.order(0)) != list(b1.order(1))
    assert list(TrainBatches(data, 4, 64, seed=6).order(0)) != list(b1.order(0))
    assert list(b1.order(1)) == list(np.random.default_rng([5, 1]).permutation(9))


def test_validation_batches_are_fixed_and_drawn_from_file_order():
    data = items(30)
    a = validation_batches(data, 4, 64, 3)
    np.random.seed(1)
    b = validation_batches(data, 4, 64, 3)
    assert len(a) == 3 and all(mx.array_equal(x[0], y[0]).item() for x, y in zip(a, b))
    used = sorted(int(r) for batch in a for r in batch[1][:, 1].tolist())
    assert used == sorted(min(len(t), 64) for t, _ in data[:12])
    assert len(validation_batches(data, 4, 64, -1)) == 7


def test_padding_and_truncation_match_mlx_lm():
    data = items(6, seed=3)
    for max_len in (2048, 40):
        ours = make_batch(sorted(data, key=lambda x: len(x[0])), max_len)
        theirs = next(iterate_batches(data, 6, max_len))
        assert mx.array_equal(ours[0], theirs[0]).item()
        assert mx.array_equal(ours[1], theirs[1]).item()


def test_too_few_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        TrainBatches(items(3), 4, 64, seed=0)


def test_step_seed_is_pure_and_distinct():
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(s, g) for s in range(5) for g in range(200)}) == 1000


# ------------------------------------------------------------------------------- demo


def test_demo_is_byte_identical_for_a_seed(demo, tmp_path):
    again = build_demo(tmp_path / "again")
    root_a, root_b = demo.model_dir.parent, again.model_dir.parent
    files = sorted(p.relative_to(root_a) for p in root_a.rglob("*") if p.is_file())
    assert len(files) >= 10
    assert files == sorted(p.relative_to(root_b) for p in root_b.rglob("*") if p.is_file())
    for f in files:
        assert (root_a / f).read_bytes() == (root_b / f).read_bytes(), f
    assert len(demo.train.read_text().splitlines()) == 200
    assert len(demo.valid.read_text().splitlines()) == 40


@pytest.mark.parametrize("fmt", ["text", "completions", "chat", "conversations"])
def test_every_demo_format_loads_into_batches(demo, fmt):
    from ftctl.adapters.trainer import load_items

    _, tokenizer = mlx_lm.load(str(demo.model_dir))
    mask = fmt != "text"
    items = load_items(str(demo.formats[fmt]), tokenizer, mask_prompt=mask)
    assert len(items) == 20
    assert all(t[-1] == tokenizer.eos_token_id for t, _ in items)
    assert all((0 < off < len(t)) if mask else off == 0 for t, off in items)
    batch, lengths = TrainBatches(items, 4, 64, seed=0).batch(0)
    assert batch.shape[0] == 4 and lengths.shape == (4, 2)


# ---------------------------------------------------------------------------- async checkpoints


def test_the_arrays_handed_to_the_writer_are_a_snapshot(demo, tmp_path):
    """The step replaces model.state and optimizer.state with new arrays (never updates them in
    place), and holding the step-N arrays keeps MLX from donating their buffers to later steps: what
    the background writer reads stays the step-N values however many steps run meanwhile."""
    from mlx.utils import tree_flatten

    s = trainer_mod.load(plan(demo, tmp_path / "job", config(demo)))
    step, state = trainer_mod._compiled_step(s)

    def one(it):
        lvalue, toks, grad, _ = step(s.batches.batch(it - 1), None, True)
        mx.eval(state, lvalue, toks, grad)

    for it in range(1, 3):
        one(it)
    held = {
        **{"a." + k: v for k, v in tree_flatten(s.model.trainable_parameters())},
        **{"o." + k: v for k, v in tree_flatten(s.optimizer.state)},
    }
    copies = {k: np.array(v) for k, v in held.items()}
    views = {k: memoryview(v) for k, v in held.items()}  # what checkpoint_files hands the writer
    for it in range(3, 9):
        one(it)
    now = {
        **{"a." + k: v for k, v in tree_flatten(s.model.trainable_parameters())},
        **{"o." + k: v for k, v in tree_flatten(s.optimizer.state)},
    }
    assert now.keys() == held.keys()
    for k in held:
        assert now[k] is not held[k], f"{k} was not replaced by the step"
        assert np.array_equal(np.array(held[k]), copies[k]), f"{k} changed under the writer"
        assert bytes(views[k]) == copies[k].tobytes(), k
    moved = [k for k in held if not np.array_equal(np.array(now[k]), copies[k])]
    assert any(k.startswith("a.") for k in moved) and any(k.startswith("o.") for k in moved)


class SlowFS:
    """An FS whose every file write first waits `delay` seconds: steps run while a checkpoint is
    written, and the next checkpoint comes due before the write ends."""

    def __new__(cls, base, delay):
        class Slow(type(base)):
            def write_bytes(self, path, data, sync=True):
                time.sleep(delay)
                super().write_bytes(path, data, sync)

        slow = Slow.__new__(Slow)
        slow.__dict__.update(base.__dict__)
        return slow


def train_with(p, fs, stop_at=None):
    msgs, steps = [], []

    def emit(m):
        msgs.append(flat(m))
        if isinstance(m, P.Step):
            steps.append(m.step)

    result = run(
        p, emit, lambda: stop_at is not None and bool(steps) and steps[-1] >= stop_at, fs=fs
    )
    return msgs, flat(result)


class GatedFS:
    """An FS whose checkpoint writes hold until the training loop waits for the write in flight: so
    steps run while the first checkpoint is written, and the next one comes due before it ends — by
    the order of events, not by a delay that load could outrun."""

    def __new__(cls, base, loop_waits: threading.Event):
        class Gated(type(base)):
            def write_bytes(self, path, data, sync=True):
                assert loop_waits.wait(300), "the loop never waited for the write in flight"
                super().write_bytes(path, data, sync)

        gated = Gated.__new__(Gated)
        gated.__dict__.update(base.__dict__)
        return gated


@LORA_ONLY
def test_a_slow_write_overlaps_training_waits_for_the_next_and_is_bit_exact(
    demo, reference, tmp_path, monkeypatch
):
    from ftctl.adapters.checkpoint import CheckpointWriter
    from ftctl.adapters.fs import FS

    loop_waits = threading.Event()
    wait = CheckpointWriter.wait

    def waiting(self):  # the loop asks for the write in flight: let it end now
        if self.busy():
            loop_waits.set()
        wait(self)

    monkeypatch.setattr(CheckpointWriter, "wait", waiting)
    ref_job, ref_msgs, ref = reference
    job = tmp_path / "job"
    msgs, result = train_with(plan(demo, job, config(demo)), GatedFS(FS(), loop_waits))
    order = [
        (m["t"], m["step"]) for m in msgs if m["t"] in ("step", "checkpoint_begin", "checkpoint")
    ]
    begin5, done5 = order.index(("checkpoint_begin", 5)), order.index(("checkpoint", 5))
    assert any(t == "step" for t, _ in order[begin5:done5]), (
        "no step ran while checkpoint 5 was written"
    )
    begins = kinds(msgs, "checkpoint_begin")
    # a checkpoint came due while the previous was written
    assert max(b["waited_s"] for b in begins) > 0
    # the very same bytes as the reference run's checkpoints, and the same adapter
    assert [m["manifest_sha256"] for m in kinds(msgs, "checkpoint")] == [
        m["manifest_sha256"] for m in kinds(ref_msgs, "checkpoint")
    ]
    assert result["adapter_sha256"] == ref["adapter_sha256"] and temp_dirs(job) == []


@LORA_ONLY
def test_a_stop_waits_for_the_write_in_flight(demo, reference, tmp_path):
    from ftctl.adapters.fs import FS

    job = tmp_path / "job"
    msgs, result = train_with(plan(demo, job, config(demo)), SlowFS(FS(), 0.05), stop_at=11)
    assert (
        result["t"] == "stopped"
        and result["step"] == 11
        and result["checkpoint"].endswith("step-00000011")
    )
    assert msgs[-2]["t"] == "checkpoint" and msgs[-2]["step"] == 11 and msgs[-1] == result
    verify_checkpoint(result["checkpoint"])
    _, result = train(plan(demo, job, config(demo), resume_from=result["checkpoint"]))
    assert result["adapter_sha256"] == reference[2]["adapter_sha256"]


def ops_of_a_run(demo, tmp_path, cfg) -> list[int]:
    """The FS operation count after each checkpoint of a clean run (the ops of checkpoint k are
    (counts[k-1], counts[k]])."""
    from ftctl.adapters.fs import FS

    counts = []

    class Counting(FS):
        pass

    fs = Counting()
    run(
        plan(demo, tmp_path / "count", cfg),
        lambda m: counts.append(fs.ops) if isinstance(m, P.CheckpointWritten) else None,
        fs=fs,
    )
    return counts


@pytest.mark.parametrize(
    "err, ftt",
    [
        (__import__("errno").ENOSPC, "lora"),
        (__import__("errno").EIO, "lora"),
        (__import__("errno").ENOSPC, "full"),  # a full checkpoint: the trained layers + Adam state
    ],
    ids=["ENOSPC-lora", "EIO-lora", "ENOSPC-full"],
)
def test_a_fault_at_any_write_of_a_background_checkpoint_fails_the_run_and_keeps_the_previous(
    demo, tmp_path, err, ftt
):
    """FaultyFS fails each write operation of the second checkpoint in turn, on the writer thread
    while training goes on: run() raises that OSError (what the worker turns into disk_full or
    io_error), checkpoint 5 stays intact and verifiable, no temp folder is left, and no later
    checkpoint is started."""
    from ftctl.adapters.fs import FaultyFS

    cfg = config(demo, ftt, iters=15, steps_per_eval=100)
    counts = ops_of_a_run(demo, tmp_path, cfg)
    first, second = counts[0], counts[1]
    assert second - first == 10
    for n in range(first + 1, second + 1):
        job = tmp_path / f"job-{n}"
        fs = SlowFS(FaultyFS(n, err), 0.01)
        msgs = []
        with pytest.raises(OSError) as e:
            run(plan(demo, job, cfg), lambda m: msgs.append(flat(m)), fs=fs)
        assert e.value.errno == err and fs.failed, n
        assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] in ([5], [5, 10]), n
        # only the fsync of the parent after the rename failed
        if len(list_checkpoint_dirs(job)) == 2:
            assert n == second
            verify_checkpoint(list_checkpoint_dirs(job)[1])
        verify_checkpoint(list_checkpoint_dirs(job)[0])
        assert temp_dirs(job) == [], n
        assert [m["step"] for m in kinds(msgs, "checkpoint")] == [5], n  # 10 was never reported
        assert 15 not in [m["step"] for m in kinds(msgs, "checkpoint_begin")], n


def test_tokens_per_second_leaves_out_the_steps_that_compiled(demo, tmp_path, monkeypatch):
    """The first report of every attempt divided its tokens by a window holding the step that
    compiled (mx.compile traces the step on its first call): the demo printed 140 tok/s there and
    10,000 later. A fake clock: every step takes 1 ms, the first call of the compiled step 30 s."""
    import types

    clock = [0.0]

    def tick():
        clock[0] += 0.001
        return clock[0]

    fake = types.SimpleNamespace(
        **{
            **{k: getattr(time, k) for k in dir(time) if not k.startswith("_")},
            "perf_counter": tick,
        }
    )
    monkeypatch.setattr(trainer_mod, "time", fake)
    compiled = trainer_mod._compiled_step

    def slow_first_call(s):
        step, state = compiled(s)
        calls = []

        def stepped(*a):
            if not calls:
                clock[0] += 30.0  # the compile
            calls.append(1)
            return step(*a)

        return stepped, state

    monkeypatch.setattr(trainer_mod, "_compiled_step", slow_first_call)
    msgs, _ = train(plan(demo, tmp_path / "job", config(demo, iters=20)))
    first, second = (m["tokens_per_s"] for m in kinds(msgs, "report"))
    # both windows at the same 1 ms a step: within the spread of tokens per batch, not 4000x apart
    assert 0.8 < first / second < 1.25, (first, second)
