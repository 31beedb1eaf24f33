import json
import math
import os

import mlx.core as mx
import pytest

from ftctl.adapters.preference import dpo_loss, orpo_loss, pair_metrics


def a(*xs):
    return mx.array(xs, dtype=mx.float32)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# policy chosen/rejected -10/-12 against reference -11/-11: logits = (1) - (-1) = 2
def test_dpo_sigmoid_matches_the_hand_computed_value():
    loss, c, r = dpo_loss(a(-10.0), a(-12.0), a(-11.0), a(-11.0), beta=0.1)
    assert loss.item() == pytest.approx(-log_sigmoid(0.2), rel=1e-6)
    assert c.tolist() == pytest.approx([0.1]) and r.tolist() == pytest.approx([-0.1])


def test_dpo_hinge_is_zero_past_the_margin_and_linear_before_it():
    loss, _, _ = dpo_loss(a(-10.0), a(-12.0), a(-11.0), a(-11.0), beta=0.1, loss_type="hinge")
    assert loss.item() == pytest.approx(1 - 0.2)
    loss, _, _ = dpo_loss(a(0.0), a(-20.0), a(0.0), a(0.0), beta=0.1, loss_type="hinge")
    assert loss.item() == 0.0


def test_dpo_ipo_is_the_squared_distance_to_one_over_two_beta():
    loss, _, _ = dpo_loss(a(-10.0), a(-12.0), a(-11.0), a(-11.0), beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((2 - 5) ** 2)


def test_dpo_averages_over_pairs_and_refuses_an_unknown_type():
    loss, _, _ = dpo_loss(a(-10.0, -11.0), a(-12.0, -11.0), a(-11.0, -11.0), a(-11.0, -11.0), 0.5)
    assert loss.item() == pytest.approx((-log_sigmoid(1.0) + math.log(2)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        dpo_loss(a(0.0), a(0.0), a(0.0), a(0.0), 0.1, loss_type="kto")


def test_orpo_adds_beta_times_the_odds_ratio_loss_to_the_chosen_nll():
    lc, lr = math.log(0.5), math.log(0.25)
    log_odds = math.log(0.5 / 0.5) - math.log(0.25 / 0.75)  # = log 3
    loss, c, r = orpo_loss(a(lc), a(lr), a(2.0), beta=0.1)
    assert loss.item() == pytest.approx(2.0 - 0.1 * log_sigmoid(log_odds), rel=1e-6)
    assert c.tolist() == pytest.approx([0.1 * lc]) and r.tolist() == pytest.approx([0.1 * lr])


def test_pair_metrics_read_margin_and_accuracy_from_the_rewards():
    m = pair_metrics(a(1.0, 0.0, 2.0, -1.0), a(0.0, 1.0, 1.0, -3.0))
    assert m == pytest.approx(
        {"chosen_reward": 0.5, "rejected_reward": -0.25, "reward_margin": 0.75, "accuracy": 0.75}
    )


def test_the_demo_builds_preference_pairs_whose_chosen_answer_is_the_right_result(demo):
    import json

    from ftctl.core.dataset import validate_jsonl

    for name in ("train", "valid"):
        data = demo.preference[name].read_bytes()
        report = validate_jsonl(data)
        assert report.format == "preference" and report.problems == []
        for row in map(json.loads, data.splitlines()):
            a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
            right = {"plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}[op]
            assert int(row["chosen"]) == right(int(a), int(b))
            restated, _, wrong = row["rejected"].rpartition(" ")
            assert restated == row["prompt"] and abs(int(wrong) - int(row["chosen"])) == 1


# --------------------------------------------------------------------------------------------
# training: real MLX on the demo model (tests/test_trainer.py's helpers)

PREF = {"iters": 20, "steps_per_eval": 10, "val_batches": -1, "lr_schedule": None}


def pref_plan(demo, job, cfg, **kw):
    from test_trainer import plan

    p = plan(demo, job, cfg, **kw)
    p.train_path, p.valid_path = str(demo.preference["train"]), str(demo.preference["valid"])
    return p


def pref_config(demo, mode, fine_tune_type="lora", **over):
    from test_trainer import config

    return config(demo, fine_tune_type, train_mode=mode, **{**PREF, "learning_rate": 5e-3, **over})


@pytest.fixture(scope="module")
def dpo_run(demo, tmp_path_factory):
    from test_trainer import train

    job = tmp_path_factory.mktemp("dpo") / "job"
    return job, *train(pref_plan(demo, job, pref_config(demo, "dpo", beta=0.5)))


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_preference_training_raises_validation_accuracy_above_chance(demo, dpo_run, mode, tmp_path):
    """A DPO and an ORPO job on the demo pairs: the validation pairs' accuracy ends well above
    chance and above where it started, the margin grows, and every report and evaluation carries
    the rewards, margin and accuracy beside the loss."""
    from test_trainer import kinds, train

    if mode == "dpo":
        _, msgs, result = dpo_run
    else:
        msgs, result = train(pref_plan(demo, tmp_path / "job", pref_config(demo, "orpo", beta=0.5)))
    assert result["t"] == "completed" and result["step"] == 20
    evals = kinds(msgs, "eval")
    assert [e["step"] for e in evals] == [0, 10, 20]
    first, last = evals[0]["preference"], evals[-1]["preference"]
    assert last["accuracy"] >= 0.8 and last["accuracy"] > first["accuracy"]
    assert last["reward_margin"] > first["reward_margin"] and last["reward_margin"] > 0
    assert math.isclose(
        last["reward_margin"], last["chosen_reward"] - last["rejected_reward"], abs_tol=1e-5
    )
    if mode == "dpo":  # step 0: the policy is its own reference, every reward is 0
        assert first == {**first, "chosen_reward": 0.0, "rejected_reward": 0.0, "accuracy": 0.0}
        assert evals[0]["val_loss"] == pytest.approx(math.log(2), rel=1e-5)
    for r in kinds(msgs, "report"):
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] is not None
        assert r["reward_margin"] == pytest.approx(
            r["chosen_reward"] - r["rejected_reward"], abs=1e-5
        )


def test_a_stopped_dpo_run_resumes_bit_for_bit(demo, dpo_run, tmp_path):
    """The reference log-probs are recomputed, never saved: a stop at 7 and a resume end with the
    uninterrupted run's adapter bytes."""
    from test_trainer import train

    _, _, ref = dpo_run
    cfg = pref_config(demo, "dpo", beta=0.5)
    job = tmp_path / "job"
    _, stopped = train(pref_plan(demo, job, cfg), stop_at=7)
    assert stopped["t"] == "stopped" and stopped["step"] == 7
    _, result = train(pref_plan(demo, job, cfg, resume_from=stopped["checkpoint"]))
    assert result["adapter_sha256"] == ref["adapter_sha256"]


def test_a_stopped_full_dpo_run_resumes_bit_for_bit(demo, tmp_path):
    """fine_tune_type full: the reference is the trained layers' base weights, kept from before the
    resume restores the checkpoint's — a stop at 5 and a resume end with the uninterrupted bytes."""
    from test_trainer import train

    cfg = pref_config(demo, "dpo", "full", iters=10, steps_per_eval=10, learning_rate=1e-3)
    _, ref = train(pref_plan(demo, tmp_path / "ref", cfg))
    job = tmp_path / "job"
    _, stopped = train(pref_plan(demo, job, cfg), stop_at=5)
    assert stopped["t"] == "stopped" and stopped["step"] == 5
    _, result = train(pref_plan(demo, job, cfg, resume_from=stopped["checkpoint"]))
    assert result["adapter_sha256"] == ref["adapter_sha256"]


def test_an_explicit_reference_model_that_is_the_base_trains_the_same_bytes(
    demo, dpo_run, tmp_path
):
    """reference_model_path names the base model itself: a second copy, loaded beside the trained
    one, gives the very log-probs the adapter switched off gives — the same adapter bytes."""
    from test_trainer import train

    _, _, ref = dpo_run
    cfg = pref_config(demo, "dpo", beta=0.5, reference_model_path=str(demo.model_dir))
    _, result = train(pref_plan(demo, tmp_path / "job", cfg))
    assert result["adapter_sha256"] == ref["adapter_sha256"]


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "full"])
def test_the_reference_is_the_base_model_whatever_was_trained(demo, fine_tune_type):
    """lora/dora: the adapter switched off; full: the trained layers' base weights swapped in. After
    the trained weights move, the reference log-probs still equal the untouched base model's."""
    import mlx_lm
    from mlx.utils import tree_map

    from ftctl.adapters.batches import build_items, collate
    from ftctl.adapters.preference import reference, sequence_logps
    from ftctl.adapters.trainer import setup_model
    from ftctl.core.dataset import valid_records

    cfg = pref_config(demo, "dpo", fine_tune_type)
    model, tokenizer = setup_model(cfg)
    ref = reference(cfg, model, None)
    records = valid_records(demo.preference["valid"].read_bytes())[:4]
    tokens, lengths = collate(build_items(records, tokenizer), 64)
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    base, _ = mlx_lm.load(str(demo.model_dir))
    want = sequence_logps(base, tokens, lengths)[0]
    model.eval()  # the adapter's dropout off, to compare
    moved = sequence_logps(model, tokens, lengths)[0]
    assert not mx.allclose(moved, want).item()  # the trained weights did move
    model.train()
    assert mx.allclose(ref(tokens, lengths), want, atol=1e-4).item()  # in eval mode: no dropout
    assert model.training  # and back in training mode
    model.eval()
    assert mx.array_equal(sequence_logps(model, tokens, lengths)[0], moved).item()  # restored


def test_a_pair_is_scored_on_its_answer_tokens_only(demo):
    """Both sides of a pair share the prompt (system, question, template): each side's offset is
    where its answer starts, the same for both."""
    import mlx_lm

    from ftctl.adapters.batches import collate, item_length, preference_pair

    _, tokenizer = mlx_lm.load(str(demo.model_dir))
    row = {"system": "Be brief.", "prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"}
    (c, co), (r, ro) = preference_pair(row, tokenizer)
    assert co == ro and c[:co] == r[:ro] and c[co:] != r[ro:]
    chat = {
        "chosen": [
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4"},
        ],
        "rejected": [
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "5"},
        ],
    }
    (c2, co2), (r2, _) = preference_pair(chat, tokenizer)
    assert c2[co2:] != r2[co2:] and co2 > 0
    tokens, lengths = collate([((c, co), (r, ro)), ((c2, co2), (r2, co2))], 64)
    assert tokens.shape[0] == 4 and lengths[:, 0].tolist() == [co, co2, ro, co2]
    assert item_length(((c, co), (r, ro))) == max(len(c), len(r))


