"""The crash decision, pure: what a worker's death was, and what follows it.

The supervisor (control/supervise.py) gathers the evidence — exit status, the log's tail, what the
worker said, the OOM counter, what the watchdog saw — and ``decide`` turns it, with the job (its
config and its crash history), into the ``crashed`` event and the event that moves the job on, in
one piece, so that the two never contradict each other. No I/O: every rule is property-tested
(tests/test_crash.py).

What a category says about the step it happened at decides how repeats count:

* ``AT_STEP`` — a failure of the run at that step (a NaN, a Python exception, a crash in native code):
  a restart resumes from the same checkpoint, replays the same batches and may meet it again, so the
  same category at the same step three times within the restart window fails the job.
* everything else was done to the process, or to the machine under it (a SIGKILL from outside, the OOM
  killer, a hang, the daemon's own death, a full or failing disk): the step it happened at says
  nothing, and only the restart budget (``restart.max_restarts`` within ``restart.window_s``) counts.
* a crash before the attempt's first step (``loading``: imports, model load, resume) is at no step at
  all: it is never counted as a crash at the resume step.

Only crashes inside the window and after the last ``ftctl retry`` (``budget_from``) count; a failed job
is always told the way back: `ftctl retry JOB`.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass
from datetime import datetime, timezone

from ftctl.events import types as ev
from ftctl.events.types import TS_FORMAT, ts_epoch

from .config import RestartPolicy
from .reproduction import DETERMINISTIC
from .state import CrashRecord, JobState

SUGGESTIONS = {
    "oom": "the worker was killed for memory: lower batch_size or max_seq_length, enable grad_checkpoint, "
    "lower lora_parameters.rank or num_layers, or close other programs",
    "segfault": "the worker crashed in native code (SIGSEGV): check the mlx / mlx-lm versions and the model files; "
    "the job resumes from its last checkpoint",
    "exception": "the worker raised a Python exception: read the traceback tail in the evidence and logs/",
    "load_error": "the worker could not load the job (its model, data or config: the error says which), and a "
    "restart as it is would fail the same way. If the job's config is the cause, `ftctl retry JOB --set "
    "KEY=VALUE` changes it (editing ftctl.yaml does not: a job keeps the config recorded at its submit, so "
    "`ftctl resume JOB` would fail again); if its model or data files are, restore them, then `ftctl resume "
    "JOB`; or `ftctl cancel JOB` and submit again",
    "hang": "no training progress within timeouts.hang_s: look for a stuck evaluation or I/O; raise "
    "timeouts.hang_s if steps are legitimately slow",
    "disk_full": "the disk filled up (ENOSPC): free space, then `ftctl resume JOB`; the previous checkpoint is intact",
    "nan": "the loss became NaN: lower learning_rate, enable gradient clipping, check the data for broken examples",
    "inf": "the loss became infinite: lower learning_rate, enable gradient clipping, check the data",
    "import_error": "the worker could not import its dependencies: reinstall ftctl's environment "
    "(pip install -e .) and check `python -c 'import mlx_lm'`",
    "killed": "the worker was killed by a signal from outside ftctl; it resumes from its last checkpoint",
    "corrupt_checkpoint": "a checkpoint failed its hash check; ftctl resumes from the previous good one",
    "daemon_died": "the daemon supervising this job died; the job resumes from its last committed checkpoint",
    "io_error": "an I/O error (EIO) happened while writing: check the disk (dmesg, SMART); "
    "the previous checkpoint is intact",
    "metal_watchdog": "macOS's Metal GPU watchdog killed the worker "
    "(kIOGPUCommandBufferCallbackErrorImpactingInteractivity, "
    "mlx #3267): it fires when a long command buffer competes with a lit display. Let the display sleep "
    "during runs (`sudo pmset -a displaysleep 10`, or close the lid; ftctl's `caffeinate -s` keeps the Mac "
    "itself awake), or start the daemon with AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1; lower max_seq_length or "
    "batch_size to shorten each step, then `ftctl resume JOB`",
    "descriptor_leak": "Metal's resource (descriptor) count limit was exceeded ([metal::malloc] Resource limit ... "
    "exceeded, mlx-lm #1185): a leak that grows with the steps a worker has run, not an out-of-memory; "
    "it recurs after the same number of steps, so a restart only helps if a checkpoint lands before "
    "it: lower save_every (below the steps a worker lasts), update mlx and mlx-lm, then `ftctl resume JOB`",
}

# Suggestions that end by saying where the job resumes: `suggestion` names the step instead.
_RESUMING = {
    "segfault": "the worker crashed in native code (SIGSEGV): check the mlx / mlx-lm versions and the model files",
    "killed": "the worker was killed by a signal from outside ftctl",
    "daemon_died": "the daemon supervising this job died",
}


def resumes_from(step: int | None) -> str:
    """Where a restarted job picks up: ``step`` is its last good checkpoint, None if it has none."""
    if step is None:
        return "it restarts from step 0 (no checkpoint was committed yet)"
    return f"it resumes from step {step} (its last committed checkpoint)"


def suggestion(category: str, resume_step: int | None, fix: str = "") -> str:
    """SUGGESTIONS[category], saying exactly where the job resumes (``resume_step`` None: no
    good checkpoint, so it starts over) instead of "from its last checkpoint". ``fix``: the worker
    found the job's recorded config to be the cause, and the ``key=value`` that would run."""
    if fix:
        return (
            "the job's recorded config is the cause, and a job keeps the config recorded at its submit "
            "(editing ftctl.yaml does not change it; `ftctl resume JOB` would fail the same way): "
            f"`ftctl retry JOB --set {fix}` changes it and trains on — or `ftctl cancel JOB` and submit "
            f"again with --set {fix}"
        )
    if category in _RESUMING:
        return f"{_RESUMING[category]}; {resumes_from(resume_step)}"
    return SUGGESTIONS.get(category, "")


