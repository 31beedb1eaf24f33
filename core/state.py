"""The projection: what the journal says, folded into plain structs. No I/O.

``apply`` is the reducer. It mutates the projection it is given (for speed: a replay of a
million events must not copy the world a million times), but it reads nothing except the
event, so ``fold(events)`` is a pure function of the events.
"""

from __future__ import annotations

import gc
from typing import Any

import msgspec

from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.types import CheckpointRecord, ProcessId

from .config import Config
from .machine import FACTS, JOB_STATES, TERMINAL, command, next_state

SNAPSHOT_FORMAT = 21  # bump whenever the shape of the projection changes: old snapshots are ignored


class ReplayError(UserError):
    """The journal holds an event its stream's state cannot take: a bug or a tampered file."""

    kept = "the journal was only read, nothing was changed"


class CrashRecord(msgspec.Struct, kw_only=True, gc=False):
    ts: str
    category: str
    step: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    suggestion: str = ""
    # the job's last good checkpoint when it crashed: where the next attempt resumes
    resume_step: int | None = None
    # its latest reproduction's verdict (crash_reproduced), "" if never reproduced
    verdict: str = ""
    reproduction: str = ""  # that reproduction's one-line summary
    rank: int | None = None  # a data-parallel job: the rank that failed first, and its host
    host: str | None = None
    loading: bool = False  # before its attempt's first step: not a crash at ``step``


class AlertRecord(msgspec.Struct, kw_only=True, gc=False):
    """A training_alert, as the job keeps it (the event has the evidence in full)."""

    ts: str
    seq: int
    kind: str
    step: int
    global_step: int
    text: str
    action: str = "recorded"


class JobState(msgspec.Struct, kw_only=True):
    job: str
    name: str = ""
    state: str = "new"
    version: int = 0  # the stream version: the expected version for the next append
    lineage: str = "main"
    submitted_at: str = ""
    updated_at: str = ""
    updated_seq: int = 0
    data_path: str = ""
    data_sha256: str | None = None
    data_format: str = ""
    examples: int = 0
    # the examples it trains on, without those held out for validation (None: not recorded)
    train_examples: int | None = None
    valid_path: str | None = None
    valid_sha256: str | None = None
    config: Config | None = None  # the recorded config, typed (None for a rejected submission)
    config_sha256: str = ""
    warnings: list[str] = []
    overrides: list[str] = []  # the job's own key=value overrides of ftctl.yaml, as submitted
    # sha256 of the job's own data copies (jobs/<id>/data/), by file name
    copies: dict[str, str] = {}
    model_repo: str | None = None  # the Hugging Face repo id the model was named by, if any
    model_revision: str | None = None  # and the commit hash of the cached snapshot it resolved to
    reason: str = ""  # why it is rejected / paused / failed / cancelled / requeued
    attempt: int = 0
    worker: ProcessId | None = None
    base_model: str = ""
    warm_start_from: str | None = None
    parent_job: str | None = None
    started_seq: int = 0  # the journal seq of its first training_started (0: never started)
    global_step_base: int = 0
    step: int = 0  # job step of the last committed checkpoint
    reached: int = (
        0  # the furthest step a checkpoint of the current attempt began at (or it resumed at)
    )
    global_step: int = 0
    checkpoints: list[CheckpointRecord] = []  # committed and not pruned, oldest first
    corrupt: dict[str, str] = {}  # checkpoint path -> why it failed verification
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    last_val_step: int | None = None  # the steps of those two evaluations
    best_val_step: int | None = None
    started_at: str = ""  # when its first attempt started
    ended_at: str = ""  # when it completed, failed or was cancelled ("" while it is not over)
    resumes: int = 0  # attempts that resumed from a checkpoint
    adapter_path: str | None = None
    adapter_sha256: str | None = None
    # the checkpoint the adapter was published from (config `result`), its step and validation loss
    result: str = ""  # "best" | "last" once completed
    result_checkpoint: str | None = None
    result_step: int | None = None
    result_val_loss: float | None = None
    result_note: str = ""  # why the published checkpoint is not the one `result` asked for, if so
    stopped_early: str = ""  # early stopping's reason (early_stopped), "" if it trained to the end
    stopped_early_step: int | None = None  # and the step it stopped at
    exported_to: str | None = None  # config adapter_path: where the adapter was also published
    export_refused: str | None = None  # or why it was not
    last_eval: ev.AdapterEvaluated | None = None  # the last `ftctl eval` of the adapter
    last_eval_at: str = ""
    crashes: list[CrashRecord] = []
    # crashes[budget_from:] count against the restart budget (`ftctl retry` resets it)
    budget_from: int = 0
    not_before: float = 0.0
    planned_restarts: int = (
        0  # restart_planned events: a guard's checkpoint-and-continue, not crashes
    )
    requested: str | None = None  # a pending user request for a running job: "pause" | "cancel"
    requested_by: str = ""  # who asked, when not the user (control_requested.by)
    alerts: list[AlertRecord] = []  # training_alert events, oldest first
    env: dict[str, str] = {}  # the latest attempt's environment fingerprint (training_started.env)
    # resumed under another fingerprint: not bit-exact with the earlier attempts
    env_changed: list[str] = []
    # ranks of the latest attempt (config `distributed`); its checkpoints' world size
    world_size: int = 1
    hosts: list[str] = []  # their hosts, in rank order
    resharded: list[str] = []  # "N -> M at step S" for each resume on another world size
    reshard: bool = False  # `ftctl retry --reshard` allows the next attempt another world size
    rank_tokens_per_s: list[float | None] = []  # the latest ranks_reported

    @property
    def iters(self) -> int:
        return self.config.iters if self.config else 0

    def good_checkpoints(self) -> list[CheckpointRecord]:
        return [c for c in self.checkpoints if c.path not in self.corrupt]


