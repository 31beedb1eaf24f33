"""Retention: which committed checkpoints a job no longer needs (pure, no I/O; control/retention.py
records and deletes them)."""

from __future__ import annotations

from ftctl.events.types import CheckpointRecord

from .state import JobState


def to_prune(j: JobState) -> list[CheckpointRecord]:
    """Committed checkpoints the job's retention removes: all but the newest ``keep_last`` good ones
    and the best by validation loss. Corrupt ones go too once a newer good one exists."""
    if j.config is None:
        return []
    keep_last, keep_best = j.config.retention.keep_last, j.config.retention.keep_best
    good = j.good_checkpoints()
    keep = {c.path for c in good[-keep_last:]}
    if keep_best:
        scored = [c for c in good if c.val_loss is not None]
        if scored:
            keep.add(min(scored, key=lambda c: (c.val_loss, -c.step)).path)
    newest_good = good[-1].step if good else -1
    return [
        c
        for c in j.checkpoints
        if c.path not in keep and (c.path not in j.corrupt or c.step < newest_good)
    ]
