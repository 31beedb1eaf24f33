"""Submitting data: validate before queuing, copy the data into the job, then commit.

Used by `ftctl submit` and by the daemon's inbox watcher, so both behave the same.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ftctl.adapters.fs import UnreadableFile, read_input, write_durable
from ftctl.adapters.group import problems as group_problems
from ftctl.adapters.model import model_problem
from ftctl.adapters.workspace import Workspace
from ftctl.core.config import Config, config_sha256, job_config, locked_changes
from ftctl.core.dataset import DataReport, validate_jsonl
from ftctl.core.state import job_stream
from ftctl.events import types as ev
from ftctl.events.journal import ConcurrencyError
from ftctl.recovery.ledger import Ledger

from . import models
from .reporter import Note, quiet

_MODEL_FIX = (
    "set `model` in ftctl.yaml (or pass --set model=...) to an mlx-lm model folder, a cached Hugging Face "
    "repo id or a .gguf file, and submit again"
)
HOLDOUT_EVERY = 20  # without --valid, every 20th valid example is held out for validation


class SubmitError(Exception):
    """Submission refused before anything was recorded."""


class DuplicateSubmission(SubmitError):
    """The same data with the same resolved config is already a job; ``--again`` queues it anyway."""

    def __init__(self, message: str, job: str):
        super().__init__(message)
        self.job = job


@dataclass
class Submission:
    job: str
    state: str
    report: DataReport
    valid_report: DataReport | None
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _read(path: Path, what: str) -> bytes:
    try:
        return read_input(path, what)
    except UnreadableFile as e:
        raise SubmitError(f"{e}; nothing was queued") from None


def _problems(report: DataReport, limit: int = 20) -> list[str]:
    return [f"line {p.line}: {p.reason}" for p in report.problems[:limit]]


def held_lines(data: bytes, report: DataReport, batch_size: int) -> set[int]:
    """The lines (1-based) held out for validation when no --valid file is given: every
    HOLDOUT_EVERY-th valid line (deterministic)."""
    bad = {p.line for p in report.problems}
    lines = data.splitlines(keepends=True)
    good = [i for i, l in enumerate(lines, 1) if l.strip() and i not in bad]
    held = set(good[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY])
    if len(held) < batch_size:
        # Too few for one validation batch at every 20th: hold out just enough, from the end.
        held = set(good[-batch_size:]) if len(good) >= 4 * batch_size else set()
    return held


def _split(data: bytes, report: DataReport, batch_size: int) -> tuple[bytes, bytes | None]:
    """(train, validation) of a file submitted without --valid: see held_lines."""
    held = held_lines(data, report, batch_size)
    lines = data.splitlines(keepends=True)
    if not held:
        return data, None
    train = b"".join(
        l if l.endswith(b"\n") else l + b"\n" for i, l in enumerate(lines, 1) if i not in held
    )
    valid = b"".join(
        l if l.endswith(b"\n") else l + b"\n" for i, l in enumerate(lines, 1) if i in held
    )
    return train, valid


def _next_job_id(ledger: Ledger) -> str:
    n = len(ledger.state.jobs) + 1
    while f"{n:04d}" in ledger.state.jobs:
        n += 1
    return f"{n:04d}"


def _lineage_config(ledger: Ledger, lineage: str, cfg: Config) -> Config:
    """Resolve the job's config against its lineage: it trains on the lineage's current base, and
    may not change what shapes an adapter that is not consolidated yet (the config lock)."""
    lin = ledger.state.lineages.get(lineage)
    if lin is None:
        return cfg
    if cfg.model not in (lin.origin_model, lin.base_model):
        raise SubmitError(
            f"lineage {lineage!r} trains on {lin.base_model}, not {cfg.model}. Nothing was queued. A different base "
            f"model starts a new lineage: submit with --lineage NAME"
        )
    cfg = msgspec.structs.replace(cfg, model=lin.base_model)
    chain = [ledger.state.jobs[j] for j in lin.jobs]
    live = [j for j in chain if j.state not in ("rejected", "cancelled", "failed")]
    if live:
        ref = live[-1]
        changed = locked_changes(ref.config, cfg)
        if changed:
            raise SubmitError(
                f"lineage {lineage!r} has an adapter that is not consolidated yet (job {ref.job}, {ref.state}); this "
                f"submission changes what shapes it — {'; '.join(changed)} — which would silently break its warm start "
                "and its fusion. Nothing was queued. Either consolidate first (`ftctl "
                "consolidate`, after the lineage's "
                "jobs finish) so that new jobs start a fresh adapter on the fused base, or start a new lineage "
                "explicitly (`--lineage NAME`)."
            )
    return cfg


def resolve_model(
    ws: Workspace, ledger: Ledger, cfg: Config, note: Note = quiet
) -> tuple[Config, models.Resolved]:
    """``cfg`` with ``model`` as a job records it: a repo id or a GGUF file resolved to the folder it
    names (pinned now), a folder of the workspace relative to it (it moves with the workspace), any
    other folder absolute; and how it was resolved. SubmitError if the model cannot be used."""
    spec = ws.model(cfg.model)  # a relative path names a folder of the workspace (demo/model)
    resolved = models.Resolved(spec)
    if models.needs_resolving(spec):  # a repo id or a GGUF file: the folder it names, pinned now
        try:
            resolved = models.for_job(ws, ledger, spec, note)
        except models.ModelRefused as e:
            raise SubmitError(
                f"the base model cannot be used: {e}. Nothing was queued; {_MODEL_FIX}"
            ) from None
    return msgspec.structs.replace(cfg, model=ws.rel(resolved.path)), resolved


def _duplicate(ledger: Ledger, path: Path, sha: str, valid_sha: str | None, cfg: Config) -> None:
    """Refuse the same data (and validation data) with the same resolved config as a live job."""
    digest = config_sha256(cfg)
    for j in ledger.state.jobs.values():
        if (
            j.state not in ("rejected", "cancelled", "failed")
            and j.data_sha256 == sha
            and j.config_sha256 == digest
            and j.valid_sha256 == valid_sha
        ):
            raise DuplicateSubmission(
                f"{path.name} was already submitted with the same content (sha256 {sha[:12]}…) and the same config "
                f"as job {j.job} ({j.state}); nothing was queued. To train on it again on purpose, submit it with "
                f"--again; to change the run, pass --set KEY=VALUE",
                j.job,
            )


def submit(
    ws: Workspace,
    ledger: Ledger,
    path: Path,
    *,
    name: str | None = None,
    valid: Path | None = None,
    overrides: list[str] = (),
    lineage: str = "main",
    fresh: bool = False,
    again: bool = False,
    note: Note = quiet,
) -> Submission:
    """Validate ``path`` (and ``valid``) and record the job as queued or rejected.

    The same data and validation data with the same resolved config as a job that is not rejected,
    cancelled or failed raises DuplicateSubmission unless ``again``.

    ``model`` may name a folder, a Hugging Face repo id (the job records the cached snapshot's
    folder and commit hash) or a GGUF file (imported into models/imported/ once, kept quantized).

    The data file is never modified. An accepted job gets its own copy of the data under
    jobs/<id>/data/, so editing or deleting the original cannot change what a restart trains on.
    """
    path = Path(path).expanduser().resolve()
    data = _read(path, "data file")
    overrides = list(overrides) + (["warm_start=false"] if fresh else [])
    cfg, warnings = ws.load_config(overrides)
    report = validate_jsonl(data)
    vdata, vreport = None, None
    if valid is not None:
        valid = Path(valid).expanduser().resolve()
        vdata = _read(valid, "validation file")
        vreport = validate_jsonl(vdata)
    name = name or path.stem
    sha = hashlib.sha256(data).hexdigest()

    reasons = list(report.reasons) if report.verdict == "reject" else []
    if vreport is not None and vreport.verdict == "reject":
        reasons += [f"validation file: {r}" for r in vreport.reasons]
    cfg, resolved = resolve_model(ws, ledger, cfg, note)
    cfg = _lineage_config(ledger, lineage, cfg)  # what the job records, and what its sha256 hashes
    problem = model_problem(ws.abs(cfg.model))
    if problem:  # the job would record this path for good: refuse it now, not at `ftctl start`
        raise SubmitError(
            f"the base model cannot load: {problem}. Nothing was queued; {_MODEL_FIX}"
        )
    broken = group_problems(cfg)
    if broken:  # a data-parallel config that cannot launch: refuse it now, not at `ftctl start`
        raise SubmitError(
            f"the distributed config cannot run: {'; '.join(broken)}. Nothing was queued; fix "
            "`distributed` in ftctl.yaml (see docs/distributed.md) and submit again"
        )
    if not reasons and not again:
        _duplicate(
            ledger, path, sha, hashlib.sha256(vdata).hexdigest() if vdata is not None else None, cfg
        )

    for _ in range(10):  # job ids race only with a concurrent submit; the stream version decides
        job = _next_job_id(ledger)
        try:
            if reasons:
                ledger.commit(
                    job_stream(job),
                    ev.JobRejected(
                        job=job,
                        name=name,
                        data_path=ws.rel(path),
                        data_sha256=sha,
                        reasons=reasons,
                        problems=_problems(report) + (_problems(vreport) if vreport else []),
                    ),
                )
                return Submission(job, "rejected", report, vreport, warnings, reasons)
            jdir = ws.job_dir(job) / "data"
            if jdir.parent.exists():  # debris of a submit that died before its event: not a job
                shutil.rmtree(jdir.parent)
            jdir.mkdir(parents=True, mode=0o700)
            if vdata is None:
                train, held = _split(data, report, cfg.batch_size)
                if held is None:
                    warnings.append(
                        "no --valid file and too few examples to hold some out: "
                        "validation loss will not be computed for this job"
                    )
                else:
                    n = held.count(b"\n")
                    warnings.append(
                        f"no --valid file: held out {n} of {report.valid} examples for validation"
                    )
            else:
                train, held = data, vdata
            write_durable(jdir / "train.jsonl", train)
            copies = {"train.jsonl": hashlib.sha256(train).hexdigest()}
            if held is not None:
                write_durable(jdir / "valid.jsonl", held)
                copies["valid.jsonl"] = hashlib.sha256(held).hexdigest()
            if report.verdict == "warn":
                warnings += report.reasons
            if vreport is not None and vreport.verdict == "warn":
                warnings += [f"validation file: {r}" for r in vreport.reasons]
            ledger.commit(
                job_stream(job),
                ev.JobSubmitted(
                    job=job,
                    name=name,
                    data_path=ws.rel(path),
                    data_sha256=sha,
                    data_format=report.format or "",
                    examples=report.valid - report.undesirable,
                    valid_path=ws.rel(valid)
                    if valid
                    else (ws.rel(jdir / "valid.jsonl") if held is not None else None),
                    valid_sha256=hashlib.sha256(vdata).hexdigest() if vdata is not None else None,
                    config=job_config(cfg),
                    config_sha256=config_sha256(cfg),
                    lineage=lineage,
                    warnings=warnings,
                    overrides=overrides,
                    copies=copies,
                    model_repo=resolved.repo,
                    model_revision=resolved.revision,
                ),
            )
            return Submission(job, "queued", report, vreport, warnings)
        except ConcurrencyError:
            continue
    raise SubmitError(
        "could not allocate a job id: other submissions kept racing; nothing was queued — retry"
    )
