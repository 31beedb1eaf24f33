"""`ftctl eval` and the step-0 evaluation, on a job really trained by the daemon (10 steps of the
demo): did fine-tuning help, as one recorded event."""

from __future__ import annotations

import json
import math

import pytest
from helpers import history, make_workspace, run, sha256_file, status

SMALL = {"iters": 10, "save_every": 5, "steps_per_eval": 5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo):
    """A workspace whose job 0001 completed (trained by the daemon, in this process)."""
    from helpers import ftctl

    from ftctl.adapters.workspace import Workspace
    from ftctl.control.daemon import Daemon

    home = make_workspace(tmp_path_factory.mktemp("eval") / "ws", demo.model_dir, **SMALL)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "j1")
    assert Daemon(Workspace(home), until_idle=True).run() == "queue empty (--until-idle)"
    assert status(home, "0001")["state"] == "completed"
    return home


def _job_events(home, job="0001"):
    return [e for e in history(home) if e["stream"] == f"job:{job}"]


def test_a_fresh_job_is_evaluated_at_step_0_once_it_is_training(trained):
    evs = _job_events(trained)
    kinds = [e["type"] for e in evs]
    evals = [e["data"] for e in evs if e["type"] == "evaluated"]
    assert [(e["step"], e["global_step"]) for e in evals] == [(0, 0), (5, 5), (10, 10)]
    assert (
        kinds.index("training_started")
        < kinds.index("evaluated")
        < kinds.index("checkpoint_started")
    )
    assert all(e["val_loss"] is not None for e in evals)
    assert status(trained, "0001")["last_val_loss"] == evals[-1]["val_loss"]


def test_eval_scores_the_adapter_and_the_base_on_the_validation_split(trained, capsys):
    import mlx_lm

    from ftctl.adapters.batches import evaluation_batches
    from ftctl.adapters.evaluate import evaluate_loss
    from ftctl.adapters.trainer import load_items

    job = status(trained, "0001")
    valid = trained / "jobs" / "0001" / "data" / "valid.jsonl"
    code, out, err = run(capsys, "eval", "1", "--json", "--home", trained)
    assert code == 0, err
    r = json.loads(out)
    assert (
        r["job"] == "0001"
        and r["data_path"] == "jobs/0001/data/valid.jsonl"  # as recorded: relative to the workspace
        and r["data_sha256"] == sha256_file(valid)
    )
    assert (
        r["examples"] == len(valid.read_text().splitlines()) == 40 and r["tokens"] > r["examples"]
    )
    assert r["base_model"] == job["base_model"] and r["adapter_sha256"] == job["adapter_sha256"]
    assert str(trained / r["adapter_path"]) == job["adapter_path"]  # status: where it is now
    assert r["base_loss"] != r["adapter_loss"]
    assert r["adapter_loss"] < r["base_loss"]  # ten steps on the same kind of data do help
    for who in ("base", "adapter"):
        assert math.isclose(r[f"{who}_ppl"], math.exp(r[f"{who}_loss"]), rel_tol=1e-12)
    # the adapter scored is the one mlx_lm.load(model, adapter_path=...) gives
    model, tok = mlx_lm.load(job["base_model"], adapter_path=job["adapter_path"])
    again, tokens, _ = evaluate_loss(
        model, evaluation_batches(load_items(str(valid), tok, False), 2, 96)
    )
    assert math.isclose(again, r["adapter_loss"], rel_tol=1e-5) and tokens == r["tokens"]
    # recorded: the last event of the job, and shown by status
    last = _job_events(trained)[-1]
    assert last["type"] == "adapter_evaluated" and last["seq"] == r["seq"] and last["ts"] == r["at"]
    assert last["data"] == {
        "type": "adapter_evaluated",
        **{k: v for k, v in r.items() if k not in ("at", "seq", "warnings")},
    }
    s = status(trained, "0001")
    assert s["state"] == "completed" and s["last_eval"] == {
        k: v for k, v in r.items() if k not in ("seq", "warnings")
    }
    code, out, _ = run(capsys, "status", "0001", "--home", trained)
    assert code == 0 and "last eval" in out and f"{r['adapter_loss']:.4f}" in out


def test_eval_prints_a_verdict(trained, capsys):
    code, out, err = run(capsys, "eval", "0001", "--home", trained)
    assert code == 0, err
    text = " ".join(out.split())
    assert "fine-tuning helped" in text and "perplexity" in text and "40 examples" in text
    assert "recorded as event" in text