# A failure of the run at the step it happened at: the same one three times at one step will not go away.
AT_STEP = frozenset({"nan", "inf", "exception", "segfault"})
# Crashes that will happen again if retried as they are: the job fails (or pauses) at once.
NOT_RETRYABLE = frozenset({"nan", "inf", "import_error"})
# Crashes that are not the job's fault and do not use up its restart budget.
NOT_COUNTED = frozenset({"daemon_died"})
# Crashes that wait for the user to fix the machine rather than failing the job.
PAUSE_ON = frozenset({"disk_full", "load_error"})
# Crashes that are retried only when the restart made progress: a restart resumes from the last
# checkpoint, and if none was committed since the previous crash of the kind, it would only meet
# the same wall at the same step again. Then the job pauses with the fix instead.
ONLY_WITH_PROGRESS = frozenset({"metal_watchdog", "descriptor_leak"})
SAME_STEP_LIMIT = 3

_MLX_OOM = (
    "Insufficient Memory",
    "Unable to allocate",
    "[malloc]",
    "out of memory",
    "MemoryError",
    "kIOGPUCommandBufferCallbackErrorOutOfMemory",
)
# Apple GPU crash signatures (docs/operations.md): the Metal watchdog (mlx #3267) and the resource-count
# limit (mlx-lm #1185) are neither OOM nor a plain abort, and each has its own fix.
_METAL_WATCHDOG = (
    "kIOGPUCommandBufferCallbackErrorImpactingInteractivity",
    "Impacting Interactivity",
    "kIOGPUCommandBufferCallbackErrorTimeout",
    "GPU Timeout Error",
)
_DESCRIPTOR_LEAK = re.compile(r"Resource limit \(\d+\) exceeded")