class ModelVersion(msgspec.Struct, kw_only=True, gc=False):
    version: int
    path: str
    weights_sha256: str
    promoted_at: str


class LineageState(msgspec.Struct, kw_only=True):
    name: str
    state: str = "idle"
    version: int = 0  # stream version
    base_model: str = ""  # the base new jobs train on
    origin_model: str = ""  # the base the lineage started from (ftctl.yaml's model)
    base_version: int = 0  # 0 = the original model from ftctl.yaml
    head_job: str | None = None  # the completed job whose adapter is the lineage's current one
    # the journal seq at which head_job became the head
    head_seq: int = 0
    # completed jobs that did not become the head (they started from an older one)
    branches: list[str] = []
    jobs: list[str] = []  # jobs trained on the current base, oldest first
    models: list[ModelVersion] = []
    pending: ev.ConsolidationStarted | None = None  # the consolidation in progress
    requested: bool = False  # `ftctl consolidate` asked a running daemon to consolidate
    # when the last consolidation started (the schedule runs once a day)
    last_consolidation_at: str = ""


class DaemonState(msgspec.Struct, kw_only=True):
    version: int = 0
    process: ProcessId | None = None
    host: str = ""
    started_at: str = ""
    running: bool = False
    shutdown_requested: bool = False
    # recovery last ran here: finished jobs untouched since need no new look
    reconciled_seq: int = 0
    # notification target -> its latest failure
    notify_failed: dict[str, ev.NotificationFailed] = {}


class Projection(msgspec.Struct, kw_only=True):
    seq: int = 0
    jobs: dict[str, JobState] = {}
    lineages: dict[str, LineageState] = {}
    daemon: DaemonState = msgspec.field(default_factory=DaemonState)
    imported: dict[str, ev.ModelImported] = {}  # models/imported/NAME path -> how it was imported

    def queue(self) -> list[JobState]:
        return [j for j in self.jobs.values() if j.state == "queued"]


def job_stream(job_id: str) -> str:
    return f"job:{job_id}"


def lineage_stream(name: str) -> str:
    return f"lineage:{name}"


DAEMON_STREAM = "daemon"


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


# --------------------------------------------------------------------------- reducer


def _lineage(p: Projection, name: str, base_model: str = "") -> LineageState:
    lin = p.lineages.get(name)
    if lin is None:
        lin = p.lineages[name] = LineageState(
            name=name, base_model=base_model, origin_model=base_model
        )
    return lin