def test_eval_on_a_given_file(trained, demo, capsys):
    data = demo.formats["completions"]
    before = len(history(trained))
    code, out, err = run(capsys, "eval", "0001", "--data", data, "--json", "--home", trained)
    assert code == 0, err
    r = json.loads(out)
    assert r["data_path"] == str(data.resolve()) and r["data_sha256"] == sha256_file(data)
    assert r["examples"] == 20 and r["warnings"] == []
    assert r["base_loss"] != r["adapter_loss"]
    assert len(history(trained)) == before + 1
    assert status(trained, "0001")["last_eval"]["data_path"] == str(data.resolve())


def test_eval_refuses_bad_data_and_records_nothing(trained, tmp_path, capsys):
    before = len(history(trained))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n{"nope": 1}\n')
    code, _, err = run(capsys, "eval", "0001", "--data", bad, "--home", trained)
    assert code == 1 and "cannot be evaluated on" in err and "line 2" in err
    code, _, err = run(
        capsys, "eval", "0001", "--data", tmp_path / "missing.jsonl", "--home", trained
    )
    assert code == 1 and "does not exist" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, "eval", "0001", "--data", empty, "--home", trained)
    assert code == 1 and "empty" in err
    assert len(history(trained)) == before


def test_eval_refuses_a_job_without_an_adapter(ws, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(30)))
    assert run(capsys, "submit", data, "--home", ws)[0] == 0
    code, _, err = run(capsys, "eval", "0001", "--home", ws)
    assert code == 1 and "job 0001 has no adapter yet" in err and "ftctl start" in err
    run(capsys, "cancel", "0001", "--home", ws)
    code, _, err = run(capsys, "eval", "0001", "--home", ws)
    assert code == 1 and "never have one (it is cancelled)" in err
    code, _, err = run(capsys, "eval", "0042", "--home", ws)
    assert code == 1 and "no job '0042'" in err
    assert [e["type"] for e in history(ws)] == ["job_submitted", "cancelled"]


def test_eval_skips_the_bad_lines_of_an_accepted_file_and_says_so(trained, demo, tmp_path, capsys):
    lines = demo.valid.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    # 1 bad line of 41: a warning
    mixed.write_text("\n".join(lines[:10] + ['{"broken": '] + lines[10:]) + "\n")
    code, out, err = run(capsys, "eval", "0001", "--data", mixed, "--json", "--home", trained)
    assert code == 0, err
    r = json.loads(out)
    assert r["examples"] == 40 and len(r["warnings"]) == 1 and "line 11" in r["warnings"][0]
    code, _, err = run(capsys, "eval", "0001", "--data", mixed, "--home", trained)
    assert code == 0 and "warning:" in err and "line 11" in err


def test_eval_refuses_an_adapter_changed_on_disk(trained, capsys):
    blob = trained / "jobs" / "0001" / "adapters" / "adapters.safetensors"
    good = blob.read_bytes()
    before = len(history(trained))
    try:
        blob.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
        code, _, err = run(capsys, "eval", "0001", "--home", trained)
        assert code == 1 and "changed on disk" in err
    finally:
        blob.write_bytes(good)
    assert len(history(trained)) == before


def test_a_job_trained_on_renamed_keys_is_evaluated_under_them(tmp_path, demo, capsys):
    """chat_feature renames the data's key (mlx-lm's *_feature): `ftctl eval` reads the job's validation
    split, and a --data file, with the job's keys, as training did — not the default ones."""
    from helpers import ftctl

    from ftctl.adapters.workspace import Workspace
    from ftctl.control.daemon import Daemon

    def renamed(src, dst):
        rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
        dst.write_text("".join(json.dumps({"conv": r["messages"]}) + "\n" for r in rows))
        return dst

    train, valid = (
        renamed(demo.train, tmp_path / "train.jsonl"),
        renamed(demo.valid, tmp_path / "v.jsonl"),
    )
    home = make_workspace(tmp_path / "ws", demo.model_dir, **{**SMALL, "iters": 5})
    ftctl(home, "submit", str(train), "--valid", str(valid), "--set", "chat_feature=conv")
    assert Daemon(Workspace(home), until_idle=True).run() == "queue empty (--until-idle)"
    for extra in ((), ("--data", str(valid))):
        code, out, err = run(capsys, "eval", "1", *extra, "--json", "--home", home)
        assert code == 0, err
        r = json.loads(out)
        assert r["examples"] == 40 and math.isfinite(r["adapter_loss"]), r
