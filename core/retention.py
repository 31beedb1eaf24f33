"""Retention: which committed checkpoints a job keeps, which it no longer needs, and the disk they take
(pure, no I/O; control/retention.py records and deletes them)."""

from __future__ import annotations

from ftctl.events.types import CheckpointRecord

from .config import Config, keep_last
from .state import JobState


def best_checkpoint(checkpoints: list[CheckpointRecord]) -> CheckpointRecord | None:
    """The checkpoint with the lowest validation loss measured at its own step (the earliest of
    equals): what ``result: best`` publishes, and what ``keep_best`` keeps. A checkpoint whose
    val_loss is an earlier step's (a save between evaluations, a pause) is not a candidate; one from
    before ``val_step`` was recorded counts as its own."""
    scored = [c for c in checkpoints if c.val_loss is not None and c.val_step in (None, c.step)]
    return min(scored, key=lambda c: (c.val_loss, c.step)) if scored else None


def result_checkpoint(j: JobState) -> str | None:
    """The checkpoint the job publishes (``result``): once completed, the one it published; before,
    the one it would publish now — the best (``result: best``, when one was evaluated) or the newest
    good one."""
    if j.result_checkpoint is not None:
        return j.result_checkpoint
    good = j.good_checkpoints()
    best = best_checkpoint(good) if j.config and j.config.result == "best" else None
    return best.path if best else (good[-1].path if good else None)


def to_prune(j: JobState) -> list[CheckpointRecord]:
    """Committed checkpoints the job's retention removes: all but the newest ``keep_last`` good ones,
    the best by validation loss (keep_best) and the one the job publishes (``result``: never pruned).
    Corrupt ones go too once a newer good one exists."""
    if j.config is None:
        return []
    good = j.good_checkpoints()
    keep = {c.path for c in good[-keep_last(j.config) :]}
    if j.config.retention.keep_best and (best := best_checkpoint(good)):
        keep.add(best.path)
    keep.add(result_checkpoint(j))
    newest_good = good[-1].step if good else -1
    return [
        c
        for c in j.checkpoints
        if c.path not in keep and (c.path not in j.corrupt or c.step < newest_good)
    ]


# --------------------------------------------------------------------------- disk

# optimizer state per trained weight, in copies of it (mlx.optimizers: Adam/AdamW keep m and v, SGD and
# Muon a momentum, Adafactor its factored moments: at most one copy)
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1, "muon": 1, "adafactor": 1}


def checkpoint_bytes(cfg: Config, trained_bytes: int) -> int:
    """About how large one checkpoint is: the trained weights (the adapter, or a full fine-tune's
    layers) and the optimizer state over them."""
    return trained_bytes * (1 + OPTIMIZER_SLOTS[cfg.optimizer])


def disk_needed_gb(cfg: Config, checkpoint_gb: float, on_disk: int) -> tuple[float, str]:
    """Free space (GB) a job needs to run to its end, and how that was counted: the checkpoints of
    ``checkpoint_gb`` retention holds at its peak (keep_last, the best or the published one, the one
    being written) beyond the ``on_disk`` it has already, and the published copy of the trained
    weights; never less than min_free_disk_gb."""
    more = max(keep_last(cfg) + 2 - on_disk, 1)
    need = more * checkpoint_gb + checkpoint_gb / (1 + OPTIMIZER_SLOTS[cfg.optimizer])
    if need <= cfg.min_free_disk_gb:
        return cfg.min_free_disk_gb, "min_free_disk_gb"
    return need, (
        f"{more} more checkpoint(s) of about {checkpoint_gb:.2f} GB (retention keeps keep_last = "
        f"{keep_last(cfg)}, the best one and the one being written) and the published weights"
    )