def _submitted(p: Projection, j: JobState, e: ev.JobSubmitted, seq: int, ts: str) -> None:
    j.name, j.lineage, j.submitted_at = e.name, e.lineage, ts
    j.data_path, j.data_sha256, j.data_format, j.examples = (
        e.data_path,
        e.data_sha256,
        e.data_format,
        e.examples,
    )
    j.valid_path, j.valid_sha256, j.train_examples = e.valid_path, e.valid_sha256, e.train_examples
    j.config, j.config_sha256, j.warnings = (
        msgspec.convert(e.config, Config),
        e.config_sha256,
        list(e.warnings),
    )
    j.overrides, j.copies = list(e.overrides), dict(e.copies)
    j.model_repo, j.model_revision = e.model_repo, e.model_revision
    j.base_model = j.config.model
    lin = _lineage(p, e.lineage, j.base_model)
    lin.jobs.append(e.job)


def _rejected(p, j: JobState, e: ev.JobRejected, seq: int, ts: str) -> None:
    j.name, j.data_path, j.data_sha256, j.submitted_at = e.name, e.data_path, e.data_sha256, ts
    j.reason = "; ".join(e.reasons)


def _started(p, j: JobState, e: ev.TrainingStarted, seq: int, ts: str) -> None:
    j.attempt, j.worker = e.attempt, ProcessId(e.worker_pid, e.worker_started_at)
    j.warm_start_from, j.global_step_base, j.base_model = (
        e.warm_start_from,
        e.global_step_base,
        e.base_model,
    )
    j.parent_job, j.requested, j.requested_by = e.parent_job, None, ""
    j.started_at, j.ended_at = j.started_at or ts, ""
    j.resumes += e.resume_checkpoint is not None
    # where the attempt starts on the lineage's axis: a warm start's base before its first checkpoint
    # (not 0), the checkpoint's global step on a resume
    j.global_step = e.global_step_base + j.step
    j.started_seq = j.started_seq or seq
    j.env = e.env or j.env
    j.env_changed = [*j.env_changed, *e.env_changed] if e.resume_checkpoint else list(e.env_changed)
    if e.resharded_from is not None:
        j.resharded = [
            *j.resharded,
            f"{e.resharded_from} -> {e.world_size} ranks at step {e.resume_step}",
        ]
    j.world_size, j.hosts, j.reshard, j.rank_tokens_per_s = e.world_size, list(e.hosts), False, []
    j.reached = e.resume_step


def _checkpoint_started(p, j: JobState, e: ev.CheckpointStarted, seq: int, ts: str) -> None:
    j.reached = max(j.reached, e.step)


def _committed(p, j: JobState, e: ev.CheckpointCommitted, seq: int, ts: str) -> None:
    c = e.checkpoint
    j.step, j.global_step = c.step, c.global_step
    cps, path = j.checkpoints, c.path
    for x in cps:  # a new list each time, as before; filtered only when the path is there (rare)
        if x.path == path:
            cps = [y for y in cps if y.path != path]
            break
    j.checkpoints = [*cps, c]
    if j.corrupt:
        j.corrupt.pop(path, None)


def _pruned(p, j: JobState, e: ev.CheckpointPruned, seq: int, ts: str) -> None:
    j.checkpoints = [c for c in j.checkpoints if c.path != e.path]
    if j.corrupt:
        j.corrupt.pop(e.path, None)


def _corrupt(p, j: JobState, e: ev.CheckpointCorrupt, seq: int, ts: str) -> None:
    if any(c.path == e.path for c in j.checkpoints):
        j.corrupt[e.path] = e.reason
    good = j.good_checkpoints()
    j.step = good[-1].step if good else 0
    j.global_step = good[-1].global_step if good else j.global_step_base


def _evaluated(p, j: JobState, e: ev.Evaluated, seq: int, ts: str) -> None:
    j.last_val_loss, j.last_val_step = e.val_loss, e.step
    if e.val_loss is not None and (j.best_val_loss is None or e.val_loss < j.best_val_loss):
        j.best_val_loss, j.best_val_step = e.val_loss, e.step


def _early_stopped(p, j: JobState, e: ev.EarlyStopped, seq: int, ts: str) -> None:
    j.stopped_early, j.stopped_early_step = e.reason, e.step


def _adapter_evaluated(p, j: JobState, e: ev.AdapterEvaluated, seq: int, ts: str) -> None:
    j.last_eval, j.last_eval_at = e, ts


