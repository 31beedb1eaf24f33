"""The event catalogue: small, immutable facts, one msgspec Struct each.

Every event is a member of the tagged union ``Event``; its tag (the ``type`` field in the
stored JSON) names it and, from version 2 on, its schema version (``"daemon_started.v2"``).
Old versions stay in the union so that old journals still decode; ``upcast`` turns them into
the current type. Rules for changing an event (msgspec's): add fields only with defaults,
never change a field's type — bump the version and write an upcaster instead.

``trigger`` names the state-machine transition an event performs (core/machine.py); events
without one record facts that do not move the job's state.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, ClassVar, Union

import msgspec


class EventBase(
    msgspec.Struct, tag_field="type", frozen=True, kw_only=True, omit_defaults=True, gc=False
):
    trigger: ClassVar[str | None] = None
    schema: ClassVar[int] = 1

    @classmethod
    def kind(cls) -> str:
        """The event's name without its version suffix, as shown to users."""
        return cls.__struct_config__.tag.split(".v")[0]


# --------------------------------------------------------------------------- jobs
# Stream id: "job:<job id>". The job id is also in every body so a body alone is readable.


class JobSubmitted(EventBase, tag="job_submitted", kw_only=True):
    """Data validated and the job queued. Records what is needed to detect later drift."""

    trigger: ClassVar[str] = "submit"
    job: str
    name: str
    data_path: str
    data_sha256: str
    data_format: str
    examples: int
    valid_path: str | None = None
    valid_sha256: str | None = None
    # the examples it trains on (without those held out for validation): an epoch is
    # train_examples // batch_size batches (core/config.py). None in events from before it was recorded
    train_examples: int | None = None
    config: dict[str, Any]
    config_sha256: str
    lineage: str = "main"
    warnings: list[str] = []
    overrides: list[str] = []  # the job's own `key=value` overrides of ftctl.yaml (--set, --fresh)
    # sha256 of the job's own copies under jobs/<id>/data/ (train.jsonl, valid.jsonl): what it trains on,
    # checked before a reproduction ({} in journals from before it was recorded)
    copies: dict[str, str] = {}
    # When the model was named by a Hugging Face repo id: the id, and the cached snapshot's commit
    # hash (config.model is then that snapshot's folder: the exact weights the job trains on).
    model_repo: str | None = None
    model_revision: str | None = None


class JobRejected(EventBase, tag="job_rejected", kw_only=True):
    """Data failed validation; nothing was queued and the file was left untouched."""

    trigger: ClassVar[str] = "reject"
    job: str
    name: str
    data_path: str
    data_sha256: str | None = None
    reasons: list[str]
    problems: list[str] = []


class TrainingStarted(EventBase, tag="training_started", kw_only=True):
    """A worker process was spawned for the job."""

    trigger: ClassVar[str] = "start"
    job: str
    attempt: int
    worker_pid: int
    worker_started_at: float
    resume_step: int = 0
    resume_checkpoint: str | None = None
    warm_start_from: str | None = None
    parent_job: str | None = None  # the lineage's head job whose adapter it warm-starts from
    global_step_base: int = 0
    base_model: str
    # The worker's environment fingerprint (mlx, mlx_lm, blas, blas_threads, platform: adapters/blas.py);
    # {} in journals from before it was recorded. Bit-exactness holds only within one fingerprint.
    env: dict[str, str] = {}
    # When it resumes a checkpoint: what differs from the previous attempt's fingerprint ("blas: a -> b");
    # non-empty = no longer bit-exact with the earlier attempts.
    env_changed: list[str] = []
    # A data-parallel job (config `distributed`): worker_pid is mlx.launch's; the ranks' hosts in rank
    # order; resharded_from = the world size of the checkpoint it resumes when that differs
    # (`ftctl retry --reshard`): deterministic from here on, not bit-exact with the earlier attempts.
    world_size: int = 1
    hosts: list[str] = []
    backend: str = ""
    resharded_from: int | None = None


