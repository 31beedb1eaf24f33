"""`ftctl eval`: did fine-tuning help? The job's final adapter and its base model, scored on the same
data (the job's validation split unless a file is given), recorded as one `adapter_evaluated` event.

It runs in the caller's process: a foreground command, like `ftctl consolidate` without a daemon.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ftctl.adapters.checkpoint import adapter_sha256
from ftctl.adapters.fs import UnreadableFile, read_input
from ftctl.adapters.model import model_problem
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.config import features
from ftctl.core.dataset import validate_jsonl
from ftctl.core.state import JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError

from .jobs import find_job


class EvalRefused(UserError):
    """The job cannot be evaluated as asked; nothing was recorded."""


@dataclass(frozen=True)
class Evaluation:
    event: ev.AdapterEvaluated
    seq: int  # where the journal recorded it
    at: str  # when (UTC)
    warnings: list[str] = field(default_factory=list)  # bad lines of the data, skipped


_NO_ADAPTER = {
    "queued": "it is queued: run `ftctl start` and evaluate it once it has completed",
    "training": "it is training: evaluate it once it has completed (`ftctl status {job}`)",
    "checkpointing": "it is training: evaluate it once it has completed (`ftctl status {job}`)",
    "paused": "it is paused: `ftctl resume {job}`, let it complete, then evaluate it",
    "crashed": "it crashed and waits for a restart: evaluate it once it has completed",
}


def default_data(ws: Workspace, j: JobState) -> Path:
    """The job's validation split, as submit copied it into the job."""
    return ws.job_dir(j.job) / "data" / "valid.jsonl"


def evaluate(ws: Workspace, ledger: Ledger, job: str, data: Path | None = None) -> Evaluation:
    """Score the job's adapter and its base model on ``data`` and record the result."""
    from ftctl.adapters.evaluate import score  # MLX: loaded only when a model is really scored

    j = find_job(ledger, job)
    _require_adapter(ws, j)
    path = _data_path(ws, j, data)
    raw = _read(path)
    cfg = j.config
    keys = features(cfg)  # the job's data keys (the *_feature renames), as training read them
    report = validate_jsonl(raw, keys)
    if report.verdict == "reject":
        raise EvalRefused(
            f"{path} cannot be evaluated on: {'; '.join(report.reasons)}. Nothing was recorded; "
            "fix the file (`ftctl submit` checks the same rules) or leave out --data to use the "
            "job's validation split"
        )
    try:
        s = score(
            str(ws.abs(j.base_model)),
            str(ws.abs(j.adapter_path)),
            raw,
            batch_size=cfg.batch_size,
            max_seq_length=cfg.max_seq_length,
            mask_prompt=cfg.mask_prompt and report.format != "text",
            features=keys,
            beta=cfg.beta,
        )
    except ValueError as e:
        raise EvalRefused(f"{path}: {e}; nothing was recorded") from None
    e = ev.AdapterEvaluated(
        job=j.job,
        data_path=ws.rel(path),
        data_sha256=hashlib.sha256(raw).hexdigest(),
        examples=s.examples,
        tokens=s.tokens,
        base_model=j.base_model,
        adapter_path=j.adapter_path,
        adapter_sha256=j.adapter_sha256,
        base_loss=s.base_loss,
        base_ppl=s.base_ppl,
        adapter_loss=s.adapter_loss,
        adapter_ppl=s.adapter_ppl,
        preference=s.pairs,
    )
    rec = ledger.commit(job_stream(j.job), e)[0]
    return Evaluation(e, rec.seq, rec.ts, list(report.reasons))


def _require_adapter(ws: Workspace, j: JobState) -> None:
    """The job's adapter and base model are there and are the ones the journal recorded."""
    if j.state != "completed" or not j.adapter_path:
        why = _NO_ADAPTER.get(
            j.state, "it will never have one (it is {state}): evaluate a completed job"
        )
        raise EvalRefused(
            f"job {j.job} has no adapter yet: " + why.format(job=j.job, state=j.state)
        )
    where = ws.abs(j.adapter_path)
    if not (where / "adapters.safetensors").is_file():
        raise EvalRefused(
            f"job {j.job}'s adapter {where} is missing from disk; nothing to evaluate"
        )
    if adapter_sha256(where) != j.adapter_sha256:
        raise EvalRefused(
            f"job {j.job}'s adapter {where} changed on disk since it was recorded "
            f"(sha256 {j.adapter_sha256[:12]}… in the journal): it is not the job's result"
        )
    problem = model_problem(ws.abs(j.base_model))
    if problem:
        raise EvalRefused(
            f"job {j.job}'s base model cannot load: {problem}. Restore it to evaluate the job"
        )


def _data_path(ws: Workspace, j: JobState, data: Path | None) -> Path:
    if data is not None:
        return Path(data).expanduser().resolve()
    path = default_data(ws, j)
    if not path.is_file():
        raise EvalRefused(
            f"job {j.job} has no validation split ({path}): give a test file with --data FILE"
        )
    return path


def _read(path: Path) -> bytes:
    try:
        return read_input(path, "test data")
    except UnreadableFile as e:
        raise EvalRefused(str(e)) from None