def _completed(p: Projection, j: JobState, e: ev.Completed, seq: int, ts: str) -> None:
    j.step, j.global_step, j.worker, j.requested, j.reason = e.step, e.global_step, None, None, ""
    j.requested_by, j.ended_at = "", ts
    j.adapter_path, j.adapter_sha256 = e.adapter_path, e.adapter_sha256
    j.result, j.result_checkpoint = e.result or "last", e.checkpoint
    j.result_step = e.result_step if e.result else e.step
    j.result_val_loss, j.result_note = e.result_val_loss, e.result_note
    j.exported_to, j.export_refused = e.exported_to, e.export_refused
    lin = _lineage(p, j.lineage, j.base_model)
    branch = e.branch
    if (
        branch is None
    ):  # recorded before the decision was: the rule of then (a fresh job took the head)
        branch = (
            f"a branch: it warm-started from job {j.parent_job}, but job {lin.head_job} completed first and "
            f"is the lineage's head; `ftctl lineage set-head {j.job}` makes this one the head"
            if j.parent_job is not None and lin.head_job not in (None, j.parent_job)
            else ""
        )
    if branch:
        lin.branches.append(j.job)
        j.reason = branch
    else:
        lin.head_job, lin.head_seq = j.job, seq


def _crashed(p, j: JobState, e: ev.Crashed, seq: int, ts: str) -> None:
    j.worker = None
    j.crashes.append(
        CrashRecord(
            ts=ts,
            category=e.category,
            step=e.step,
            exit_code=e.exit_code,
            signal=e.signal,
            suggestion=e.suggestion,
            resume_step=j.step,
            rank=e.rank,
            host=e.host,
            loading=e.loading,
        )
    )
    j.reason = f"{e.category}: {e.suggestion}" if e.suggestion else e.category


def _reproduced(p, j: JobState, e: ev.CrashReproduced, seq: int, ts: str) -> None:
    if 1 <= e.crash <= len(j.crashes):
        c = j.crashes[e.crash - 1]
        c.verdict, c.reproduction = e.verdict, e.summary


def _requeued(p, j: JobState, e: ev.Requeued, seq: int, ts: str) -> None:
    j.reason, j.not_before = e.reason, e.not_before


def _interrupted(p, j: JobState, e: ev.Interrupted, seq: int, ts: str) -> None:
    j.worker, j.reason, j.not_before = None, e.reason, 0.0


def _restart_planned(p, j: JobState, e: ev.RestartPlanned, seq: int, ts: str) -> None:
    j.worker, j.not_before = None, e.not_before
    j.reason = f"planned restart ({e.guard} guard) at step {e.step}: {e.evidence}"
    j.planned_restarts += 1


def _reason(p, j: JobState, e, seq: int, ts: str) -> None:
    j.reason = e.reason
    if j.state in TERMINAL or j.state == "paused":
        j.worker, j.requested, j.requested_by = None, None, ""
    if j.state in TERMINAL:
        j.ended_at = ts


def _resumed(p, j: JobState, e, seq: int, ts: str) -> None:
    j.reason, j.not_before = "", 0.0


def _retried(p, j: JobState, e: ev.Retried, seq: int, ts: str) -> None:
    j.reason, j.not_before, j.budget_from = e.reason, 0.0, len(j.crashes)
    j.reshard = e.reshard
    if e.config is not None:  # `--set`: the job's recorded config, changed
        j.config, j.config_sha256 = msgspec.convert(e.config, Config), e.config_sha256
        j.overrides = [*j.overrides, *e.overrides]
        j.base_model = j.config.model  # a new model only ever with no checkpoint (control/jobs.py)


def _loaded(p, j: JobState, e: ev.WorkerLoaded, seq: int, ts: str) -> None:
    if e.blas_threads is not None:  # decided at this load: the job's count from now on
        j.env = {**j.env, "blas_threads": str(e.blas_threads)}


def _ranks_reported(p, j: JobState, e: ev.RanksReported, seq: int, ts: str) -> None:
    j.rank_tokens_per_s = list(e.tokens_per_s)


def _control(p, j: JobState, e: ev.ControlRequested, seq: int, ts: str) -> None:
    j.requested, j.requested_by = e.action, e.by


