"""Scoring a job's adapter against its base model on one data set (`ftctl eval`).

The base model is loaded once and scored, then the adapter is applied to it exactly as
``mlx_lm.load(model, adapter_path=...)`` does (mlx-lm's load_adapters) and the very same
batches are scored again. Batching and loss are the trainer's (batches.make_batch,
trainer.evaluate_loss): the mean cross-entropy per scored token, dropout off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load as load_model

from ftctl.core.dataset import DEFAULT, Features, valid_records

from .batches import build_dataset, evaluation_batches, tokenized, validation_batches
from .trainer import evaluate_loss


@dataclass(frozen=True)
class Scores:
    examples: int
    tokens: int  # tokens scored (the prompt's are not, with mask_prompt)
    base_loss: float | None  # None: not finite
    adapter_loss: float | None

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
) -> Scores:
    """Loss of the base model and of base + adapter on the valid records of ``data`` (JSONL bytes):
    every record (``num_batches`` None: `ftctl eval`), or mlx-lm's test_batches full batches (-1 =
    all of them: `test: true`). Raises ValueError when the data has nothing to score."""
    model, tokenizer = load_model(
        model_path,
        tokenizer_config={"trust_remote_code": trust_remote_code},
        trust_remote_code=trust_remote_code,
    )
    items = tokenized(build_dataset(valid_records(data, features), tokenizer, mask_prompt))
    if num_batches is None:
        batches = evaluation_batches(items, batch_size, max_seq_length)
    else:
        batches = validation_batches(items, batch_size, max_seq_length, num_batches)
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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
