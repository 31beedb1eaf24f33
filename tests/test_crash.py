"""core.crash's Apple GPU crash signatures: the Metal watchdog and the descriptor-count leak get
their own category and fix, and are retried only when the restart made progress (pure, no I/O)."""

from __future__ import annotations

import signal
import time

from hypothesis import given
from hypothesis import strategies as st

from ftctl.core.config import RestartPolicy
from ftctl.core.crash import SUGGESTIONS, Evidence, after_crash, classify, follow_up
from ftctl.core.state import CrashRecord
from ftctl.events import types as ev
from ftctl.events.journal import utc_now
from ftctl.events.types import ts_epoch

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


# --------------------------------------------------------------------------- the decision, as a whole

from datetime import datetime, timezone  # noqa: E402

from ftctl.core.config import Config, RestartPolicy  # noqa: E402
from ftctl.core.crash import AT_STEP, NOT_RETRYABLE, PAUSE_ON, decide  # noqa: E402
from ftctl.core.state import JobState  # noqa: E402
from ftctl.events.types import TS_FORMAT  # noqa: E402

NOW = 1_900_000_000.0
DONE_TO_IT = ["killed", "oom", "hang", "daemon_died", "io_error", "corrupt_checkpoint"]
ALL = sorted(
    {*DONE_TO_IT, *AT_STEP, *NOT_RETRYABLE, *PAUSE_ON, "metal_watchdog", "descriptor_leak"}
)


def _job(crashes, *, max_restarts=3, window_s=300.0, step=5, requested=None, budget_from=0):
    cfg = Config(
        model="m",
        restart=RestartPolicy(max_restarts=max_restarts, window_s=window_s, backoff_s=0.0),
    )
    return JobState(
        job="0007",
        state="training",
        config=cfg,
        crashes=crashes,
        step=step,
        requested=requested,
        budget_from=budget_from,
    )


def _record(category, step, age_s, loading=False):
    ts = datetime.fromtimestamp(NOW - age_s, timezone.utc).strftime(TS_FORMAT)
    return CrashRecord(ts=ts, category=category, step=step, resume_step=5, loading=loading)


def _evidence(category, step, loading=False):
    """What the supervisor would have seen of a death of that category."""
    if category == "killed":
        return Evidence(exit_code=-9, oom_kills=0, step=step, loading=loading, log_path="l")
    if category == "hang":
        return Evidence(exit_code=-9, hung=True, step=step, loading=loading, log_path="l")
    return Evidence(
        exit_code=1, reported=category, message="boom", step=step, loading=loading, log_path="l"
    )


def _not_reproduced(category: str, step: int) -> ev.CrashReproduced:
    return ev.CrashReproduced(
        job="0007",
        crash=3,
        crash_category=category,
        crash_step=step,
        verdict="not reproduced",
        summary="ran cleanly past it",
        from_step=5,
        target_step=step + 1,
    )


history = st.lists(
    # (category, step, age in s, loading)
    st.tuples(st.sampled_from(ALL), st.integers(0, 3), st.floats(0, 1000), st.booleans()),
    max_size=8,
)


@given(history, st.sampled_from(ALL), st.integers(0, 3), st.booleans(), st.integers(0, 6))
def test_the_crash_and_what_follows_it_never_contradict_each_other(
    past, category, step, loading, max_restarts
):
    j = _job([_record(*h) for h in past], max_restarts=max_restarts)
    d = decide(_evidence(category, step, loading), j, NOW)
    assert d.category == category == d.crashed.category and d.crashed.loading == loading
    said = d.crashed.suggestion + " " + getattr(d.follow, "reason", "")
    if isinstance(d.follow, ev.Requeued):
        assert "will not go away" not in said and "not retried" not in said
        assert "the job failed" not in said and "ftctl retry" not in said
    elif isinstance(d.follow, ev.Failed):
        assert "ftctl retry 0007" in d.follow.reason and "ftctl retry 0007" in d.crashed.suggestion
        assert "it resumes from" not in said and "restarts from" not in said, said
    else:
        assert isinstance(d.follow, ev.Paused) and "it resumes from" not in said
    assert "JOB" not in said  # the job's id, never the placeholder