# --------------------------------------------------------------------------------------------
# bad input: refused with the reason and what to do, nothing queued


def _decode(**over):
    from ftctl.core.config import decode_config

    return decode_config({"model": "m", **over})


def test_mlx_lm_loras_preference_keys_are_read_under_its_names():
    cfg, _ = _decode(
        train_mode="dpo",
        beta=0.2,
        dpo_cpo_loss_type="dpop",
        delta=10,
        reference_model_path="ref",
        chosen_feature="good",
        rejected_feature="bad",
        system_feature="sys",
    )
    assert (cfg.train_mode, cfg.beta, cfg.dpo_cpo_loss_type, cfg.delta) == ("dpo", 0.2, "dpop", 10)
    from ftctl.core.config import features

    f = features(cfg)
    assert (f.chosen, f.rejected, f.system) == ("good", "bad", "sys")


@pytest.mark.parametrize(
    "over, words",
    [
        ({"train_mode": "grpo"}, ["train_mode", "'sft', 'dpo', 'orpo'"]),
        ({"dpo_cpo_loss_type": "kto"}, ["sigmoid", "hinge", "ipo", "dpop"]),
        ({"beta": 0}, ["beta", "> 0"]),
        ({"judge": "human"}, ["mlx-lm-lora key", "another", "train_mode: sft | dpo | orpo"]),
        ({"train_type": "full"}, ["fine_tune_type", "beta, dpo_cpo_loss_type"]),
        ({"train_mode": "orpo", "reference_model_path": "r"}, ["only dpo compares"]),
        (  # data-parallel: a rank's share of a batch is whole pairs
            {"train_mode": "dpo", "batch_size": 3, "distributed": {"hosts": ["a", "b"]}},
            ["batch_size = 3", "world size 2", "batch_size / world size pairs"],
        ),
    ],
)
def test_unsupported_preference_settings_are_refused_with_what_is_supported(over, words):
    from ftctl.core.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _decode(**over)
    for w in words:
        assert w in str(e.value), str(e.value)


