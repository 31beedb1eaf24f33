"""core.policy (pure, no I/O): the Apple GPU crash signatures — the Metal watchdog and the
descriptor-count leak get their own category and fix, and are retried only when the restart made
progress —; retention and the checkpoint a job publishes; early stopping; the disk a job needs."""

from __future__ import annotations

import signal
import time

from hypothesis import given
from hypothesis import strategies as st

from ftctl.core.config import RestartPolicy
from ftctl.core.policy import SUGGESTIONS, Evidence, after_crash, classify, follow_up
from ftctl.core.state import CrashRecord, JobState
from ftctl.events import types as ev
from ftctl.events.journal import utc_now

WATCHDOG = (
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] Command buffer "
    "execution failed: Impacting Interactivity (0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)"
)
LEAK = "RuntimeError: [metal::malloc] Resource limit (499000) exceeded."
GPU_OOM = (
    "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
)
noise = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(
    noise,
    noise,
    st.sampled_from([-signal.SIGABRT, 1, -signal.SIGKILL, None]),
    st.sampled_from([None, "exception"]),
)
def test_signatures_are_found_anywhere_in_the_evidence_whatever_the_exit(
    before, after, code, reported
):
    assert (
        classify(Evidence(exit_code=code, stderr_tail=before + WATCHDOG + after, reported=reported))
        == "metal_watchdog"
    )
    assert (
        classify(Evidence(exit_code=code, stderr_tail=before + LEAK + after, reported=reported))
        == "descriptor_leak"
    )
    # an out-of-memory of the GPU stays an OOM (mlx-lm #236), not a leak
    if (
        "Resource limit" not in before + after
        and "Interactivity" not in before + after
        and "GPU Timeout" not in before + after
    ):
        assert (
            classify(
                Evidence(exit_code=code, stderr_tail=before + GPU_OOM + after, reported=reported)
            )
            == "oom"
        )


def test_a_precise_report_of_the_worker_and_the_hang_watchdog_still_win():
    assert classify(Evidence(exit_code=3, stderr_tail=LEAK, reported="nan")) == "nan"
    assert classify(Evidence(exit_code=-9, stderr_tail=WATCHDOG, hung=True)) == "hang"
    assert (
        classify(Evidence(exit_code=-signal.SIGABRT, stderr_tail="libc++abi: terminating"))
        == "killed"
    )


def _crash(category: str, step: int, resume: int) -> CrashRecord:
    return CrashRecord(
        ts=utc_now(), category=category, step=step, exit_code=-6, signal=6, resume_step=resume
    )


POLICY = RestartPolicy(max_restarts=10, window_s=300.0, backoff_s=0.0, backoff_max_s=0.0)


@given(
    st.sampled_from(["metal_watchdog", "descriptor_leak"]),
    st.integers(0, 10_000),
    st.integers(1, 500),
    st.integers(0, 500),
)
def test_retried_only_when_a_checkpoint_landed_since_the_previous_crash_of_the_kind(
    category, r0, leak_after, gained
):
    first = _crash(category, r0 + leak_after, r0)
    d = after_crash([first], time.time(), resume_step=r0, policy=POLICY)
    assert d.action == "requeue", d  # the first one: a fresh worker may well get further
    second = _crash(category, r0 + gained + leak_after, r0 + gained)
    d = after_crash([first, second], time.time(), resume_step=r0 + gained, policy=POLICY)
    if gained > 0:
        assert d.action == "requeue", d
    else:  # the same wall at the same step: pause, with the specific fix, naming the job
        assert d.action == "pause" and "not retried blindly" in d.reason, d
        e = follow_up("0007", d, None, category, time.time())
        assert (
            isinstance(e, ev.Paused)
            and "ftctl resume 0007" in e.reason
            and SUGGESTIONS[category][:40] in e.reason
        )


def test_other_crashes_in_between_do_not_hide_the_previous_one_of_the_kind():
    crashes = [
        _crash("descriptor_leak", 120, 100),
        _crash("killed", 105, 100),
        _crash("descriptor_leak", 121, 100),
    ]
    assert after_crash(crashes, time.time(), resume_step=100, policy=POLICY).action == "pause"


# --------------------------------------------------------------------------- retention and the result


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
    from ftctl.core.policy import best_checkpoint, result_checkpoint, to_prune

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
    from ftctl.core.policy import to_prune

    cps = [_ck(s, 1.0 / s, s) for s in (10, 20, 30, 40)]
    j = _job(cps, retention={"keep_last": 1, "keep_best": False}, result="last")
    j.result_checkpoint = "c/20"  # what it published (and what a warm start of the lineage reads)
    assert [c.step for c in to_prune(j)] == [10, 30]


def test_keep_last_defaults_by_fine_tune_type_and_full_checkpoints_are_sized():
    from ftctl.core.config import decode_config, keep_last
    from ftctl.core.policy import checkpoint_bytes, disk_needed_gb

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


# --------------------------------------------------------------------------- early stopping


def _keras(losses, patience, min_delta):
    """Early stopping as Keras' EarlyStopping(mode=min) does it: the index it stops at, or None."""
    ref, wait = None, 0
    for i, v in enumerate(losses):
        if v is not None and (ref is None or v < ref - min_delta):
            ref, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return i
    return None


@given(
    st.lists(st.floats(0, 5) | st.none(), min_size=1, max_size=30),
    st.integers(1, 5),
    st.sampled_from([0.0, 0.01, 0.5]),
)
def test_early_stopping_stops_where_keras_would_and_keeps_the_best(losses, patience, min_delta):
    from ftctl.core.config import EarlyStopping
    from ftctl.core.policy import ValWatch, watch

    rule, w, stop = EarlyStopping(patience=patience, min_delta=min_delta), ValWatch(), None
    for i, v in enumerate(losses):
        w, best, reason = watch(w, 10 * (i + 1), v, rule)
        finite = [x for x in losses[: i + 1] if x is not None]
        assert best == (v is not None and v == min(finite) and v not in losses[:i])
        if reason:
            stop = i
            assert reason.startswith(f"early stopping at step {10 * (i + 1)}: ")
            break
    assert stop == _keras(losses, patience, min_delta)
    seen = [x for x in losses[: (stop if stop is not None else len(losses)) + 1] if x is not None]
    assert w.best_val_loss == (min(seen) if seen else None)