@dataclass(frozen=True)
class Evidence:
    """What the supervisor saw of one death (every field optional: a repair knows less than a watch)."""

    exit_code: int | None = None  # the worker's exit status (negative: killed by that signal); None
    # for a rank of a group (its status is mlx.launch's) or a worker nobody waited on
    stderr_tail: str = ""  # the end of this attempt's log
    reported: str | None = None  # the category the worker itself reported before exiting
    message: str = ""  # what it said with it (its error)
    oom_kills: int | None = None  # cgroup OOM-kill counter delta during the run; None = unreadable
    hung: bool = False  # the daemon killed it: no progress, or not stopping when asked
    # a rank whose connection closed without a word (no exit status of its own)
    vanished: bool = False
    step: int | None = None  # the last step seen (before the first one: where it resumed)
    loading: bool = False  # it died before this attempt's first step (imports, model load, resume)
    what: str = ""  # the supervisor's account: which rank, what the watchdog saw, …
    rank: int | None = None  # a data-parallel job: the rank that failed first, and its host
    host: str | None = None
    steps_seen: str = ""  # a data-parallel job: every rank's last step
    stop_reason: str | None = None  # the stop the supervisor had asked for: pause, cancel, shutdown
    log_path: str = ""
    # the worker found the job's recorded config to be the cause: the `key=value` that would run
    fix: str = ""


def classify(e: Evidence) -> str:
    if e.hung:
        return "hang"
    tail = e.stderr_tail
    if e.reported in (
        None,
        "exception",
    ):  # a Metal error may surface as a Python exception or an abort
        if any(m in tail for m in _METAL_WATCHDOG):
            return "metal_watchdog"
        if _DESCRIPTOR_LEAK.search(tail):
            return "descriptor_leak"
        # MLX's allocation errors are Python exceptions too
        if e.reported and any(m in tail for m in _MLX_OOM):
            return "oom"
    if e.reported:
        return e.reported
    if e.vanished:  # no exit status to read: the OOM counter is all there is
        return "oom" if (e.oom_kills or 0) > 0 else "killed"
    sig = -e.exit_code if e.exit_code is not None and e.exit_code < 0 else None
    if (e.oom_kills or 0) > 0 or any(m in tail for m in _MLX_OOM):
        return "oom"
    if sig == _signal.SIGSEGV or sig == _signal.SIGBUS or "Segmentation fault" in tail:
        return "segfault"
    if "No space left on device" in tail or "[Errno 28]" in tail:
        return "disk_full"
    if "ModuleNotFoundError" in tail or "ImportError" in tail:
        return "import_error"
    if sig == _signal.SIGKILL:
        # With a readable cgroup counter that did not move, it was someone's `kill -9`. Without
        # one we cannot tell; on a training box a SIGKILL is most often the OOM killer.
        return "oom" if e.oom_kills is None else "killed"
    if sig is not None:
        return "killed"
    if "Traceback" in tail:
        return "exception"
    return "exception"


@dataclass(frozen=True)
class Decision:
    action: str  # "requeue" | "fail" | "pause"
    reason: str
    delay_s: float = 0.0


def where(c: CrashRecord | Evidence) -> str:
    """Where a crash happened: "at step N", or "while loading" for one before its attempt's first step."""
    if c.loading:
        return "while loading" + ("" if c.step is None else f" (resuming from step {c.step})")
    return f"at step {c.step}"


def counted(crashes: list[CrashRecord], now: float, window_s: float) -> list[CrashRecord]:
    """The crashes that use the restart budget: those inside the window, the daemon's death excepted."""
    return [
        c for c in crashes if c.category not in NOT_COUNTED and now - ts_epoch(c.ts) <= window_s
    ]


def _retry(resume_step: int) -> str:
    return f"`ftctl retry JOB` continues it from step {resume_step} with a fresh restart budget"