class WorkerLoaded(EventBase, tag="worker_loaded", kw_only=True):
    """The attempt's worker loaded the model, data and optimizer (and its checkpoint) in ``load_s``
    seconds, at job step ``step``. ``blas_threads``: the OpenBLAS threads it trains with (None: no
    OpenBLAS in the worker: the reference BLAS, macOS, a GPU), decided once per job (core/threads.py)
    and kept; ``blas_ms``: when it was measured at this load, ms of the model's matmuls per thread
    count (empty when the count was already decided: config, an earlier attempt, the environment), and
    ``blas_others``: the other processes' threads running or waiting for a CPU meanwhile (the median
    of its samples; no more threads are chosen than the cores they leave)."""

    job: str
    step: int
    load_s: float
    blas_threads: int | None = None
    blas_ms: dict[str, float] = {}
    blas_others: float | None = None


class CheckpointStarted(EventBase, tag="checkpoint_started", kw_only=True):
    trigger: ClassVar[str] = "checkpoint"
    job: str
    step: int
    global_step: int


class CheckpointRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A committed checkpoint, declared once: the worker's save returns it, the worker's message
    carries it, ``checkpoint_committed`` records it and the projection keeps it as it is."""

    step: int
    global_step: int
    path: str
    manifest_sha256: str
    bytes: int
    train_loss: float | None = None
    val_loss: float | None = None  # the latest evaluation's, at or before this step
    val_step: int | None = None  # the step val_loss was measured at (None in older journals)


class Metrics(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A training report. A measurement, not a lifecycle change: the journal keeps these in its
    ``metrics`` table, beside the events."""

    step: int
    global_step: int
    loss: float | None  # None: not finite (JSON has no NaN: msgspec writes null)
    lr: float | None
    tokens_per_s: float | None
    peak_mem_gb: float | None
    trained_tokens: int
    # preference training (train_mode dpo, orpo): the window's mean pair figures; None for sft
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    reward_margin: float | None = None  # chosen - rejected
    accuracy: float | None = None  # share of pairs whose chosen reward is the higher

    # The device and its readings at the report (adapters/telemetry.py): None where the device does not
    # report one (NVML's on CUDA only) or the journal predates them. mem_*: MLX's active and cache
    # memory; rss/swap: the worker process's; device_*: the GPU's as NVML (or, on a Mac, MLX) reports.
    device: str | None = (
        None  # "cuda:0 NVIDIA H100 80GB HBM3", "metal Apple M2 Max", "cpu AMD EPYC"
    )
    mem_active_gb: float | None = None
    mem_cache_gb: float | None = None
    rss_gb: float | None = None
    swap_gb: float | None = None
    device_mem_used_gb: float | None = None
    device_mem_total_gb: float | None = None
    device_util_pct: float | None = None
    device_temp_c: float | None = None
    device_power_w: float | None = None


# the device readings a report carries (Metrics' fields of these names), in the order tables show them
READINGS = (
    "mem_active_gb",
    "mem_cache_gb",
    "rss_gb",
    "swap_gb",
    "device_mem_used_gb",
    "device_mem_total_gb",
    "device_util_pct",
    "device_temp_c",
    "device_power_w",
)


