import math

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
            assert abs(int(row["rejected"]) - int(row["chosen"])) == 1
