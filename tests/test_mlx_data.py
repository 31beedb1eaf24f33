"""Data and keys as mlx-lm users hold them: folders of train/valid/test.jsonl, renamed features, chat
rows with tools, Hugging Face datasets (offline), resume_adapter_file, and what submit checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import make_workspace, run

from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.control.submit import SubmitError, submit


def chat(i: int, key: str = "messages") -> dict:
    return {
        key: [
            {"role": "user", "content": f"What is {i} plus 1?"},
            {"role": "assistant", "content": str(i + 1)},
        ]
    }


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def home(tmp_path, demo) -> Path:
    return make_workspace(tmp_path / "ws", demo.model_dir)


def _submit(home: Path, path, **kw):
    ws = Workspace(home)
    ledger = Ledger(ws.open_journal())
    try:
        return submit(ws, ledger, path, **kw), ledger.state
    finally:
        ledger.close()


def test_a_folder_in_mlx_lms_layout_is_submitted_with_its_own_splits(home, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "train.jsonl", [chat(i) for i in range(30)])
    write(d / "valid.jsonl", [chat(i) for i in range(30, 36)])
    write(d / "test.jsonl", [chat(i) for i in range(40, 70)] + [{"text": ""}])
    sub, p = _submit(home, d, overrides=["test=true"])
    j = p.jobs[sub.job]
    assert (
        sub.state == "queued" and j.examples == 30
    )  # nothing held out: the folder has valid.jsonl
    copies = home / "jobs" / sub.job / "data"
    for f in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (copies / f).read_bytes() == (d / f).read_bytes()
        assert j.copies[f] == hashlib.sha256((d / f).read_bytes()).hexdigest()
    assert j.data_path == str(d) and j.valid_path == str(d / "valid.jsonl")
    assert sub.test_report.problems[0].line == 31  # its bad line named, as for train
    # without valid.jsonl: trained without validation, as mlx-lm does, and said
    (d / "valid.jsonl").unlink()
    sub, _ = _submit(home, d, again=True)
    assert any("no validation split" in w for w in sub.warnings)
    assert not (home / "jobs" / sub.job / "data" / "valid.jsonl").exists()
    # test: true with no test.jsonl, and a folder with no train.jsonl, refused
    (d / "test.jsonl").unlink()
    with pytest.raises(SubmitError, match="has no test split"):
        _submit(home, d, overrides=["test=true"], again=True)
    with pytest.raises(SubmitError, match="without train.jsonl"):
        _submit(home, tmp_path)


def test_data_in_the_config_and_renamed_features(home, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(30)] + [
        {"question": "", "answer": "x"}
    ]
    write(d / "train.jsonl", rows)
    over = [f"data={d}", "prompt_feature=question", "completion_feature=answer"]
    sub, p = _submit(home, None, overrides=over)
    assert sub.state == "queued" and sub.report.format == "completions"
    assert sub.report.problems[0].reason == "'question' is empty, not a non-empty string"
    # the same file without the renames: no known format, every line named
    sub, _ = _submit(home, None, overrides=[f"data={d}"])
    assert (
        sub.state == "rejected"
        and "expected keys prompt+completion" in sub.report.problems[0].reason
    )
    with pytest.raises(SubmitError, match="no data named"):
        _submit(home, None)


def test_renamed_chat_rows_with_tools_reach_the_chat_template_as_in_mlx_lm(demo, tmp_path):
    """A tokenizer whose template renders `tools`: ftctl's records tokenize exactly as mlx-lm's own
    loader tokenizes the same file (the tools reach apply_chat_template)."""
    from mlx_lm.tuner.datasets import load_local_dataset
    from mlx_lm.utils import load

    from ftctl.adapters.batches import build_dataset, tokenized
    from ftctl.core.dataset import Features, valid_records

    model = tmp_path / "model"
    shutil.copytree(demo.model_dir, model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    template = (
        "{% if tools %}<|system|>{{ tools | tojson }}<|end|>{% endif %}"
        + (model / "chat_template.jinja").read_text()
    )
    (model / "chat_template.jinja").write_text(template)
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    d = tmp_path / "data"
    d.mkdir()
    write(d / "train.jsonl", [{**chat(i, "conv"), "tools": [tool]} for i in range(4)])
    _, tokenizer = load(str(model))
    f = Features(chat="conv")
    ours = tokenized(
        build_dataset(valid_records((d / "train.jsonl").read_bytes(), f), tokenizer, True)
    )
    cfg = types.SimpleNamespace(chat_feature="conv", mask_prompt=True)
    train, _, _ = load_local_dataset(d, tokenizer, cfg)
    theirs = [train.process(train[i]) for i in range(len(train))]
    assert [(list(t), o) for t, o in theirs] == ours
    assert "add" in tokenizer.decode(ours[0][0])  # the tools are in what is trained on


def test_a_hugging_face_dataset_from_a_save_to_disk_folder_and_an_uncached_name(home, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"q": f"What is {i}?", "a": str(i)} for i in range(50)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    entry = f"hf_dataset={{path: {folder}, prompt_feature: q, completion_feature: a, test_split: 'train[:4]'}}"
    sub, p = _submit(home, None, overrides=[entry, "test=true"])
    j = p.jobs[sub.job]
    assert sub.state == "queued" and sub.report.format == "completions" and j.examples == 40
    data = home / "jobs" / sub.job / "data"
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert first == {
        "prompt": "What is 0?",
        "completion": "0",
    }  # train[:80%], renamed as mlx-lm reads it
    assert len((data / "valid.jsonl").read_text().splitlines()) == 5  # train[-10%:]
    assert len((data / "test.jsonl").read_text().splitlines()) == 4
    # `ftctl submit FOLDER` with a save_to_disk folder: its splits, as `data: NAME` reads a dataset
    with pytest.raises(
        SubmitError, match="not in the local Hugging Face datasets cache .* never downloads"
    ):
        _submit(home, None, overrides=["hf_dataset={path: org/never-downloaded}"])
    with pytest.raises(
        SubmitError, match="neither a folder .* nor a dataset in the local Hugging Face"
    ):
        _submit(home, "org/never-downloaded")


def test_submit_refuses_what_would_only_fail_at_load(home, tmp_path, demo):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    cases = {
        "num_layers=3": "num_layers = 3, but the model has 2 layers",
        "lora_parameters.keys=[self_attn.q_proj, attn.k]": "names attn.k, which the model does not have",
        "lora_parameters.keys=[input_layernorm]": "cannot take LoRA",
        "batch_size=41": "the training split has 40 examples, fewer than batch_size = 41",
        "resume_adapter_file=nowhere.safetensors": "nowhere.safetensors does not exist",
    }
    for override, message in cases.items():
        with pytest.raises(SubmitError, match=message.replace("[", r"\[")) as e:
            _submit(home, data, overrides=[override])
        assert "Nothing was queued" in str(e.value)
    assert not Ledger(Workspace(home).open_journal()).state.jobs  # nothing was recorded


def test_max_seq_length_past_the_context_is_refused_only_for_an_example_that_reaches_it(
    home, tmp_path, demo
):
    """mlx-lm's default max_seq_length 2048 on the 512-token demo model: mlx_lm.lora trains it (no
    example comes near 512 tokens, so nothing is cut either way), so ftctl does too; an example longer
    than the context would train past the positions the model was built for: refused, naming it."""
    short = write(tmp_path / "short.jsonl", [chat(i) for i in range(40)])
    assert _submit(home, short, overrides=["max_seq_length=2048"])[0].state == "queued"
    rows = [chat(i) for i in range(40)]
    rows[6]["messages"][1]["content"] = " ".join(["seven"] * 600)  # line 7: ~600 tokens
    long = write(tmp_path / "long.jsonl", rows)
    with pytest.raises(SubmitError) as e:
        _submit(home, long, overrides=["max_seq_length=2048"])
    msg = " ".join(str(e.value).split())
    assert "max_seq_length = 2048, but the model's context is 512 tokens" in msg, msg
    assert "long.jsonl has 1 of 38 examples longer than that (lines 7;" in msg, msg
    assert "set max_seq_length to 512 or less" in msg and "Nothing was queued" in msg
    assert _submit(home, long, overrides=["max_seq_length=512"])[0].state == "queued"  # cut, said


def test_submit_knows_a_full_fine_tune(home, tmp_path, demo):
    """fine_tune_type full adds no LoRA, so lora_parameters.keys are not checked against the model;
    the checkpoint size is estimated from the model's headers and said; a disk without room for the
    checkpoints now is warned about (the daemon pauses the job at its start); epochs become iters.
    (The same keys with lora are refused: test_submit_refuses_what_would_only_fail_at_load.)"""
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    full = ["fine_tune_type=full", "lora_parameters.keys=[attn.k]", "epochs=2"]
    sub, p = _submit(home, data, overrides=full)
    j = p.jobs[sub.job]
    # 40 lines, every 20th held out for validation: 38 to train on, 19 batches of 2 per epoch
    assert sub.state == "queued" and (j.config.batch_size, j.config.iters) == (2, 2 * 19)
    said = " | ".join(sub.warnings)
    assert "each checkpoint holds the trained layers' weights and the adamw state" in said
    assert "GB free on" not in said  # the test machine has room for the demo model's layers
    sub, _ = _submit(home, data, overrides=[*full, "min_free_disk_gb=1e9", "seed=4"])
    assert any("the daemon pauses it at its start until there is room" in w for w in sub.warnings)


def test_a_full_fine_tunes_resume_adapter_file_holds_its_layers_weights():
    """mlx-lm's full fine-tune saves the trained layers' own weights as adapters.safetensors: a
    resume_adapter_file for full holds those (of the trained layers), never LoRA matrices."""
    from ftctl.core import fit
    from ftctl.core.config import decode_config

    facts = fit.ModelFacts(
        layers=2,
        layer_prefix="model.layers.",
        layer_modules={"self_attn.q_proj": 2, "input_layernorm": 1},
        top_modules={"lm_head": 2},
        context=512,
        context_key="max_position_embeddings",
    )
    full = decode_config({"model": "m", "fine_tune_type": "full", "num_layers": 1})[0]
    last = {
        "model.layers.1.self_attn.q_proj.weight": [8, 8],
        "model.layers.1.input_layernorm.weight": [8],
    }
    assert fit.resume_problems(full, facts, last, "a.safetensors") == []
    first = {
        "model.layers.0.self_attn.q_proj.weight": [8, 8]
    }  # a layer num_layers 1 does not train
    lora = {"model.layers.1.self_attn.q_proj.lora_a": [8, 4]}
    for tensors in (first, lora):
        (problem,) = fit.resume_problems(full, facts, tensors, "a.safetensors")
        assert "not the weights of this full fine-tune's layers (num_layers 1)" in problem
    keyed = {"model": "m", "fine_tune_type": "full", "num_layers": 1, "max_seq_length": 512}
    keyed["lora_parameters"] = {"keys": ["nope"]}
    assert fit.model_problems(decode_config(keyed)[0], facts) == []  # full adds no LoRA to "nope"


def test_init_writes_num_layers_and_max_seq_length_that_fit_its_model(tmp_path, capsys, demo):
    assert run(capsys, "init", "--model", demo.model_dir, "--home", tmp_path / "ws")[0] == 0
    cfg = (tmp_path / "ws" / "ftctl.yaml").read_text()
    assert "\nnum_layers: 2\n" in cfg and "\nmax_seq_length: 512\n" in cfg


def test_resume_adapter_file_is_copied_hashed_checked_and_trained_from(tmp_path, demo, baseline):
    """mlx-lm's --resume-adapter-file: the job starts from those weights (a fresh optimizer); the
    file is copied into the job with its sha256; a file of another config is refused at submit."""
    from helpers import finished, ftctl

    adapter = Path(finished(baseline.home, "0001")["adapter_path"]) / "adapters.safetensors"
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    short = ["--set", "iters=5", "--set", "save_every=5", "--set", "steps_per_eval=5"]
    ftctl(
        home,
        "submit",
        str(demo.train),
        "--valid",
        str(demo.valid),
        "--set",
        f"resume_adapter_file={adapter}",
        *short,
    )
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--again", "--fresh", *short)
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)
    j, fresh = finished(home, "0001"), finished(home, "0002")
    sha = hashlib.sha256(adapter.read_bytes()).hexdigest()
    copy = home / "jobs" / "0001" / "data" / "resume_adapters.safetensors"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha
    # the resumed job started where the file's weights are: its first validation beats a fresh start
    vals = {
        e["stream"]: e["data"]["val_loss"]
        for e in reversed(json.loads(ftctl(home, "history", "--json").stdout))
        if e["type"] == "evaluated" and e["data"]["step"] == 0
    }
    assert vals["job:0001"] < vals["job:0002"] and j["adapter_sha256"] != fresh["adapter_sha256"]
    with pytest.raises(
        AssertionError, match="does not match|not adapter weights of this config|rank"
    ):
        ftctl(
            home,
            "submit",
            str(demo.train),
            "--set",
            f"resume_adapter_file={adapter}",
            "--set",
            "lora_parameters.rank=8",
            "--again",
        )


def test_clear_cache_threshold_and_grad_checkpoint_reach_the_training_step(tmp_path, demo):
    """In a worker-like process of its own (grad_checkpoint patches the layer class, as mlx-lm does):
    the cache is cleared after a step exactly when it holds more than clear_cache_threshold."""
    code = f"""