def after_crash(
    crashes: list[CrashRecord],
    now: float,
    *,
    resume_step: int,
    policy: RestartPolicy,
    detail: str = "",
    reproduction: ev.CrashReproduced | None = None,
    fix: str = "",
) -> Decision:
    """Decide what follows the latest of a job's crashes (the last of ``crashes``, which are those since
    its last `ftctl retry`). ``detail`` is what the worker said (its exception's first line), shown in
    the reason of a pause or a failure; ``resume_step`` is where a restart would resume; ``fix``: the
    ``key=value`` of the recorded config that would run, when the worker found it the cause.

    ``reproduction``: the daemon's replay of this crash (a DETERMINISTIC category only). A crash that
    reproduces is not retried blindly: the job pauses with the verdict and the failing batch in the
    reason. One that does not reproduce came from the environment: it is restarted like a kill, even a
    NaN (which without a replay fails at once)."""
    max_restarts, window_s = policy.max_restarts, policy.window_s
    last: CrashRecord = crashes[-1]
    said = f" ({detail})" if detail else ""
    verdict = (
        reproduction.verdict
        if reproduction is not None and last.category in DETERMINISTIC
        else None
    )
    if last.category in PAUSE_ON:
        return Decision("pause", f"{last.category}{said}: {suggestion(last.category, None, fix)}")
    if verdict == "reproduced":
        return Decision(
            "pause",
            f"{reproduction.summary}. Not retried: a restart replays the same steps and fails the same "
            f"way ({SUGGESTIONS[last.category]}). `ftctl resume JOB` retries it as it is, "
            "`ftctl cancel JOB` gives it up",
        )
    if last.category in NOT_RETRYABLE and verdict != "not reproduced":
        return Decision(
            "fail",
            f"{last.category} {where(last)}{said}: not retried ({SUGGESTIONS[last.category]}); "
            f"once fixed, {_retry(resume_step)}",
        )
    if last.category in NOT_COUNTED:
        return Decision("requeue", f"{last.category}: it resumes from step {resume_step}")
    if last.category in ONLY_WITH_PROGRESS:
        before = [
            c for c in crashes[:-1] if c.category == last.category and c.category not in NOT_COUNTED
        ]
        if before and before[-1].resume_step is not None and resume_step <= before[-1].resume_step:
            return Decision(
                "pause",
                f"{last.category} again {where(last)}{said} with no checkpoint committed since "
                f"the previous one (it would resume from step {resume_step} again): not retried "
                f"blindly. {SUGGESTIONS[last.category]}",
            )
    recent = counted(crashes, now, window_s)
    if last.category in AT_STEP and not last.loading:
        same = [
            c
            for c in recent
            if c.category == last.category and c.step == last.step and not c.loading
        ]
        if len(same) >= SAME_STEP_LIMIT:
            return Decision(
                "fail",
                f"{last.category} {len(same)} times at step {last.step} within {window_s:g} s{said}: "
                "a failure of the run at that step, which a restart from the same checkpoint meets "
                f"again ({SUGGESTIONS[last.category]}); once fixed, {_retry(resume_step)}",
            )
    if len(recent) > max_restarts:
        return Decision(
            "fail",
            f"{len(recent)} crashes within {window_s:g} s (restart.max_restarts = {max_restarts}); "
            f"last: {last.category} {where(last)}{said}. {_retry(resume_step)}",
        )
    # The first restart within the window is at once (a warm standby worker takes the job within a
    # second); backoff applies from the second: backoff_s, then doubled, capped at backoff_max_s.
    delay = (
        0.0
        if len(recent) <= 1
        else min(policy.backoff_s * (2 ** (len(recent) - 2)), policy.backoff_max_s)
    )
    when = "at once" if delay == 0 else f"in {delay:g} s"
    return Decision(
        "requeue", f"restart {len(recent)}/{max_restarts} after {last.category}, {when}", delay
    )


def follow_up(
    job: str, decision: Decision, requested: str | None, category: str, now: float
) -> ev.EventBase:
    """The event that moves a crashed job on. A user's pending pause or cancel wins. ``JOB`` in a
    reason (the suggestions say `ftctl resume JOB`) becomes the job's id."""
    decision = Decision(decision.action, decision.reason.replace("JOB", job), decision.delay_s)
    if requested == "cancel":
        return ev.Cancelled(job=job, reason=f"cancelled by user (after a {category} crash)")
    if requested == "pause":
        return ev.Paused(job=job, reason=f"paused by user (after a {category} crash)")
    if decision.action == "requeue":
        return ev.Requeued(job=job, reason=decision.reason, not_before=now + decision.delay_s)
    if decision.action == "pause":
        return ev.Paused(job=job, reason=decision.reason)
    return ev.Failed(job=job, reason=decision.reason, category=category)


@dataclass(frozen=True)
class Decided:
    """A crash and what follows it: committed together, in one transaction."""

    crashed: ev.Crashed
    follow: ev.EventBase
    category: str


