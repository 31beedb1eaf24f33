"""core.retention (pure, no I/O): which checkpoints a job keeps — never the one it publishes
(``result``), the best by validation loss measured at its own step (``keep_best``), the newest
``keep_last`` — and the disk a job needs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ftctl.core.state import JobState
from ftctl.events import types as ev


def _job(checkpoints, **cfg) -> JobState:
    from ftctl.core.config import decode_config

    return JobState(
        job="a", config=decode_config({"model": "m", **cfg})[0], checkpoints=checkpoints
    )


def _ck(step: int, val: float | None, val_step: int | None) -> ev.CheckpointRecord:
    return ev.CheckpointRecord(
        step=step, global_step=step, path=f"c/{step}", manifest_sha256="x", bytes=1,
        val_loss=val, val_step=val_step,
    )  # fmt: skip


@st.composite
def checkpoint_runs(draw):
    """Committed checkpoints of one job, oldest first: each with the latest validation loss at or
    before its step, measured at its own step or an earlier one (a save between evaluations)."""
    steps = sorted(draw(st.sets(st.integers(1, 60), min_size=1, max_size=8)))
    out, val, at = [], None, None
    for s in steps:
        if draw(st.booleans()):  # evaluated at this very step
            val, at = draw(st.floats(0, 5) | st.none()), s
        out.append(_ck(s, val, at if val is not None else None))
    return out


@given(
    checkpoint_runs(),
    st.sampled_from([None, 1, 2, 3]),
    st.booleans(),
    st.sampled_from(["best", "last"]),
    st.sampled_from(["lora", "full"]),
)
def test_retention_never_prunes_the_checkpoint_the_job_publishes(cps, keep, keep_best, result, ftt):
    from ftctl.core.config import keep_last
    from ftctl.core.retention import best_checkpoint, result_checkpoint, to_prune

    j = _job(
        cps,
        retention={"keep_last": keep, "keep_best": keep_best},
        result=result,
        fine_tune_type=ftt,
    )
    pruned = {c.path for c in to_prune(j)}
    kept = [c for c in cps if c.path not in pruned]
    published = result_checkpoint(j)
    assert published in {c.path for c in kept}
    assert all(c.path not in pruned for c in cps[-keep_last(j.config) :])
    best = best_checkpoint(cps)
    if result == "best" and best is not None:
        # the best is the lowest validation loss measured at a checkpoint's own step, the earliest of equals
        assert published == best.path
        own = [c for c in cps if c.val_loss is not None and c.val_step == c.step]
        assert best.val_loss == min(c.val_loss for c in own)
        assert best.step == min(c.step for c in own if c.val_loss == best.val_loss)
    else:
        assert published == cps[-1].path
    if keep_best and best is not None:
        assert best.path not in pruned
    assert len(kept) <= keep_last(j.config) + 2


def test_a_completed_jobs_published_checkpoint_is_kept_by_any_later_pruning():
    from ftctl.core.retention import to_prune

    cps = [_ck(s, 1.0 / s, s) for s in (10, 20, 30, 40)]
    j = _job(cps, retention={"keep_last": 1, "keep_best": False}, result="last")
    j.result_checkpoint = "c/20"  # what it published (and what a warm start of the lineage reads)
    assert [c.step for c in to_prune(j)] == [10, 30]


def test_keep_last_defaults_by_fine_tune_type_and_full_checkpoints_are_sized():
    from ftctl.core.config import decode_config, keep_last
    from ftctl.core.retention import checkpoint_bytes, disk_needed_gb

    lora, full = (decode_config({"model": "m", "fine_tune_type": t})[0] for t in ("lora", "full"))
    assert (keep_last(lora), keep_last(full)) == (3, 1)
    mine = {"model": "m", "fine_tune_type": "full", "retention": {"keep_last": 4}}
    assert keep_last(decode_config(mine)[0]) == 4
    assert checkpoint_bytes(full, 10**9) == 3 * 10**9  # the weights, Adam's m and v
    # a fresh full job of 3 GB checkpoints: keep_last 1 + the best + the one being written, and the
    # published weights (1 GB)
    need, why = disk_needed_gb(full, 3.0, on_disk=0)
    assert need == 3 * 3.0 + 1.0 and "keep_last = 1" in why
    assert disk_needed_gb(full, 3.0, on_disk=5)[0] == 3.0 + 1.0  # always room for one more
    assert disk_needed_gb(lora, 0.001, on_disk=0) == (1.0, "min_free_disk_gb")