@given(st.sampled_from(DONE_TO_IT[:4]), st.integers(0, 40), st.integers(3, 1000), st.booleans())
def test_what_is_done_to_a_process_is_never_failed_at_a_step_while_the_budget_has_room(
    category, step, max_restarts, loading
):
    """Three (or more) kills, OOM kills, hangs or daemon deaths at one step — the issue's three SIGKILLs
    while loading included — are restarted as long as restart.max_restarts allows."""
    past = [_record(category, step, 10 * i, loading) for i in range(1, min(max_restarts, 6))]
    d = decide(_evidence(category, step, loading), _job(past, max_restarts=max_restarts), NOW)
    assert isinstance(d.follow, ev.Requeued), d.follow


@given(st.sampled_from(sorted(AT_STEP)), st.integers(0, 40), st.integers(0, 100))
def test_a_failure_of_the_run_at_one_step_three_times_in_the_window_fails_the_job(
    category, step, max_restarts
):
    """Even when each NaN was replayed and not reproduced: the third at the same step fails the job,
    and the reason says how to continue it."""
    past = [_record(category, step, 10), _record(category, step, 20)]
    not_reproduced = _not_reproduced(category, step)
    d = decide(
        _evidence(category, step), _job(past, max_restarts=max_restarts), NOW, not_reproduced
    )
    assert isinstance(d.follow, ev.Failed), d.follow
    if max_restarts >= 3:
        assert f"3 times at step {step}" in d.follow.reason, d.follow.reason
    assert "`ftctl retry 0007` continues it from step 5" in d.follow.reason


@given(
    st.sampled_from(sorted(AT_STEP)),
    st.integers(0, 40),
    st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_crashes_before_the_first_step_or_outside_the_window_are_not_at_that_step(
    category, step, loading
):
    """The same-step rule counts only crashes at that step (not while loading) within the window."""
    past = [_record(category, step, 10, loading[0]), _record(category, step, 400, False)]
    not_reproduced = _not_reproduced(category, step)
    d = decide(
        _evidence(category, step, loading[1]), _job(past, max_restarts=9), NOW, not_reproduced
    )
    assert isinstance(d.follow, ev.Requeued), d.follow  # at most two in the window at that step


@given(history, st.sampled_from(ALL), st.integers(0, 3), st.integers(0, 6), st.floats(1, 1000))
def test_the_budget_counts_the_window_since_the_last_retry_and_not_the_daemons_deaths(
    past, category, step, max_restarts, window
):
    records = [_record(*h) for h in past]
    budget_from = len(records) // 2  # `ftctl retry` after the first half
    j = _job(records, max_restarts=max_restarts, window_s=window, budget_from=budget_from)
    d = decide(_evidence(category, step), j, NOW)
    counted = [
        c
        for c in records[budget_from:]
        if c.category != "daemon_died" and NOW - ts_epoch(c.ts) <= window
    ] + ([] if category == "daemon_died" else [None])
    if isinstance(d.follow, ev.Requeued) and category != "daemon_died":
        assert len(counted) <= max_restarts
        assert f"restart {len(counted)}/{max_restarts}" in d.follow.reason
    if category not in NOT_RETRYABLE | PAUSE_ON | {"daemon_died"} and len(counted) > max_restarts:
        assert not isinstance(d.follow, ev.Requeued)


@given(history, st.sampled_from(ALL), st.sampled_from(["pause", "cancel"]))
def test_a_pending_pause_or_cancel_wins(past, category, requested):
    d = decide(_evidence(category, 3), _job([_record(*h) for h in past], requested=requested), NOW)
    assert isinstance(d.follow, ev.Paused if requested == "pause" else ev.Cancelled)
    assert f"by user (after a {category} crash)" in d.follow.reason
