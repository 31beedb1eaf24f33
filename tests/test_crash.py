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