class PairStats(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What preference training (dpo, orpo) is judged by, over validation pairs: mean rewards of the
    chosen and rejected answers (beta x log-prob ratio to the reference; ORPO: beta x mean log-prob),
    their margin, and the accuracy (share of pairs with chosen > rejected). None: not finite."""

    chosen_reward: float | None
    rejected_reward: float | None
    reward_margin: float | None
    accuracy: float | None


PAIR_FIELDS = PairStats.__struct_fields__  # also Metrics' fields of the same names


class CheckpointCommittedV1(EventBase, tag="checkpoint_committed", kw_only=True):
    """Schema 1 spelled the record's fields out flat; kept so that old journals still decode."""

    job: str
    step: int
    global_step: int
    path: str
    manifest_sha256: str
    bytes: int
    train_loss: float | None = None
    val_loss: float | None = None


class CheckpointCommitted(EventBase, tag="checkpoint_committed.v2", kw_only=True):
    """The commit point of a checkpoint: its directory is durable and verified by hash."""

    trigger: ClassVar[str] = "committed"
    schema: ClassVar[int] = 2
    job: str
    checkpoint: CheckpointRecord


class CheckpointPruned(EventBase, tag="checkpoint_pruned", kw_only=True):
    """Retention removed a committed checkpoint (the event comes first, the deletion after)."""

    job: str
    step: int
    path: str
    reason: str


class CheckpointCorrupt(EventBase, tag="checkpoint_corrupt", kw_only=True):
    """A committed checkpoint failed verification; resume falls back to an earlier one."""

    job: str
    step: int
    path: str
    reason: str


class CheckpointDiscarded(EventBase, tag="checkpoint_discarded", kw_only=True):
    """Recovery deleted a temp or uncommitted checkpoint directory."""

    job: str
    path: str
    reason: str


class Evaluated(EventBase, tag="evaluated", kw_only=True):
    """Validation loss at a step; None when it was not finite (NaN/Inf), which is itself a finding."""

    job: str
    step: int
    global_step: int
    val_loss: float | None
    preference: PairStats | None = None  # train_mode dpo / orpo: the validation pairs' figures


class PairEval(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """`ftctl eval` on preference pairs: how often each model ranks the chosen answer above the
    rejected one by mean log-probability per answer token (accuracy; answers of different lengths
    compare fairly) and by how much on average (margin, nats per token); and the adapter's DPO reward
    against the base as its reference (beta x the summed log-prob ratios): its mean margin and the
    share of pairs where it is positive. None: not finite."""

    base_accuracy: float | None
    adapter_accuracy: float | None
    base_margin: float | None
    adapter_margin: float | None
    reward_margin: float | None
    reward_accuracy: float | None
    beta: float


class AdapterEvaluated(EventBase, tag="adapter_evaluated", kw_only=True):
    """`ftctl eval`: the test loss and perplexity of the job's final adapter and of its base model
    on the same data. A loss or perplexity that is not finite is None."""

    job: str
    data_path: str
    data_sha256: str
    examples: int
    tokens: int
    base_model: str
    adapter_path: str
    adapter_sha256: str
    base_loss: float | None
    base_ppl: float | None
    adapter_loss: float | None
    adapter_ppl: float | None
    # preference pairs (prompt/chosen/rejected): the loss is the chosen answers' (tokens: theirs), and
    # the pairs' ranking adapter vs base; None for examples
    preference: PairEval | None = None


class EarlyStopped(EventBase, tag="early_stopped", kw_only=True):
    """Early stopping (config ``early_stopping``) ended training at ``step``: the validation loss
    stopped improving. Committed with the ``completed`` that follows, in one transaction."""

    job: str
    step: int
    global_step: int
    reason: str
    best_step: int | None = None
    best_val_loss: float | None = None


class Completed(EventBase, tag="completed", kw_only=True):
    trigger: ClassVar[str] = "complete"
    job: str
    step: int
    global_step: int
    adapter_path: str
    adapter_sha256: str
    checkpoint: str  # the checkpoint the adapter was published from (what a warm start continues)
    # which checkpoint that is (config `result`): "best" or "last" ("" in older journals: the last),
    # its step and validation loss; result_note says why it is not the one `result` asked for, if so
    result: str = ""
    result_step: int | None = None
    result_val_loss: float | None = None
    result_note: str = ""
    # config adapter_path: where the adapter was also published (mlx-lm's layout), or why it was not
    exported_to: str | None = None
    export_refused: str | None = None
    # Whether the job became its lineage's head, decided when it completed (core.state.branch_reason):
    # "" it did; a reason: it is a branch, and why (`ftctl lineage set-head` chooses). None in journals
    # from before it was recorded: the rule of then decides on replay.
    branch: str | None = None


class Crashed(EventBase, tag="crashed", kw_only=True):
    """The worker died or stopped making progress. ``evidence`` keeps the stderr tail."""

    trigger: ClassVar[str] = "crash"
    job: str
    category: str
    step: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    evidence: str = ""
    suggestion: str = ""
    # what the worker said, first line ("ValueError: ..."): a reproduction compares it
    message: str = ""
    rank: int | None = None  # a data-parallel job: the rank that failed first, and its host
    host: str | None = None
    loading: bool = False  # it died before its attempt's first step: ``step`` is where it resumed
    # the job's recorded config is the cause: the `key=value` that would run (`ftctl retry JOB --set`)
    fix: str = ""


class ExampleRef(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One example of a failing batch, as `ftctl reproduce` found it."""

    index: int  # the example's index among the job's training examples (file order)
    line: int  # its line in the job's copy, jobs/<id>/data/train.jsonl
    source_line: int | None  # its line in the submitted file (None: that file changed or is gone)
    tokens: int  # its length in tokens (before max_seq_length truncation)
    head: str  # the first characters of the line


class CrashReproduced(EventBase, tag="crash_reproduced", kw_only=True):
    """`ftctl reproduce` (or the daemon, after a crash that can be deterministic) re-ran the job from a
    committed checkpoint up to the crash, on a scratch copy, and compared. Only this fact is recorded:
    the replay writes nothing of the job's."""

    job: str
    crash: int  # which of the job's crashes (1 = its first), as `ftctl crashes` numbers them
    crash_category: str
    crash_step: int
    verdict: str  # "reproduced" | "not reproduced" | "different"
    summary: str  # one line: the verdict, and what the replay found
    from_step: int  # the checkpoint it replayed from (0: from the start of the job)
    target_step: int  # the last step it would run
    category: str | None = None  # the replay's own failure, if any
    step: int | None = None  # the replay's last completed step
    message: str = ""  # the replay's failure, first line
    first_nonfinite_step: int | None = None
    first_nonfinite: str = ""  # "loss", "gradient norm" or "loss and gradient norm"
    # parameter groups whose gradient was not finite at that step, model order
    groups: list[str] = []
    group_count: int = 0  # of how many groups
    failing_step: int | None = None
    examples: list[ExampleRef] = []  # the failing step's batch
    # how its environment fingerprint differs from the crashed attempt's
    env_changed: list[str] = []
    # steps at which the replay's weights matched the job's checkpoint, bit for bit
    bit_exact: list[int] = []
    mismatch: list[int] = []  # steps at which they did not
    notes: list[str] = []  # what it had to do differently (a pruned checkpoint, unchecked data)
    by: str = "user"  # "user" (`ftctl reproduce`) or "daemon" (the restart policy)


class Requeued(EventBase, tag="requeued", kw_only=True):
    trigger: ClassVar[str] = "requeue"
    job: str
    reason: str
    not_before: float = 0.0


class Interrupted(EventBase, tag="interrupted", kw_only=True):
    """Graceful stop: the worker checkpointed at ``step`` and exited; the job waits in the queue."""

    trigger: ClassVar[str] = "interrupt"
    job: str
    step: int
    reason: str


class RestartPlanned(EventBase, tag="restart_planned", kw_only=True):
    """A guard stopped the worker before the OS or the hardware would: it checkpointed at ``step`` and the
    job continues in a fresh worker process (at ``not_before``: a cool-down), from that checkpoint, bit for
    bit. Not a crash: nothing was lost, and the restart budget is not used. ``guard``: memory (the
    worker's memory trend would reach guards.memory_limit_gb) or temperature (the GPU above
    guards.max_temperature_c, guards.cooldown_s > 0); ``evidence``: the readings that decided it."""

    trigger: ClassVar[str] = "plan_restart"
    job: str
    step: int
    guard: str
    evidence: str
    not_before: float = 0.0


class Failed(EventBase, tag="failed", kw_only=True):
    trigger: ClassVar[str] = "fail"
    job: str
    reason: str
    category: str = ""


class Paused(EventBase, tag="paused", kw_only=True):
    trigger: ClassVar[str] = "pause"
    job: str
    reason: str


class Resumed(EventBase, tag="resumed", kw_only=True):
    trigger: ClassVar[str] = "resume"
    job: str


class Retried(EventBase, tag="retried", kw_only=True):
    """`ftctl retry`: a failed job queued again; it resumes from its last good checkpoint and its
    restart budget starts afresh (crashes before this event no longer count). With `--set` (a failed
    or a paused job), its recorded config changes: ``config`` is the new one, as job_submitted
    records it, ``config_sha256`` its hash, ``overrides`` the --set items, ``changes`` "key: old -> new"."""

    trigger: ClassVar[str] = "retry"
    job: str
    reason: str = "retried by user"
    reshard: bool = False  # `--reshard`: it may resume on another world size than its checkpoints'
    config: dict[str, Any] | None = None
    config_sha256: str = ""
    overrides: list[str] = []
    changes: list[str] = []


class RanksReported(EventBase, tag="ranks_reported", kw_only=True):
    """A data-parallel job's tokens/s per rank (index = rank; None = not reported yet), at the
    daemon's progress-log rate (about a dozen per job)."""

    job: str
    step: int
    tokens_per_s: list[float | None]


class Cancelled(EventBase, tag="cancelled", kw_only=True):
    trigger: ClassVar[str] = "cancel"
    job: str
    reason: str


class ControlRequested(EventBase, tag="control_requested", kw_only=True):
    """A user asked a running job to pause or cancel; the daemon acts on it."""

    job: str
    action: str
    by: str = (
        ""  # who asked, when not the user: "the loss-spike alert at step 23" (alerts.on_spike)
    )


class TrainingAlert(EventBase, tag="training_alert", kw_only=True):
    """The daemon's training-health watch (control/watch.py, core/health.py) saw in the journal's curves
    what a person watching them would: a loss spike, a validation plateau, a throughput drop. Recorded
    after the metrics it read, never on the training path; ``text`` is the evidence in one line."""

    job: str
    alert: str  # "loss_spike" | "plateau" | "throughput_drop"
    step: int  # the report (or evaluation) that fired it
    global_step: int
    value: float | None  # its train loss / the last val loss / its tokens/s
    baseline: float  # the median it was compared with / the best val loss / the median tokens/s
    compared: list[int]  # the steps of the points it was compared with
    text: str
    # "recorded", or "pause" (alerts.on_spike: pause asked the job to pause)
    action: str


# --------------------------------------------------------------------------- daemon
# Stream id: "daemon".


class ProcessId(msgspec.Struct, frozen=True, gc=False):
    """A process is (pid, start time): a pid alone can be reused by an unrelated process."""

    pid: int
    started_at: float


class DaemonStartedV1(EventBase, tag="daemon_started", kw_only=True):
    """Schema 1 recorded the pid only; kept so that old journals still decode."""

    pid: int
    host: str


class DaemonStarted(EventBase, tag="daemon_started.v2", kw_only=True):
    schema: ClassVar[int] = 2
    process: ProcessId
    host: str
    version: str = ""


class DaemonStopped(EventBase, tag="daemon_stopped", kw_only=True):
    pid: int
    reason: str


class ShutdownRequested(EventBase, tag="shutdown_requested", kw_only=True):
    reason: str = "ftctl shutdown"


class DebrisRemoved(EventBase, tag="debris_removed", kw_only=True):
    """Recovery deleted a folder no committed event accounts for (a submit or a fuse that died)."""

    path: str
    reason: str


class NotificationFailed(EventBase, tag="notification_failed", kw_only=True):
    """A notification target (``notify:`` in ftctl.yaml) could not be given event ``seq`` after every
    retry. The daemon goes on; later events are still sent; `ftctl doctor` shows the failure."""

    target: str  # the target's identity (NotifyTarget.key(): "url …" or "command […]")
    seq: int  # the event that was not delivered
    event: str  # its kind
    attempts: int
    error: str


class ModelImported(EventBase, tag="model_imported", kw_only=True):
    """A GGUF file was converted into the workspace (models/imported/NAME, verified to load and
    generate). ``dtype`` None: kept quantized as in the file (LoRA on it is QLoRA)."""

    path: str
    source: str
    source_sha256: str
    quantization: str  # the file's type as llama.cpp names it: "Q4_1", "Q8_0", "F16", ...
    dtype: str | None = None  # float16 | bfloat16 | float32 when dequantized on import
    weights_sha256: str
    bytes: int
    seconds: float


class RecoveryFinished(EventBase, tag="recovery_finished", kw_only=True):
    repairs: int
    summary: list[str] = []


# --------------------------------------------------------------------------- lineage
# Stream id: "lineage:<name>". Consolidation fuses the lineage's adapter into a new base.


class ConsolidationRequested(EventBase, tag="consolidation_requested", kw_only=True):
    """`ftctl consolidate` while a daemon runs: the daemon fuses when no job of the lineage is active."""

    lineage: str


class HeadSet(EventBase, tag="head_set", kw_only=True):
    """`ftctl lineage set-head`: the user chose which completed job's adapter the lineage continues
    from (what later jobs warm-start from and what consolidation fuses)."""

    lineage: str
    job: str
    previous: str | None = None
    reason: str = "chosen by user"


class ConsolidationStarted(EventBase, tag="consolidation_started", kw_only=True):
    trigger: ClassVar[str] = "consolidate"
    lineage: str
    version: int
    base_model: str
    adapter_path: str
    adapter_sha256: str
    temp_path: str


class BasePromoted(EventBase, tag="base_promoted", kw_only=True):
    trigger: ClassVar[str] = "promote"
    lineage: str
    version: int
    model_path: str
    weights_sha256: str
    previous_base: str


class ConsolidationAborted(EventBase, tag="consolidation_aborted", kw_only=True):
    trigger: ClassVar[str] = "abort"
    lineage: str
    version: int
    reason: str


class ModelRemoved(EventBase, tag="model_removed", kw_only=True):
    lineage: str
    version: int
    path: str
    reason: str


Event = Union[
    JobSubmitted,
    JobRejected,
    TrainingStarted,
    WorkerLoaded,
    CheckpointStarted,
    CheckpointCommittedV1,
    CheckpointCommitted,
    CheckpointPruned,
    CheckpointCorrupt,
    CheckpointDiscarded,
    Evaluated,
    AdapterEvaluated,
    EarlyStopped,
    Completed,
    Crashed,
    CrashReproduced,
    Requeued,
    Interrupted,
    RestartPlanned,
    Failed,
    Paused,
    Resumed,
    Retried,
    Cancelled,
    ControlRequested,
    TrainingAlert,
    RanksReported,
    DaemonStartedV1,
    DaemonStarted,
    DaemonStopped,
    ShutdownRequested,
    DebrisRemoved,
    ModelImported,
    RecoveryFinished,
    NotificationFailed,
    ConsolidationRequested,
    HeadSet,
    ConsolidationStarted,
    BasePromoted,
    ConsolidationAborted,
    ModelRemoved,
]

EVENT_TYPES: tuple[type[EventBase], ...] = Event.__args__
BY_TAG: dict[str, type[EventBase]] = {t.__struct_config__.tag: t for t in EVENT_TYPES}


# --------------------------------------------------------------------------- upcasting


def _daemon_started_v1(e: DaemonStartedV1) -> DaemonStarted:
    # Schema 1 did not record the start time: 0.0 means "unknown", and a process whose
    # identity cannot be proven is never signalled (see recovery).
    return DaemonStarted(process=ProcessId(pid=e.pid, started_at=0.0), host=e.host)


def _checkpoint_committed_v1(e: CheckpointCommittedV1) -> CheckpointCommitted:
    fields = msgspec.structs.asdict(e)
    return CheckpointCommitted(job=fields.pop("job"), checkpoint=CheckpointRecord(**fields))


UPCASTERS: dict[type, Any] = {
    DaemonStartedV1: _daemon_started_v1,
    CheckpointCommittedV1: _checkpoint_committed_v1,
}


def upcast(event: EventBase) -> EventBase:
    """Bring an event of an old schema version to its current type (chains are allowed)."""
    f = UPCASTERS.get(type(event))
    while f is not None:
        event = f(event)
        f = UPCASTERS.get(type(event))
    return event


# --------------------------------------------------------------------------- workspace paths
# Every path the journal records is relative to the workspace (``jobs/0001/checkpoints/step-…``), so
# that a workspace moved, copied or restored elsewhere reads the same; a path outside the workspace (a
# user's model folder or data file) stays absolute. Journals written before that recorded absolute
# paths: read, each one under the workspace's *recorded* root is made relative (``relocate``). That
# root is not stored anywhere; ``recorded_root`` reads it off the first path whose shape only ftctl
# writes (a job's checkpoint or adapter folder, an imported or fused model), see events/journal.py.


def _relative(path: str | None, root: str) -> str | None:
    """``path`` relative to ``root`` if it is an absolute path under it, else unchanged."""
    if path and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) + 1 :]
    return path


def _paths(*fields: str):
    def relocate_fields(e: EventBase, root: str) -> EventBase:
        changes = {f: _relative(getattr(e, f), root) for f in fields}
        changes = {f: v for f, v in changes.items() if v != getattr(e, f)}
        return msgspec.structs.replace(e, **changes) if changes else e

    return relocate_fields


def _submitted_paths(e: JobSubmitted, root: str) -> JobSubmitted:
    e = _paths("data_path", "valid_path")(e, root)
    model = e.config.get("model")
    if isinstance(model, str) and _relative(model, root) != model:
        e = msgspec.structs.replace(e, config={**e.config, "model": _relative(model, root)})
    return e


def _committed_paths(e: CheckpointCommitted, root: str) -> CheckpointCommitted:
    c = e.checkpoint
    rel = _relative(c.path, root)
    return (
        e
        if rel == c.path
        else msgspec.structs.replace(e, checkpoint=msgspec.structs.replace(c, path=rel))
    )


# The path fields of each event type, as a function (event, old root) -> event.
PATH_FIELDS: dict[type, Any] = {
    JobSubmitted: _submitted_paths,
    JobRejected: _paths("data_path"),
    TrainingStarted: _paths("resume_checkpoint", "warm_start_from", "base_model"),
    CheckpointCommitted: _committed_paths,
    CheckpointPruned: _paths("path"),
    CheckpointCorrupt: _paths("path"),
    CheckpointDiscarded: _paths("path"),
    AdapterEvaluated: _paths("data_path", "base_model", "adapter_path"),
    Completed: _paths("adapter_path", "checkpoint"),
    DebrisRemoved: _paths("path"),
    ModelImported: _paths("path"),
    ConsolidationStarted: _paths("base_model", "adapter_path", "temp_path"),
    BasePromoted: _paths("model_path", "previous_base"),
    ModelRemoved: _paths("path"),
}


def relocate(event: EventBase, root: str | None) -> EventBase:
    """An event of a journal that recorded absolute paths, with those under ``root`` (the workspace's
    recorded location) made relative to the workspace. None: nothing to do (a journal of relative paths)."""
    f = PATH_FIELDS.get(type(event)) if root else None
    return f(event, root) if f is not None else event


_IMPORTED = re.compile(r"^(/.*)/models/imported/[^/]+$")
_FUSED = re.compile(r"^(/.*)/models/v\d{4}$")


def recorded_root(event: EventBase) -> str | None:
    """The workspace's location when ``event`` was written, if the event shows it unambiguously: a path
    only ftctl makes (``ROOT/jobs/<its job>/checkpoints/…``, ``ROOT/jobs/<its job>/adapters``,
    ``ROOT/jobs/<its job>/data/valid.jsonl``, ``ROOT/models/imported/NAME``, ``ROOT/models/vNNNN``).
    "" when the event's path is relative: from there on the journal records relative paths."""
    event = upcast(event)
    candidates: list[tuple[str | None, str]] = []
    if isinstance(event, CheckpointCommitted):
        candidates = [(event.checkpoint.path, f"/jobs/{event.job}/checkpoints/")]
    elif isinstance(event, Completed):
        candidates = [(event.adapter_path, f"/jobs/{event.job}/adapters")]
    elif isinstance(event, JobSubmitted):
        candidates = [(event.valid_path, f"/jobs/{event.job}/data/valid.jsonl")]
    elif isinstance(event, TrainingStarted):
        candidates = [(event.resume_checkpoint, f"/jobs/{event.job}/checkpoints/")]
    if isinstance(event, ModelImported):
        candidates = [(event.path, "")]
    elif isinstance(event, BasePromoted):
        candidates = [(event.model_path, "")]
    for path, marker in candidates:
        if not path:
            continue
        if not path.startswith("/"):
            return ""  # written relative: this journal's paths were never absolute from here on
        if marker and marker in path:
            return path[: path.rindex(marker)] or None
        m = (
            None
            if marker
            else (_IMPORTED if isinstance(event, ModelImported) else _FUSED).match(path)
        )
        if m:
            return m.group(1)
    return None


# The stored tags of the events ``recorded_root`` can read a root off.
ROOT_TAGS = (
    "checkpoint_committed",
    "checkpoint_committed.v2",
    "completed",
    "job_submitted",
    "training_started",
    "model_imported",
    "base_promoted",
)


# --------------------------------------------------------------------------- envelope


# a journal timestamp: UTC, microseconds (events/journal.utc_now)
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def ts_epoch(ts: str) -> float:
    """Epoch seconds of a journal timestamp (UTC, whatever the machine's local time zone)."""
    return datetime.strptime(ts, TS_FORMAT).replace(tzinfo=timezone.utc).timestamp()


class Recorded(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """An event as stored: global sequence, stream, per-stream version, UTC time, body."""

    seq: int
    stream: str
    version: int
    ts: str
    event: Event


class DecodeError(ValueError):
    """A stored event body could not be decoded into a known event type."""


_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)


def encode(event: EventBase) -> bytes:
    return _encoder.encode(event)


def decode(body: bytes | str, root: str | None = None) -> EventBase:
    """Decode one stored body; raises DecodeError (only) on anything that is not a valid event.
    ``root``: the journal's recorded workspace root, if it recorded absolute paths (see ``relocate``)."""
    try:
        return relocate(upcast(_event_decoder.decode(body)), root)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as e:
        raise DecodeError(f"not a valid ftctl event: {e}") from None


_events_decoder = msgspec.json.Decoder(list[Event])
_ints_decoder = msgspec.json.Decoder(list[int])
_strs_decoder = msgspec.json.Decoder(list[str])


def decode_columns(
    seqs: str, streams: str, versions: str, ts: str, bodies: str, root: str | None = None
) -> list[Recorded]:
    """Decode rows given as one JSON array per column (what SQLite's group_concat makes
    cheaply): about a third cheaper than an array of rows, the framing of which SQLite
    would have to build row by row."""
    try:
        events = _events_decoder.decode(bodies)
        cols = (
            _ints_decoder.decode(seqs),
            _strs_decoder.decode(streams),
            _ints_decoder.decode(versions),
            _strs_decoder.decode(ts),
        )
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as e:
        raise DecodeError(f"journal holds an event that cannot be decoded: {e}") from None
    if any(len(c) != len(events) for c in cols):
        raise DecodeError(
            f"journal rows do not line up: {len(events)} bodies for {[len(c) for c in cols]} columns"
        )
    if UPCASTERS:
        events = [upcast(e) if type(e) in UPCASTERS else e for e in events]
    if root:
        events = [relocate(e, root) if type(e) in PATH_FIELDS else e for e in events]
    return list(map(Recorded, *cols, events))


def decode_bodies(
    ts: str, bodies: str, root: str | None = None
) -> tuple[list[str], list[EventBase]]:
    """The replay path's decoder: commit times and events, one JSON array each."""
    try:
        events = _events_decoder.decode(bodies)
        stamps = _strs_decoder.decode(ts)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as e:
        raise DecodeError(f"journal holds an event that cannot be decoded: {e}") from None
    if len(stamps) != len(events):
        raise DecodeError(
            f"journal rows do not line up: {len(events)} bodies for {len(stamps)} timestamps"
        )
    if UPCASTERS:
        events = [upcast(e) if type(e) in UPCASTERS else e for e in events]
    if root:
        events = [relocate(e, root) if type(e) in PATH_FIELDS else e for e in events]
    return stamps, events


def to_dict(event: EventBase) -> dict[str, Any]:
    """The event as plain JSON-able data, tag included (stable: used by --json output)."""
    return msgspec.to_builtins(event)