import json, mlx.core as mx
from ftctl.adapters import trainer
from ftctl.adapters.protocol import TrainPlan
from ftctl.core.config import decode_config
calls = []
real = mx.clear_cache
mx.clear_cache = lambda: (calls.append(1), real())[1]
out = {{}}
for name, threshold, gc in (("every", 0, True), ("never", 10**15, False)):
    calls.clear()
    cfg, _ = decode_config({{"model": {str(demo.model_dir)!r}, "iters": 4, "batch_size": 2, "num_layers": -1,
        "max_seq_length": 64, "save_every": 4, "steps_per_report": 2,
        "clear_cache_threshold": threshold, "grad_checkpoint": gc}})
    s = trainer.load(TrainPlan(job_id="x", job_dir={str(tmp_path)!r} + "/" + name, config=cfg,
        train_path={str(demo.train)!r}))
    trainer._Loop(s, lambda m: None, trainer.FS()).train(lambda: False)
    out[name] = [len(calls), type(s.model.layers[0]).__call__.__name__]
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["every"][0] >= 4 and out["never"][0] == 0, out
    assert out["every"][1] == "checkpointed_fn"  # mlx-lm's grad_checkpoint wraps the layer's call


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_report_to_logs_every_recorded_point_offline(tmp_path, demo, mode):
    """A stand-in `wandb` package (none is installed here) records what the daemon gives it: offline
    mode, mlx-lm's metric names, the points the journal recorded. A DPO job's reports carry the pair
    figures and its evaluations the validation pairs' (val_…), in the trackers and in the live
    TensorBoard files (preference/<figure>/train and /val); an SFT job's carry none."""
    from helpers import ftctl, training_data
    from test_view import _tb_points

    from ftctl.events.types import PAIR_FIELDS

    fake = tmp_path / "pkgs" / "wandb"
    fake.mkdir(parents=True)
    log = tmp_path / "wandb-calls.jsonl"
    (fake / "__init__.py").write_text(
        f"""import json
def _w(*a):
    open({str(log)!r}, "a").write(json.dumps(a) + "\\n")
class _Run:
    def log(self, data, step=None): _w("log", data, step)
    def finish(self): _w("finish")
def init(**kw):
    _w("init", {{k: v for k, v in kw.items() if k != "config"}})
    return _Run()
"""
    )
    home = make_workspace(tmp_path / "ws", demo.model_dir, train_mode=mode)
    train, valid = training_data(demo, {"train_mode": mode})
    env = {"PYTHONPATH": str(fake.parent)}
    sets = ("report_to=wandb", "iters=10", "metrics.tensorboard=true")
    ftctl(
        home,
        "submit",
        str(train),
        "--valid",
        str(valid),
        *(a for x in sets for a in ("--set", x)),
        env=env,
    )
    ftctl(home, "start", "--until-idle", "--quiet", env=env, timeout=600)
    calls = [json.loads(l) for l in log.read_text().splitlines()]
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[-1] == ["finish"]
    logged = [c for c in calls if c[0] == "log"]
    assert {c[2] for c in logged if "train_loss" in c[1]} == {5, 10}
    vals = [c[1] for c in logged if "val_loss" in c[1]]
    trains = [c[1] for c in logged if "train_loss" in c[1]]
    assert [v["iteration"] for v in vals] == [0, 10]
    tb = _tb_points(home / "tensorboard" / "0001")
    for k in PAIR_FIELDS:
        if mode == "sft":
            assert not any(k in c or f"val_{k}" in c for c in vals + trains)
            assert f"preference/{k}/val" not in tb and f"preference/{k}/train" not in tb
        else:
            assert all(isinstance(v[f"val_{k}"], float) for v in vals), vals
            assert all(isinstance(t[k], float) for t in trains), trains
            assert [s for s, _ in tb[f"preference/{k}/val"]] == [0, 10]
            assert [s for s, _ in tb[f"preference/{k}/train"]] == [5, 10]
            assert [x for _, x in tb[f"preference/{k}/val"]] == pytest.approx(
                [v[f"val_{k}"] for v in vals], rel=1e-6
            )


def test_a_folder_of_preference_pairs_is_refused_at_submit_with_nothing_queued(home, tmp_path):
    d = tmp_path / "prefs"
    d.mkdir()
    rows = [
        {"prompt": f"What is {i} plus 1?", "chosen": str(i + 1), "rejected": "x"} for i in range(20)
    ]
    write(d / "train.jsonl", rows)
    with pytest.raises(SubmitError, match="preference pairs .* train_mode dpo or orpo"):
        _submit(home, d)
    assert not Ledger(Workspace(home).open_journal()).state.jobs