def _alert(p, j: JobState, e: ev.TrainingAlert, seq: int, ts: str) -> None:
    j.alerts = [
        *j.alerts,
        AlertRecord(
            ts=ts,
            seq=seq,
            kind=e.alert,
            step=e.step,
            global_step=e.global_step,
            text=e.text,
            action=e.action,
        ),
    ]


def _daemon_started(p: Projection, e: ev.DaemonStarted, seq: int, ts: str) -> None:
    d = p.daemon  # a daemon starts only after its recovery ran: everything before is reconciled
    d.process, d.host, d.started_at, d.running, d.shutdown_requested = (
        e.process,
        e.host,
        ts,
        True,
        False,
    )
    d.reconciled_seq = seq


def _recovered(p: Projection, e, seq: int, ts: str) -> None:
    p.daemon.reconciled_seq = seq


def _daemon_stopped(p: Projection, e, seq: int, ts: str) -> None:
    p.daemon.running, p.daemon.shutdown_requested = False, False


def _shutdown(p: Projection, e, seq: int, ts: str) -> None:
    p.daemon.shutdown_requested = True


def _notification_failed(p: Projection, e: ev.NotificationFailed, seq: int, ts: str) -> None:
    p.daemon.notify_failed[e.target] = e


def _imported(p: Projection, e: ev.ModelImported, seq: int, ts: str) -> None:
    p.imported[e.path] = e


def _noop(p, e, seq: int, ts: str) -> None:
    pass


def _consolidation(p: Projection, lin: LineageState, e, seq: int, ts: str) -> None:
    if isinstance(e, ev.ConsolidationRequested):
        lin.requested = True
    elif isinstance(e, ev.HeadSet):
        lin.branches = [b for b in lin.branches if b != e.job] + (
            [e.previous] if e.previous else []
        )
        lin.head_job, lin.head_seq = e.job, seq
        if e.job in p.jobs:
            p.jobs[e.job].reason = ""
        if e.previous in p.jobs:
            p.jobs[
                e.previous
            ].reason = f"a branch: job {e.job} was made the lineage's head instead ({e.reason})"
    elif isinstance(e, ev.ConsolidationStarted):
        lin.pending, lin.requested, lin.last_consolidation_at = e, False, ts
    elif isinstance(e, ev.BasePromoted):
        lin.pending = None
        lin.base_model, lin.base_version = e.model_path, e.version
        lin.models.append(
            ModelVersion(
                version=e.version,
                path=e.model_path,
                weights_sha256=e.weights_sha256,
                promoted_at=ts,
            )
        )
        lin.head_job, lin.head_seq, lin.jobs, lin.branches = None, seq, [], []
    elif isinstance(e, ev.ConsolidationAborted):
        lin.pending = None
    elif isinstance(e, ev.ModelRemoved):
        lin.models = [m for m in lin.models if m.version != e.version]


JOB_HANDLERS = {
    ev.JobSubmitted: _submitted,
    ev.JobRejected: _rejected,
    ev.TrainingStarted: _started,
    ev.WorkerLoaded: _loaded,
    ev.CheckpointStarted: _checkpoint_started,
    ev.CheckpointCommitted: _committed,
    ev.CheckpointPruned: _pruned,
    ev.CheckpointCorrupt: _corrupt,
    ev.CheckpointDiscarded: None,
    ev.Evaluated: _evaluated,
    ev.AdapterEvaluated: _adapter_evaluated,
    ev.EarlyStopped: _early_stopped,
    ev.Completed: _completed,
    ev.Crashed: _crashed,
    ev.CrashReproduced: _reproduced,
    ev.Requeued: _requeued,
    ev.Interrupted: _interrupted,
    ev.RestartPlanned: _restart_planned,
    ev.Failed: _reason,
    ev.Paused: _reason,
    ev.Resumed: _resumed,
    ev.Retried: _retried,
    ev.Cancelled: _reason,
    ev.ControlRequested: _control,
    ev.TrainingAlert: _alert,
    ev.RanksReported: _ranks_reported,
}
DAEMON_HANDLERS = {
    ev.DaemonStarted: _daemon_started,
    ev.DaemonStopped: _daemon_stopped,
    ev.ShutdownRequested: _shutdown,
    ev.RecoveryFinished: _recovered,
    ev.DebrisRemoved: _noop,
    ev.NotificationFailed: _notification_failed,
    ev.ModelImported: _imported,
}
LINEAGE_TYPES = (
    ev.ConsolidationRequested,
    ev.HeadSet,
    ev.ConsolidationStarted,
    ev.BasePromoted,
    ev.ConsolidationAborted,
    ev.ModelRemoved,
)
_KIND = {t: t.kind() for t in ev.EVENT_TYPES}