def decide(
    e: Evidence, j: JobState, now: float, reproduction: ev.CrashReproduced | None = None
) -> Decided:
    """The ``crashed`` event for the death ``e`` of job ``j``'s attempt, and the event that follows it
    (requeued, paused, failed, or the user's pending pause or cancel), by ``j``'s restart policy and
    crash history. The suggestion in the crash says what really follows: where a requeued job resumes,
    `ftctl retry` for a failed one."""
    category = classify(e)
    detail = detail_of(e.message)
    sig = -e.exit_code if e.exit_code is not None and e.exit_code < 0 else None
    record = CrashRecord(
        ts=datetime.fromtimestamp(now, timezone.utc).strftime(TS_FORMAT),
        category=category,
        step=e.step,
        exit_code=e.exit_code,
        signal=sig,
        resume_step=j.step,
        rank=e.rank,
        host=e.host,
        loading=e.loading,
    )
    dec = after_crash(
        j.crashes[j.budget_from :] + [record],
        now,
        resume_step=j.step,
        policy=j.config.restart,
        detail=detail,
        reproduction=reproduction,
        fix=e.fix,
    )
    requested = j.requested or ("pause" if e.stop_reason == "pause" else None)
    follow = follow_up(j.job, dec, requested, category, now)
    good = j.good_checkpoints()
    crashed = ev.Crashed(
        job=j.job,
        category=category,
        step=e.step,
        exit_code=e.exit_code,
        signal=sig,
        evidence=evidence_text(e),
        suggestion=_advice(category, good[-1].step if good else None, follow, detail, j.job, e.fix),
        message=detail,
        rank=e.rank,
        host=e.host,
        loading=e.loading,
        fix=e.fix,
    )
    return Decided(crashed, follow, category)


def _advice(
    category: str, resume: int | None, follow: ev.EventBase, detail: str, job: str, fix: str = ""
) -> str:
    """The crash's suggested fix, true to what follows it: a requeued job is told where it resumes, a
    failed one how to continue it (`ftctl retry`), a paused one keeps the fix (`ftctl resume`); when
    the job's recorded config is the cause (``fix``), `ftctl retry JOB --set` with it."""
    if fix:
        text = suggestion(category, resume, fix)
    elif isinstance(follow, ev.Requeued):
        text = suggestion(category, resume)
    else:
        text = _RESUMING.get(category) or SUGGESTIONS.get(category, "")
        if isinstance(follow, ev.Failed):
            text += ("; " if text else "") + "the job failed: " + _retry(resume or 0)
    if detail and category in ("exception", "load_error"):
        text = f"{detail} — {text}"
    return text.replace("JOB", job)


def detail_of(message: str, limit: int = 200) -> str:
    """What a worker said, as a crash's ``message``: its first line, at most ``limit`` characters."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def evidence_text(e: Evidence) -> str:
    """The ``evidence`` of a crash: the supervisor's account, the exit status, what the worker said, the
    steps it reached, its log, then the log's tail (from its last traceback)."""
    parts = [e.what] if e.what else []
    if e.exit_code is not None:
        parts.append(f"exit code {e.exit_code}{_signal_name(e.exit_code)}")
    if e.message:
        parts.append(f"{'worker' if e.rank is None else 'rank'} said: {e.message}")
    # a watched attempt (recovery's account of a dead daemon's job has no more to say)
    if e.log_path:
        if e.steps_seen:
            parts.append(f"last steps seen: {e.steps_seen}")
        elif e.loading:
            parts.append(f"died before its first step ({where(e)})")
        else:
            parts.append(f"last step seen {e.step}")
        parts.append(f"log {e.log_path}")
        return "; ".join(parts) + "\n" + _evidence_tail(e.stderr_tail)
    return "; ".join(parts)


def _signal_name(code: int) -> str:
    if code >= 0:
        return ""
    try:
        return f" (signal {_signal.Signals(-code).name})"
    except ValueError:
        return f" (signal {-code})"


def _evidence_tail(tail: str, limit: int = 3000) -> str:
    """The end of the worker's log for this attempt, from its last traceback if it has one."""
    at = tail.rfind("Traceback (most recent call last)")
    if at >= 0 and len(tail) - at <= limit:
        return tail[at:]
    return tail[-limit:]