def _pref_folder(tmp_path, demo, *, rows=None):
    d = tmp_path / "prefs"
    d.mkdir(exist_ok=True)
    for name in ("train", "valid"):
        (d / f"{name}.jsonl").write_bytes(demo.preference[name].read_bytes())
    if rows is not None:
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _submit(tmp_path, demo, data, *overrides):
    from helpers import make_workspace

    from ftctl.adapters.workspace import Workspace
    from ftctl.control.ledger import Ledger
    from ftctl.control.submit import submit

    home = tmp_path / "ws"
    if not home.exists():
        make_workspace(home, demo.model_dir)
    ledger = Ledger(Workspace(home).open_journal())
    try:
        return submit(Workspace(home), ledger, data, overrides=list(overrides)), ledger.state
    finally:
        ledger.close()


def _nothing_queued(tmp_path):
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.ledger import Ledger

    ledger = Ledger(Workspace(tmp_path / "ws").open_journal())
    try:
        assert not ledger.state.jobs
    finally:
        ledger.close()


def test_a_dpo_job_is_queued_on_preference_pairs_with_its_mode_recorded(tmp_path, demo):
    sub, state = _submit(tmp_path, demo, _pref_folder(tmp_path, demo), "train_mode=dpo")
    j = state.jobs[sub.job]
    assert sub.state == "queued" and j.config.train_mode == "dpo" and j.examples == 200


