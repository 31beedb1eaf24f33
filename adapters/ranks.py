"""One rank of a data-parallel job, inside the trainer: MLX's own engine (mx.distributed), no other.

The job's global batch at iteration n is TrainBatches.indices(n) (a pure function of (seed, n));
rank r of W takes every W-th example of it, starting at r (mlx-lm's sharding), so the W shards are
complementary and their union is the single-process batch (a preference batch's items are pairs: a
pair's chosen and rejected rows are on the same rank). Gradients are weighted by each rank's share of
what the loss is a mean over — the batch's scored tokens for SFT, its pairs for DPO and ORPO — then
averaged with nn.average_gradients: the update is the gradient of the loss over the whole global
batch, as one process would compute it (up to float summation order). DPO's reference log-probs are
computed by each rank for its own pairs, as one process computes them for all. The dropout RNG of
rank r at global step g is a pure function of (seed, g, r).

Only the leader (rank 0) writes checkpoints and the adapter; every rank meets the others at a
barrier (an all_sum of a scalar) at each checkpoint and at the end, so no rank runs ahead of a
save or exits before the last one is written. A stop request is agreed on by all ranks at each
step (the flags are summed in the step's all-reduce), so every rank stops at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .protocol import TrainPlan


@dataclass(frozen=True)
class Ranks:
    group: object | None  # mx.distributed.Group; None for one process
    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def shard(self, indices: list[int]) -> list[int]:
        return indices[self.rank :: self.size]

    def barrier(self) -> None:
        if self.many:
            mx.eval(mx.distributed.all_sum(mx.array(1), group=self.group))

    def reduce_step(self, lvalue, toks, grad, stop, weight=None, means=None):
        """(global mean loss, global scored tokens, the gradient of the global batch's loss, the number of
        ranks asked to stop, the global ``means``), in one all-reduce. ``weight``: what the rank's loss
        is a mean over — its scored tokens (SFT's per-token loss, the default) or its pairs (a preference
        loss, a mean per pair); each rank's gradient, loss and ``means`` (per-pair figures: preference
        training's rewards, margin, accuracy) are weighted by its share of the global weight.
        nn.average_gradients concatenates the weighted gradients and the scalars into one buffer when
        they share a dtype (float32, LoRA's)."""
        t = toks.astype(mx.float32)
        w = t if weight is None else weight.astype(mx.float32)
        parts = [mx.stack([w, lvalue.astype(mx.float32) * w, stop.astype(mx.float32), t])]
        if means is not None:
            parts.append(means.astype(mx.float32) * w)
        scalars = mx.concatenate(parts)
        if all(g.dtype == mx.float32 for _, g in tree_flatten(grad)):
            out = nn.average_gradients(
                {"g": tree_map(lambda g: g * w, grad), "s": scalars}, group=self.group
            )
            sums = out["s"] * self.size
            grad = tree_map(lambda g: g * (self.size / sums[0]), out["g"])
        else:  # another dtype: the scalars in float32 on their own, so token counts stay exact
            sums = mx.distributed.all_sum(scalars, group=self.group)
            share = (self.size * w) / sums[0]
            grad = nn.average_gradients(
                tree_map(lambda g: g * share.astype(g.dtype), grad), group=self.group
            )
        means = None if means is None else sums[4:] / sums[0]
        return sums[1] / sums[0], sums[3].astype(toks.dtype), grad, sums[2], means

    def sum(self, x):
        return mx.distributed.all_sum(x, group=self.group) if self.many else x


SINGLE = Ranks(group=None)


def join(plan: TrainPlan) -> Ranks:
    """Join the job's group (blocks until every rank is up); one process: SINGLE."""
    if plan.world_size <= 1:
        return SINGLE
    group = mx.distributed.init(strict=True, backend=plan.backend)
    if group.size() != plan.world_size:
        raise ValueError(
            f"mx.distributed started {group.size()} ranks, but the job was planned for "
            f"{plan.world_size}: the launcher and the plan disagree"
        )
    return Ranks(group=group, rank=group.rank(), size=group.size())