def _check_type(state: str, typ: type, lineage: bool = False) -> str | None:
    trigger = typ.trigger
    if trigger is not None:
        return next_state(state, trigger, lineage=lineage)
    allowed = FACTS.get(_KIND[typ])
    if allowed is not None and state not in allowed:
        return None
    return state


def check(state: str, event: ev.EventBase, *, lineage: bool = False) -> str | None:
    """The state after ``event``, or None if the event is illegal in ``state`` (replay: the table)."""
    return _check_type(state, type(event), lineage)


def check_command(state: str, event: ev.EventBase, *, lineage: bool = False) -> str | None:
    """As ``check``, for a command about to be appended: a transition is asked of the declared
    machine itself (machine.command); a fact, of the states FACTS allows it in."""
    trigger = type(event).trigger
    if trigger is not None:
        return command(state, trigger, lineage=lineage)
    return _check_type(state, type(event), lineage)


# check() tabulated for job events: {type: (handler, {state: next state})}, one lookup per event
_JOB = {
    t: (h, {s: n for s in JOB_STATES if (n := _check_type(s, t)) is not None})
    for t, h in JOB_HANDLERS.items()
}


def fold_rows(rows, p: Projection | None = None) -> Projection:
    """Fold (seq, ts, event) rows — as Journal.rows yields them — into the projection. The one
    reducer: live updates, replay and snapshots all come through here.

    Stream versions are counted, not read: a stream's events carry versions 1, 2, 3… in order
    (the journal's unique (stream, version) guarantees it), so replay needs only seq, ts, body."""
    p = Projection() if p is None else p
    jobs, table = p.jobs, _JOB
    seq = p.seq
    for seq, ts, e in rows:
        spec = table.get(type(e))
        if spec is not None:  # job events: the hot path of a replay
            j = jobs.get(e.job)
            if j is None:
                j = jobs[e.job] = JobState(job=e.job)
            new = spec[1].get(j.state)
            if new is None:
                raise ReplayError(
                    f"seq {seq}: {_KIND[type(e)]!r} is illegal for job {e.job} in state {j.state!r}"
                )
            j.state, j.updated_at, j.updated_seq = new, ts, seq
            j.version += 1
            if spec[0] is not None:
                spec[0](p, j, e, seq, ts)
        elif type(e) in DAEMON_HANDLERS:
            p.daemon.version += 1
            DAEMON_HANDLERS[type(e)](p, e, seq, ts)
        elif isinstance(e, LINEAGE_TYPES):
            lin = _lineage(p, e.lineage)
            new = check(lin.state, e, lineage=True)
            if new is None:
                raise ReplayError(
                    f"seq {seq}: {_KIND[type(e)]!r} is illegal for lineage {e.lineage} in state {lin.state!r}"
                )
            lin.state = new
            lin.version += 1
            _consolidation(p, lin, e, seq, ts)
        else:
            raise ReplayError(f"seq {seq}: no reducer for event type {type(e).__name__}")
    p.seq = seq
    return p


def fold(records, p: Projection | None = None) -> Projection:
    """Fold Recorded events (as Journal.read yields them)."""
    return fold_rows(((r.seq, r.ts, r.event) for r in records), p)


_snap_enc = msgspec.msgpack.Encoder()
_snap_dec = msgspec.msgpack.Decoder(Projection)


def to_snapshot(p: Projection) -> bytes:
    return _snap_enc.encode(p)


def from_snapshot(blob: bytes) -> Projection:
    # Decoding makes ~10^5 containers at once; with the cyclic GC paused (none of them can form
    # a cycle) it takes about a third less time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _snap_dec.decode(blob)
    finally:
        if enabled:
            gc.enable()


def as_dict(obj) -> Any:
    return msgspec.to_builtins(obj)