def test_the_train_mode_and_the_data_must_agree(tmp_path, demo):
    from ftctl.control.submit import SubmitError

    with pytest.raises(SubmitError, match="preference pairs .* `--set train_mode=dpo`"):
        _submit(tmp_path, demo, _pref_folder(tmp_path, demo))
    with pytest.raises(SubmitError, match="train_mode orpo trains preference pairs.*'chat' data"):
        _submit(tmp_path, demo, demo.train, "train_mode=orpo")
    _nothing_queued(tmp_path)


def test_bad_pairs_are_rejected_and_an_unloadable_reference_refused(tmp_path, demo):
    from ftctl.control.submit import SubmitError

    good = [json.loads(x) for x in demo.preference["train"].read_text().splitlines()]
    rows = good[:150] + [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 20
    d = _pref_folder(tmp_path, demo)
    with pytest.raises(SubmitError, match="reference_model_path cannot load"):
        _submit(tmp_path, demo, d, "train_mode=dpo", f"reference_model_path={tmp_path / 'nope'}")
    _nothing_queued(tmp_path)
    # too many bad pairs: recorded as rejected (never trained), the bad lines named
    d = _pref_folder(tmp_path, demo, rows=rows)
    sub, state = _submit(tmp_path, demo, d, "train_mode=dpo")
    assert sub.state == "rejected" and state.jobs[sub.job].state == "rejected"
    assert "line 151: 'chosen' equals 'rejected': the pair prefers nothing" in sub.reasons[0]


def test_renamed_preference_keys_validate_and_train_under_mlx_lm_loras_names(demo):
    from ftctl.core.dataset import Features, valid_records, validate_jsonl

    f = Features(prompt="question", chosen="good", rejected="bad", system="sys")
    data = b'{"question": "q?", "good": "1", "bad": "2", "sys": "s"}\n{"question": "q?", "good": "1"}\n'
    r = validate_jsonl(data, f)
    assert r.format == "preference" and [p.line for p in r.problems] == [2]
    assert "'rejected' is missing" in r.problems[0].reason
    assert valid_records(data, f) == [
        {"prompt": "q?", "chosen": "1", "rejected": "2", "system": "s"}
    ]


# --------------------------------------------------------------------------------------------
# `ftctl lora --train-mode dpo|orpo`: mlx-lm-lora's command line, as a job


def test_ftctl_lora_trains_dpo_on_a_folder_of_pairs_and_refuses_what_it_cannot(demo, tmp_path):
    import subprocess
    import sys

    from helpers import ftctl_json

    pairs = _pref_folder(tmp_path, demo)
    (pairs / "test.jsonl").write_bytes(demo.preference["valid"].read_bytes())
    common = ["--model", str(demo.model_dir), "--train", "--data", str(pairs)]
    common += ["--max-seq-length", "96", "--num-layers", "2", "--batch-size", "2"]

    def lora(*args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FTCTL_")}
        return subprocess.run(
            [sys.executable, "-m", "ftctl.cli", "lora", *args, "--home", str(tmp_path / "ws")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env={**env, "COLUMNS": "200"},
        )

    p = lora(*common, "--train-mode", "grpo")
    assert p.returncode == 1 and "invalid choice: 'grpo'" in p.stderr
    p = lora(*common[:-6], "--data", str(demo.data_dir), "--train-mode", "dpo", *common[-6:])
    assert p.returncode == 1 and "train_mode dpo trains preference pairs" in p.stderr, p.stderr
    p = lora(*common)  # sft, mlx-lm's default mode, on pairs
    assert p.returncode == 1 and "`ftctl lora --train-mode dpo`" in p.stderr, p.stderr
    assert not (tmp_path / "ws" / "jobs").exists() or not any((tmp_path / "ws" / "jobs").iterdir())
    p = lora(
        *common,
        *("--train-mode", "dpo", "--beta", "0.5", "--dpo-cpo-loss-type", "hinge"),
        *("--iters", "10", "--learning-rate", "5e-3", "--steps-per-eval", "5", "--test"),
    )
    assert p.returncode == 0, p.stderr + p.stdout
    assert "Saved final weights to" in p.stdout
    # --test scores the test pairs, base vs adapter, as `ftctl eval` does
    assert "pairs ranked right" in p.stdout and "DPO reward against the base" in p.stdout
    # the progress lines carry the validation pairs' accuracy and margin beside the loss
    vals = [l for l in (p.stdout + p.stderr).splitlines() if ": val loss " in l and " acc " in l]
    assert len(vals) == 3, p.stdout + p.stderr
    j = ftctl_json(tmp_path / "ws", "status", "0001")
    assert (j["state"], j["step"]) == ("completed", 10)
    (sub,) = [e for e in ftctl_json(tmp_path / "ws", "history") if e["type"] == "job_submitted"]
    got = sub["data"]["config"]  # what the job records
    assert (got["train_mode"], got["beta"], got["dpo_cpo_loss_type"]) == ("dpo", 0.5, "hinge")
    points = ftctl_json(tmp_path / "ws", "metrics", "0001")["points"]
    last = [p for p in points if p["val_accuracy"] is not None][-1]
    assert last["step"] == 10 and last["val_accuracy"] > 0.5 and last["val_reward_margin"] > 0
    assert all(p["accuracy"] is not None for p in points if p["loss"] is not None)
    # `ftctl eval` on the job's validation pairs: the adapter ranks them better than the base
    e = ftctl_json(tmp_path / "ws", "eval", "0001")["preference"]
    assert e["adapter_accuracy"] > e["base_accuracy"] and e["adapter_margin"] > e["base_margin"]
    assert e["reward_margin"] == pytest.approx(last["val_reward_margin"], rel=1e-4)
    assert e["beta"] == 0.5


def test_eval_scores_pairs_adapter_vs_base(demo, dpo_run):
    """adapters/evaluate.score on preference pairs: the chosen answers' loss for both models, the
    ranking by mean log-prob per answer token (the base prefers the right answer on few pairs: the
    rejected restates the question in likely tokens), and the adapter's DPO reward against the
    base — what training reported on the same validation pairs."""
    from test_trainer import kinds

    from ftctl.adapters.evaluate import score

    job, msgs, result = dpo_run
    s = score(
        str(demo.model_dir),
        result["adapter_path"],
        demo.preference["valid"].read_bytes(),
        batch_size=4,
        max_seq_length=64,
        mask_prompt=False,
        beta=0.5,
    )
    p = s.pairs
    assert s.examples == 40 and s.tokens > 0 and s.base_loss > 0 and s.adapter_loss > 0
    assert p.base_accuracy < 0.5 < 0.8 <= p.adapter_accuracy
    assert p.adapter_margin > p.base_margin
    # the published adapter's evaluation in training (result: best picks it by validation loss)
    (val,) = [e["preference"] for e in kinds(msgs, "eval") if e["step"] == result["result_step"]]
    assert p.reward_margin == pytest.approx(val["reward_margin"], rel=1e-4)
    assert p.reward_accuracy == pytest.approx(val["accuracy"])
