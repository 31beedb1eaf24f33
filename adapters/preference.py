"""Preference losses (DPO, ORPO) over per-sequence log-probabilities: pure functions of arrays.

Names follow mlx-lm-lora so its users' configs carry over: DPO's loss types sigmoid | hinge | ipo,
`beta` the strength. Each returns (loss, chosen_reward, rejected_reward), the rewards per pair, so
the margin (chosen - rejected) and accuracy (margin > 0) are read from the same numbers.
"""

import mlx.core as mx
import mlx.nn as nn

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float,
    loss_type: str = "sigmoid",
):
    """DPO (Rafailov et al. 2023) on summed log-probs of each side; ipo is Azar et al. 2023."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    logits = chosen - rejected
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = mx.square(logits - 1 / (2 * beta))
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}: one of {', '.join(DPO_LOSS_TYPES)}")
    return mx.mean(losses), beta * chosen, beta * rejected


def orpo_loss(
    chosen_mean_logp: mx.array, rejected_mean_logp: mx.array, chosen_nll: mx.array, beta: float
):
    """ORPO (Hong et al. 2024): the chosen side's NLL plus beta times the odds-ratio loss, on the
    mean per-token log-probs of each side. No reference model."""
    log_odds = (chosen_mean_logp - rejected_mean_logp) - (
        mx.log1p(-mx.exp(chosen_mean_logp)) - mx.log1p(-mx.exp(rejected_mean_logp))
    )
    ratio = -nn.log_sigmoid(log_odds)
    loss = mx.mean(chosen_nll) + beta * mx.mean(ratio)
    return loss, beta * chosen_mean_logp, beta * rejected_mean_logp


def pair_metrics(chosen_reward: mx.array, rejected_reward: mx.array) -> dict[str, float]:
    """What preference training is judged by: mean rewards, reward margin, accuracy."""
    margin = chosen_reward - rejected_reward
    return {
        "chosen_reward": mx.mean(chosen_reward).item(),
        "rejected_reward": mx.mean(rejected_reward).item(),
        "reward_margin": mx.mean(margin).item(),
        "accuracy": mx.mean(margin > 0).item(),
    }
