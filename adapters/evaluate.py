"""Scoring a job's adapter against its base model on one data set (`ftctl eval`).

The base model is loaded once and scored, then the adapter is applied to it exactly as
``mlx_lm.load(model, adapter_path=...)`` does (mlx-lm's load_adapters) and the very same
batches are scored again. Batching is the trainer's (batches.make_batch) and so is the loss
(evaluate_loss, here: the trainer's validation loss too): the mean cross-entropy per scored token,
dropout off. Preference pairs (prompt/chosen/rejected) are scored on their answers: the chosen
answers' loss, and how often and by how much each model ranks the chosen answer above the rejected
one (PairEval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load as load_model

from ftctl.core.dataset import DEFAULT, Features, valid_records
from ftctl.events.types import PairEval

from .batches import build_items, evaluation_batches, validation_batches
from .preference import STATS, sequence_logps
from .ranks import SINGLE, Ranks


@dataclass(frozen=True)
class Scores:
    examples: int
    tokens: int  # tokens scored (the prompt's are not, with mask_prompt)
    base_loss: float | None  # None: not finite
    adapter_loss: float | None
    pairs: PairEval | None = None  # preference pairs: their ranking, adapter vs base

    @property
    def base_ppl(self) -> float | None:
        return perplexity(self.base_loss)

    @property
    def adapter_ppl(self) -> float | None:
        return perplexity(self.adapter_loss)


def perplexity(loss: float | None) -> float | None:
    """exp(loss); None when the loss is unknown or its exponential is not a finite float."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def score(
    model_path: str,
    adapter_path: str,
    data: bytes,
    *,
    batch_size: int,
    max_seq_length: int,
    mask_prompt: bool,
    features: Features = DEFAULT,
    num_batches: int | None = None,
    trust_remote_code: bool = False,
    beta: float = 0.1,
) -> Scores:
    """Loss of the base model and of base + adapter on the valid records of ``data`` (JSONL bytes):
    every record (``num_batches`` None: `ftctl eval`), or mlx-lm's test_batches full batches (-1 =
    all of them: `test: true`). Preference pairs are scored on their answers: the loss is the chosen
    answers' NLL per token, and ``pairs`` says how each model ranks them (``beta``: the DPO reward's
    scale). Raises ValueError when the data has nothing to score."""
    model, tokenizer = load_model(
        model_path,
        tokenizer_config={"trust_remote_code": trust_remote_code},
        trust_remote_code=trust_remote_code,
    )
    items = build_items(valid_records(data, features), tokenizer, mask_prompt)
    if num_batches is None:
        batches = evaluation_batches(items, batch_size, max_seq_length)
    else:
        batches = validation_batches(items, batch_size, max_seq_length, num_batches)
    if items and not isinstance(items[0][1], int):
        return _pairs(model, adapter_path, batches, len(items), beta)
    base, tokens, _ = evaluate_loss(model, batches) if batches else (math.nan, 0, None)
    if tokens == 0:
        raise ValueError(
            "the data has no token to score (every example is empty, or all prompt with "
            "mask_prompt on, or cut off by max_seq_length)"
        )
    model = load_adapters(model, adapter_path)
    adapted, _, _ = evaluate_loss(model, batches)
    return Scores(
        examples=len(items),
        tokens=int(tokens),
        base_loss=_finite(base),
        adapter_loss=_finite(adapted),
    )


def _logps(model, batches) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Every pair's chosen and rejected answer log-probs (summed), and their token counts."""
    model.eval()
    out = [[], [], [], []]
    for tokens, lengths in batches:
        logps, n = sequence_logps(model, tokens, lengths)
        half = logps.shape[0] // 2
        for acc, x in zip(out, (logps[:half], logps[half:], n[:half], n[half:])):
            acc.append(x)
        mx.eval(*(acc[-1] for acc in out))
    return tuple(mx.concatenate(acc) for acc in out)


def _pairs(model, adapter_path: str, batches, examples: int, beta: float) -> Scores:
    """Scores of preference pairs: base, then base + adapter, on the very same batches."""
    if not batches:
        raise ValueError("the data has no pair to score")
    bc, br, nc, nr = _logps(model, batches)
    tokens = int(nc.sum().item())
    if tokens == 0 or int((nr == 0).sum().item()) or int((nc == 0).sum().item()):
        raise ValueError("a pair has no answer token to score (cut off by max_seq_length)")
    ac, ar, _, _ = _logps(load_adapters(model, adapter_path), batches)
    reward = (ac - bc) - (ar - br)

    def mean(x: mx.array) -> float | None:
        return _finite(mx.mean(x.astype(mx.float32)).item())

    def per_token(c: mx.array, r: mx.array) -> mx.array:  # answers of different lengths compared
        return c / nc - r / nr

    pairs = PairEval(
        base_accuracy=mean(per_token(bc, br) > 0),
        adapter_accuracy=mean(per_token(ac, ar) > 0),
        base_margin=mean(per_token(bc, br)),
        adapter_margin=mean(per_token(ac, ar)),
        reward_margin=_finite(beta * mx.mean(reward).item()),
        reward_accuracy=mean(reward > 0),
        beta=beta,
    )
    return Scores(
        examples=examples,
        tokens=tokens,
        base_loss=_finite(-bc.sum().item() / tokens),
        adapter_loss=_finite(-ac.sum().item() / tokens),
        pairs=pairs,
    )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evaluate_loss(
    model, batches, ranks: Ranks = SINGLE, loss=default_loss, inputs=lambda b: b
) -> tuple[float, int, mx.array | None]:
    """(mean loss per scored token, scored tokens, the mean pair stats of preference training — per
    pair, so accuracy is the share of pairs ranked right — else None) over fixed batches, dropout
    off. ``loss``: the train mode's (trainer.train_loss); ``inputs``: what it takes for a batch
    (trainer.Session.inputs: DPO adds the reference's log-probs). Draws no randomness, so it never
    perturbs training (which reseeds every step anyway). The ranks of a data-parallel job each score
    every size-th batch and sum: the loss, the tokens, and the pair stats by pair."""
    model.eval()
    total, ntoks, stats, pairs = mx.array(0.0), mx.array(0), None, 0
    for batch in batches[ranks.rank :: ranks.size] if ranks.many else batches:
        value, toks, *pair = loss(model, *inputs(batch))
        total += value * toks
        ntoks += toks
        if pair:  # the pair stats by pair (rows: chosen sides, then rejected)
            n = batch[0].shape[0] // 2
            pairs += n
            stats = pair[0] * n if stats is None else stats + pair[0] * n
        mx.eval(total, ntoks, stats)
    if ranks.many:  # every rank sums the same shapes, whether its batches held pairs or none
        summed = ranks.sum(
            mx.concatenate(
                [
                    mx.stack([total, mx.array(float(pairs))]),
                    mx.zeros(len(STATS)) if stats is None else stats,
                ]
            )
        )
        ntoks = ranks.sum(ntoks)
        mx.eval(summed, ntoks)
        total, pairs = summed[0], int(summed[1].item())
        stats = summed[2:] if pairs else None
    model.train()
    return (total / ntoks).item(), ntoks.item(), None if stats is None else stats / pairs
