"""Preference training (DPO, ORPO): the losses over per-sequence log-probabilities, the batch loss
the trainer differentiates, and DPO's reference.

Names follow mlx-lm-lora so its users' configs carry over: DPO's loss types sigmoid | hinge | ipo |
dpop, `beta` the strength, `delta` DPOP's penalty. The losses return (loss, chosen_reward,
rejected_reward), the rewards per pair, so the margin (chosen - rejected) and accuracy (margin > 0)
are read from the same numbers.

A batch of pairs is one array (batches.collate): the chosen sides' rows, then the rejected sides';
only answer tokens are scored (the prompt is the same on both sides). DPO's reference log-probs are
computed before each step, outside the differentiated function, from the base model — the trained
model with its adapter switched off (lora/dora: no second copy of the weights), its trained layers'
base weights swapped in (full: a frozen copy of those layers only), or the model the config names
(reference_model_path) — in eval mode, drawing no randomness: recomputed deterministically, so
nothing about the reference needs checkpointing and a resume is bit-exact.
"""

from contextlib import contextmanager
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ftctl.events.types import PAIR_FIELDS

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "dpop")
STATS = PAIR_FIELDS  # the order of the stats array batch_loss returns


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float,
    loss_type: str = "sigmoid",
    delta: float = 50.0,
):
    """DPO (Rafailov et al. 2023) on summed log-probs of each side; ipo is Azar et al. 2023 (on mean
    log-probs: the caller's); dpop (Pal et al. 2024) adds delta times how far the chosen side fell
    below the reference."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    logits = chosen - rejected
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = mx.square(logits - 1 / (2 * beta))
    elif loss_type == "dpop":
        penalty = mx.maximum(ref_chosen - policy_chosen, 0)
        losses = -(nn.log_sigmoid(beta * logits) - delta * penalty)
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


def sequence_logps(model, tokens: mx.array, lengths: mx.array):
    """(summed log-prob of each row's scored tokens, their count): mlx-lm's default_loss, per row."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    logp = -nn.losses.cross_entropy(logits, targets) * mask
    return logp.astype(mx.float32).sum(-1), mask.sum(-1)


def _halves(x: mx.array):
    n = x.shape[0] // 2
    return x[:n], x[n:]


def _stats(chosen_reward: mx.array, rejected_reward: mx.array) -> mx.array:
    margin = chosen_reward - rejected_reward
    return mx.stack(
        [
            mx.mean(chosen_reward),
            mx.mean(rejected_reward),
            mx.mean(margin),
            mx.mean((margin > 0).astype(mx.float32)),
        ]
    )


def batch_loss(train_mode: str, beta: float, loss_type: str = "sigmoid", delta: float = 50.0):
    """The loss of a batch of pairs for the train mode, as the trainer's step calls a loss:
    loss(model, tokens, lengths[, reference log-probs]) -> (loss, scored tokens, STATS as an array)."""
    if train_mode == "dpo":

        def dpo(model, tokens, lengths, reference):
            logps, counts = sequence_logps(model, tokens, lengths)
            if loss_type == "ipo":  # IPO compares mean log-probs (mlx-lm-lora's compute_score)
                n = mx.maximum(counts, 1).astype(mx.float32)
                logps, reference = logps / n, reference / n
            (pc, pr), (rc, rr) = _halves(logps), _halves(reference)
            loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, delta)
            return loss, counts.sum(), _stats(chosen, rejected)

        return dpo
    if train_mode == "orpo":

        def orpo(model, tokens, lengths):
            logps, counts = sequence_logps(model, tokens, lengths)
            mean = logps / mx.maximum(counts, 1).astype(mx.float32)
            mc, mr = _halves(mean)
            loss, chosen, rejected = orpo_loss(mc, mr, -mc, beta)
            return loss, counts.sum(), _stats(chosen, rejected)

        return orpo
    raise ValueError(f"no preference loss for train_mode {train_mode!r}: dpo or orpo")


def reference(cfg, model, load_model: Callable) -> Callable | None:
    """DPO's reference: ref(tokens, lengths) -> the reference log-prob of each row (evaluated), or
    None (no reference: sft, orpo). Call it before a resume restores trained weights: for `full` it
    keeps the trained layers' base weights as they are now."""
    if cfg.train_mode != "dpo":
        return None
    if cfg.reference_model_path is not None:
        other, _ = load_model(cfg.reference_model_path)
        other.freeze()
        other.eval()
        return lambda tokens, lengths: _evaluated(sequence_logps(other, tokens, lengths)[0])
    switch = _base_weights(model) if cfg.fine_tune_type == "full" else _adapter_off(model)

    def ref(tokens, lengths):
        training = model.training
        model.eval()
        try:
            with switch():
                return _evaluated(sequence_logps(model, tokens, lengths)[0])
        finally:
            model.train(training)

    return ref


def _evaluated(x: mx.array) -> mx.array:
    mx.eval(x)
    return x


def _base_weights(model):
    """`full`: a context in which the trained layers hold their base weights (the frozen copy)."""
    frozen = tree_flatten(model.trainable_parameters())

    @contextmanager
    def switch():
        trained = tree_flatten(model.trainable_parameters())
        model.update(tree_unflatten(frozen))
        try:
            yield
        finally:
            model.update(tree_unflatten(trained))

    return switch


def _adapter_off(model):
    """lora/dora: a context in which every adapted layer is its base layer again (mlx-lm's
    LoRALinear, DoRALinear, … keep it as .linear or .embedding): the base model, same weights."""

    @contextmanager
    def switch():
        adapted = [
            (name, m)
            for name, m in model.named_modules()
            if "lora_a" in m and ("linear" in m or "embedding" in m)
        ]
        base = [(name, m["linear"] if "linear" in m else m["embedding"]) for name, m in adapted]
        model.update_modules(tree_unflatten(base))
        try:
            yield
        finally:
            model.update_modules(tree_unflatten(adapted))

    return switch
