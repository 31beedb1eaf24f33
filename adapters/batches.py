"""Deterministic batches.

mlx-lm's iterate_batches shuffles with the global np.random, which evaluation also
draws from, so a resumed run cannot find its place. Here batches are cut like
mlx-lm's (sorted by length, fixed groups of batch_size) and the batch at iteration
n is a pure function of (seed, n): epoch n // B uses the permutation
np.random.default_rng([seed, epoch]), position n % B. Resume jumps straight there.
Validation batches are fixed: no randomness at all.
"""

import types
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset, create_dataset

from ftctl.core.config import RecordedConfigError

from .checkpoint import Cursor

PAD_TO = 32


def build_dataset(records: list[dict], tokenizer, mask_prompt: bool = False) -> CacheDataset:
    """mlx-lm's dataset for records in an mlx-lm format (text, completions, chat)."""
    if not records:
        raise ValueError("the dataset has no records")
    config = types.SimpleNamespace(mask_prompt=mask_prompt)
    return CacheDataset(create_dataset(records, tokenizer, config))


def build_items(records: list[dict], tokenizer, mask_prompt: bool = False) -> list:
    """The trainer's items: (tokens, prompt offset) per example (mlx-lm's dataset), or for preference
    pairs (prompt/chosen/rejected records) a (chosen, rejected) pair of them."""
    if records and "chosen" in records[0]:
        return [preference_pair(r, tokenizer) for r in records]
    return tokenized(build_dataset(records, tokenizer, mask_prompt))


def preference_pair(record: dict, tokenizer) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
    """A pair's two sides through the chat template, as mlx-lm builds a completions example: the
    (optional system and) prompt, then the answer; each side's offset is where its answer starts —
    only answer tokens are scored, the prompt is shared. Without a prompt (the sides are whole
    conversations) the prompt is the messages both sides begin with."""

    def messages(side, role: str) -> list[dict]:
        return list(side) if isinstance(side, list) else [{"role": role, "content": side}]

    chosen, rejected = (
        messages(record["chosen"], "assistant"),
        messages(record["rejected"], "assistant"),
    )
    if record.get("prompt") is not None:
        prompt = messages(record["prompt"], "user")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if record.get("system") is not None:
        prompt = [{"role": "system", "content": record["system"]}] + prompt
    offset = (
        len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
        if prompt
        else 0
    )

    def side(answer: list[dict]) -> tuple[list[int], int]:
        return list(tokenizer.apply_chat_template(prompt + answer, return_dict=False)), offset

    return side(chosen), side(rejected)


def item_length(item) -> int:
    """An item's token count: an example's, or a pair's longer side."""
    if isinstance(item[1], int):
        return len(item[0])
    return max(len(item[0][0]), len(item[1][0]))


def collate(items: list, max_seq_length: int):
    """make_batch of examples; of pairs, the chosen sides' rows then the rejected sides' (one forward
    pass scores both: rows i and i + len(items) are pair i)."""
    if items and not isinstance(items[0][1], int):
        items = [c for c, _ in items] + [r for _, r in items]
    return make_batch(items, max_seq_length)


def token_lengths(model: str, records: list[dict], mask_prompt: bool = False) -> list[int]:
    """How many tokens each record is for the trainer: the model's own tokenizer and chat template,
    through the same dataset code (the model's weights are not loaded)."""
    from mlx_lm.utils import load_config, load_tokenizer

    path = Path(model)
    tokenizer = load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))
    return [item_length(x) for x in build_items(records, tokenizer, mask_prompt)]


def tokenized(dataset) -> list[tuple[list[int], int]]:
    """(tokens, prompt offset) for every record, processing each once."""
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        out.append((list(item[0]), int(item[1])) if len(item) == 2 else (list(item), 0))
    return out


def make_batch(items: list[tuple[list[int], int]], max_seq_length: int):
    """Pad and truncate exactly like mlx-lm: (batch int32 [B, T], lengths [B, 2])."""
    lengths = [len(t) for t, _ in items]
    width = 1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO)
    width = min(width, max_seq_length)
    arr = np.zeros((len(items), width), np.int32)
    rows = []
    for j, (tokens, offset) in enumerate(items):
        n = min(len(tokens), max_seq_length)
        arr[j, :n] = tokens[:n]
        rows.append((offset, n))
    return mx.array(arr), mx.array(rows)


class TrainBatches:
    """The batch for iteration n (0-based) is batch(n), for any n, in any order."""

    def __init__(self, items, batch_size: int, max_seq_length: int, seed: int):
        if len(items) < batch_size:
            raise RecordedConfigError(
                f"the training set has {len(items)} examples, fewer than "
                f"batch_size={batch_size}: lower batch_size or add data",
                "batch_size",
                max(1, len(items)),
            )
        self.items = items
        self.max_seq_length = max_seq_length
        self.seed = seed
        order = sorted(range(len(items)), key=lambda i: (item_length(items[i]), i))
        self.groups = [
            order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
        self.longest = max(map(item_length, items))

    @property
    def n_batches(self) -> int:
        return len(self.groups)

    def cursor(self, n: int) -> Cursor:
        epoch, position = divmod(n, self.n_batches)
        return Cursor(epoch=epoch, position=position)

    def order(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, epoch, self.n_batches)

    def indices(self, n: int) -> list[int]:
        c = self.cursor(n)
        return self.groups[int(self.order(c.epoch)[c.position])]

    def batch(self, n: int, rank: int = 0, size: int = 1):
        """The batch of iteration n; with ``size`` ranks, rank ``rank``'s shard of it (every size-th
        example from ``rank``: the shards of all ranks make up the whole batch, none twice)."""
        return collate([self.items[i] for i in self.indices(n)[rank::size]], self.max_seq_length)


@lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def validation_batches(items, batch_size: int, max_seq_length: int, num_batches: int):
    """Fixed validation batches: the first num_batches * batch_size records in file
    order (all of them when num_batches is -1), sorted by length, cut into batches."""
    count = len(items) // batch_size
    if num_batches != -1:
        count = min(count, num_batches)
    chosen = list(range(count * batch_size))
    chosen.sort(key=lambda i: (item_length(items[i]), i))
    return [
        collate([items[i] for i in chosen[k : k + batch_size]], max_seq_length)
        for k in range(0, len(chosen), batch_size)
    ]


def evaluation_batches(items, batch_size: int, max_seq_length: int):
    """Every record (a test set is scored whole), sorted by length, cut into batches of
    batch_size; the last batch may be smaller. No randomness."""
    order = sorted(range(len(items)), key=lambda i: (item_length(items[i]), i))
    return [
        collate([items[i] for i in order[k : k + batch_size]], max_seq_length)
        for k in range(0, len(order), batch_size)
    ]
