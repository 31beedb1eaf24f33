"""The worker protocol: every message between the daemon and its training worker, typed once.

    daemon -> worker (stdin)       TrainPlan (first line), then Stop
    worker -> daemon (message fd)  Loaded, Step, Traced (traced runs only), Report, EvalStarted, Evaluated,
                                   CheckpointStarted, CheckpointWritten, then one of Completed, Stopped, Failed

A rank of a data-parallel job talks the same protocol over a TCP connection to the daemon
(``--connect``): it first sends Hello, then receives the plan; ranks other than the leader end
with Finished instead of Completed/Stopped.

One JSON object per line, tagged by ``t``. Each side encodes with ``encode`` and decodes with
``decode_*``: a line that does not fit the schema is an error at the boundary, never a KeyError
deep inside the supervisor. Records shared with the journal (``CheckpointRecord``, ``Metrics``)
are the journal's own types, carried as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec

from ftctl.core.config import Config
from ftctl.events.types import AdapterEvaluated, CheckpointRecord, Metrics, PairStats


class TrainPlan(msgspec.Struct, kw_only=True):
    """What the worker trains: the daemon decides, the worker only carries it out."""

    job_id: str
    job_dir: str
    config: Config
    train_path: str
    valid_path: str | None = None
    resume_from: str | None = None  # a committed checkpoint dir of this job
    warm_start_from: str | None = None  # final checkpoint of the lineage's previous job
    global_step_base: int = 0  # steps of earlier jobs of the lineage
    log_path: str | None = None  # the job log: the worker moves its stdout/stderr there (a standby
    # worker was started, with its own log, before the job was known)
    until_step: int | None = None  # a reproduction (`ftctl reproduce`): stop after this job step
    trace: bool = False  # send a Traced message per step (a reproduction's evidence)
    world_size: int = 1  # ranks of a data-parallel job (adapters/ranks.py); 1 = one process
    backend: str = "any"  # mx.distributed backend of a data-parallel job
    reshard: bool = False  # resume_from may come from another world size (`retry --reshard`)
    resume_manifest_sha256: str | None = None  # every rank checks it loads this very checkpoint
    test_path: str | None = None  # config `test`: the test split scored once training is done
    resume_adapter_file: str | None = None  # config resume_adapter_file: the job's copy of it
    # OpenBLAS threads, decided for the job (core/threads.py); None: the worker measures them at load
    blas_threads: int | None = None


class Message(msgspec.Struct, tag_field="t", frozen=True, kw_only=True):
    pass


class Stop(Message, tag="stop"):
    """Daemon -> worker: checkpoint at the next update boundary and exit (pause, shutdown)."""


class Loaded(Message, tag="loaded"):
    """Model, data, optimizer (and the checkpoint it resumes from) are loaded."""

    step: int
    global_step: int
    load_s: float | None
    blas_threads: int | None = None  # the OpenBLAS threads it trains with (None: no OpenBLAS)
    # measured at this load: ms of the model's matmuls per thread count (a NaN or inf arrives as null)
    blas_ms: dict[str, float | None] | None = None
    blas_others: float | None = None  # other processes' threads running meanwhile (median)


class Step(Message, tag="step"):
    """A training step is done: the heartbeat the hang watchdog listens for."""

    step: int
    global_step: int


class Traced(Message, tag="trace"):
    """One step of a traced run (TrainPlan.trace): sent before the step's loss is checked, so the step
    that diverges is traced too. A float that is not finite travels as "nan", "inf" or "-inf" (a NaN
    float given here anyway arrives as null: not finite either)."""

    step: int
    global_step: int
    loss: float | str | None
    grad_norm: float | str | None  # of this step's raw gradient (before accumulation and clipping)
    lr: float | str | None
    tokens: int
    examples: list[int]  # the batch: indices of the job's training examples (file order)
    lengths: list[int]  # their token lengths (before max_seq_length truncation)
    nonfinite_groups: list[str]  # parameter groups whose gradient is not finite, in model order
    group_count: int  # how many parameter groups the model has


class Report(Message, tag="report"):
    metrics: Metrics
    local_tokens_per_s: float | None = None  # this rank's own tokens/s (a data-parallel job)


class Hello(Message, tag="hello"):
    """A rank of a data-parallel job, connected to the daemon (the first line it sends)."""

    token: str
    rank: int
    pid: int
    host: str


class Finished(Message, tag="finished"):
    """A rank other than the leader ends cleanly: it met the others at the last barrier."""

    step: int


class EvalStarted(Message, tag="eval_begin"):
    """Validation begins: the watchdog allows timeouts.eval_hang_s until it ends."""

    step: int


class Evaluated(Message, tag="eval"):
    step: int
    global_step: int
    val_loss: float | None  # None: not finite (JSON has no NaN: it travels as null)
    eval_s: float | None
    preference: PairStats | None = None  # train_mode dpo / orpo: the validation pairs' figures


class CheckpointStarted(Message, tag="checkpoint_begin"):
    """The step-``step`` arrays are handed to the background writer; training goes on while it writes.
    ``waited_s``: how long the loop first waited for the previous checkpoint's write (at most one is
    in flight), 0 when it was already done."""

    step: int
    global_step: int
    waited_s: float | None = 0.0  # None: not finite (as every float here: JSON has no NaN or inf)


class CheckpointWritten(Message, tag="checkpoint"):
    """The checkpoint folder is durable under its final name: the daemon commits it. Sent by the
    writer thread right after the rename, so Step messages of later steps may come before it."""

    checkpoint: CheckpointRecord


class Completed(Message, tag="completed"):
    """Training ended (at iters, or earlier by early stopping) and the adapter is published from
    ``checkpoint`` (config ``result``: the best or the last)."""

    step: int
    global_step: int
    adapter_path: str
    adapter_sha256: str
    checkpoint: str | None
    result: str = "last"
    result_step: int | None = None
    result_val_loss: float | None = None
    result_note: str = ""
    stopped_early: str | None = None  # early stopping's reason
    best_step: int | None = None
    best_val_loss: float | None = None
    exported_to: str | None = None  # config adapter_path: the adapter is published there too
    export_refused: str | None = (
        None  # why it was not (a folder ftctl did not write appeared there)
    )
    evaluated: AdapterEvaluated | None = (
        None  # config test: the test split, scored (`ftctl eval`'s record)
    )


class Stopped(Message, tag="stopped"):
    """Graceful stop after a Stop: checkpointed at ``step``."""

    step: int
    global_step: int
    checkpoint: str | None


class Failed(Message, tag="error"):
    """The worker is about to exit non-zero. ``category`` is a core.crash crash category."""

    category: str
    message: str
    step: int | None = None
    path: str | None = None  # the checkpoint that failed verification (corrupt_checkpoint)
    fix: str | None = (
        None  # the job's recorded config is the cause: the `key=value` that would load
    )


WorkerMessage = Union[
    Loaded,
    Step,
    Traced,
    Report,
    EvalStarted,
    Evaluated,
    CheckpointStarted,
    CheckpointWritten,
    Completed,
    Stopped,
    Failed,
    Hello,
    Finished,
]

_encoder = msgspec.json.Encoder()
_from_worker = msgspec.json.Decoder(WorkerMessage)
_to_worker = msgspec.json.Decoder(Stop)
_plan = msgspec.json.Decoder(TrainPlan)


class ProtocolError(ValueError):
    """A line that is not a message of this protocol."""


@dataclass(frozen=True)
class Heard:
    """One thing an attempt's channels delivered (``poll`` of a process.Worker or a group.Group, which a
    single worker and a group of ranks share): a rank's ``message``, its channel ``closed`` (the rank
    exited or was killed: the kernel closes its end), a rank ``connected``, or a ``problem`` (a line
    that is not a message, a connection refused; ``rank`` None when no rank is known)."""

    rank: int | None
    message: WorkerMessage | None = None
    closed: bool = False
    connected: bool = False
    problem: str = ""


def heard_lines(rank: int, buf: bytes) -> tuple[list[Heard], bytes]:
    """The whole lines of ``buf`` as ``rank``'s messages (a line that does not decode is a problem, never
    a reason to drop the rank), and what is left of the last, partial line."""
    *lines, rest = buf.split(b"\n")
    out = []
    for line in filter(bytes.strip, lines):
        try:
            out.append(Heard(rank, message=decode_message(line)))
        except ProtocolError as e:
            out.append(Heard(rank, problem=str(e)))
    return out, rest


def encode(msg: Message | TrainPlan) -> bytes:
    """One line (no newline) of JSON."""
    return _encoder.encode(msg)


def _decode(decoder, line: bytes):
    try:
        return decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError) as e:
        raise ProtocolError(f"not a worker protocol message ({e}): {line[:200]!r}") from None


def decode_message(line: bytes) -> WorkerMessage:
    return _decode(_from_worker, line)


def decode_control(line: bytes) -> Stop:
    return _decode(_to_worker, line)


def decode_plan(line: bytes) -> TrainPlan:
    return _decode(_plan, line)
