"""Pure decisions the daemon takes: what a crash was, whether to restart, what to prune.

No I/O: the daemon gathers the evidence (exit status, stderr tail, the worker's last message,
the cgroup OOM counter) and these functions decide, so every rule is unit-testable.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass

import msgspec

from ftctl.events import types as ev
from ftctl.events.types import CheckpointRecord, ts_epoch

from .config import Config, EarlyStopping, RestartPolicy, keep_last
from .reproduction import DETERMINISTIC
from .state import CrashRecord, JobState, LineageState

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


# Crashes that will happen again if retried as they are: the job fails (or pauses) at once.
NOT_RETRYABLE = {"nan", "inf", "import_error"}
# Crashes that are not the job's fault and do not use up its restart budget.
NOT_COUNTED = {"daemon_died"}
# Crashes that wait for the user to fix the machine rather than failing the job.
PAUSE_ON = {"disk_full", "load_error"}

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
# Crashes that are retried only when the restart made progress: a restart resumes from the last
# checkpoint, and if none was committed since the previous crash of the kind, it would only meet
# the same wall at the same step again. Then the job pauses with the fix instead.
ONLY_WITH_PROGRESS = {"metal_watchdog", "descriptor_leak"}


@dataclass(frozen=True)
class Evidence:
    exit_code: int | None  # Popen.returncode: negative = killed by that signal
    stderr_tail: str = ""
    reported: str | None = None  # the category the worker itself reported before exiting
    oom_kills: int | None = None  # cgroup OOM-kill counter delta during the run; None = unreadable
    hung: bool = False  # the daemon's watchdog killed it for lack of progress


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
        if e.reported and any(
            m in tail for m in _MLX_OOM
        ):  # MLX's allocation errors are Python exceptions too
            return "oom"
    if e.reported:
        return e.reported
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
    """Decide what follows the latest of a job's crashes (the last of ``crashes``). ``detail`` is
    what the worker said (its exception's first line), shown in the reason of a pause or a failure;
    ``fix``: the ``key=value`` of the recorded config that would run, when the worker found it the cause.

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
            f"{last.category} at step {last.step}{said}: not retried ({SUGGESTIONS[last.category]})",
        )
    if last.category in NOT_COUNTED:
        return Decision("requeue", f"{last.category}: resuming from step {resume_step}")
    counted = [c for c in crashes if c.category not in NOT_COUNTED]
    if last.category in ONLY_WITH_PROGRESS:
        before = [c for c in counted[:-1] if c.category == last.category]
        if before and before[-1].resume_step is not None and resume_step <= before[-1].resume_step:
            return Decision(
                "pause",
                f"{last.category} again at step {last.step}{said} with no checkpoint committed since "
                f"the previous one (it would resume from step {resume_step} again): not retried "
                f"blindly. {SUGGESTIONS[last.category]}",
            )
    same = [c for c in counted if c.category == last.category and c.step == last.step]
    if len(same) >= 3:
        return Decision(
            "fail",
            f"{last.category} three times at the same step {last.step}{said}: "
            f"it will not go away by retrying ({SUGGESTIONS.get(last.category, '')})",
        )
    recent = [c for c in counted if now - ts_epoch(c.ts) <= window_s]
    if len(recent) > max_restarts:
        return Decision(
            "fail",
            f"{len(recent)} crashes within {window_s:g} s (restart.max_restarts = {max_restarts}); "
            f"last: {last.category} at step {last.step}{said}",
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


def branch_reason(j: JobState, lin: LineageState) -> str:
    """Decided when job ``j`` completes: "" if it becomes its lineage's head, else why it is a branch.

    The head is what later jobs warm-start from and what consolidation fuses; replacing it silently
    would drop the training of the job that holds it. So a job takes the head only if it continued
    from it (its warm start, ``parent_job``, is the head), or if it started fresh with the head it
    knew: no head, or one that was already the head when it first started (a fresh restart by the
    user's choice, `--fresh`). A job that warm-started from an older head, or started fresh before
    the current head became the head (that job completed first, meanwhile), is a branch, recorded
    as such, until `ftctl lineage set-head` chooses."""
    head = lin.head_job
    if head is None or head == j.job:
        return ""
    set_head = f"`ftctl lineage set-head {j.job}` makes this one the head"
    if j.parent_job is not None:
        if j.parent_job == head:
            return ""
        return (
            f"a branch: it warm-started from job {j.parent_job}, but job {head} completed first and is the "
            f"lineage's head; {set_head}"
        )
    if lin.head_seq < j.started_seq:
        return ""
    return (
        f"a branch: it started fresh, and job {head} became the lineage's head while it trained (it "
        f"completed first); the head stays job {head}; {set_head}"
    )


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


# --------------------------------------------------------------------------- validation loss


class ValWatch(msgspec.Struct, frozen=True, kw_only=True):
    """What a job's validation losses have shown so far, carried in every checkpoint (state.json) so
    that a resumed job takes the same decisions: the best loss and its step (``result: best``), and
    early stopping's reference — the last loss that improved on the one before it by min_delta — with
    the evaluations since it."""

    best_val_loss: float | None = None
    best_step: int | None = None
    ref_val_loss: float | None = None
    ref_step: int | None = None
    stale: int = 0


def watch(
    w: ValWatch, step: int, val_loss: float | None, rule: EarlyStopping | None
) -> tuple[ValWatch, bool, str | None]:
    """Fold one evaluation of trained weights (not step 0's) into ``w``: (the new watch, whether it is
    the best so far, why training stops now — early stopping — or None). A loss that is not finite
    (None) is never an improvement. Improvement for early stopping is against the reference (Keras'
    rule): a slow steady decrease adds up until it counts."""
    best = val_loss is not None and (w.best_val_loss is None or val_loss < w.best_val_loss)
    if best:
        w = msgspec.structs.replace(w, best_val_loss=val_loss, best_step=step)
    if rule is None:
        return w, best, None
    if val_loss is not None and (
        w.ref_val_loss is None or val_loss < w.ref_val_loss - rule.min_delta
    ):
        return msgspec.structs.replace(w, ref_val_loss=val_loss, ref_step=step, stale=0), best, None
    w = msgspec.structs.replace(w, stale=w.stale + 1)
    if w.stale < rule.patience:
        return w, best, None
    since = (
        f"since step {w.ref_step} ({w.ref_val_loss:.4f})"
        if w.ref_step is not None
        else "since training began (no finite validation loss yet)"
    )
    by = f" by more than min_delta = {rule.min_delta:g}" if rule.min_delta else ""
    best_at = (
        f"; the best is {w.best_val_loss:.4f} at step {w.best_step}"
        if w.best_step is not None
        else ""
    )
    return (
        w,
        best,
        f"early stopping at step {step}: the validation loss has not improved{by} in {w.stale} "
        f"evaluations {since} (early_stopping.patience = {rule.patience}){best_at}",
    )


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
