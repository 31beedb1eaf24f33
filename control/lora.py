"""`ftctl lora`: mlx_lm.lora's command line and -c file, run as an ftctl job.

The config is mlx_lm.lora's: its flags over its -c file over its defaults (MLX_LM_DEFAULTS), the same
precedence and the same defaults, so the same command line trains the same run. What mlx-lm does not
have — retention, restart, timeouts, blas, … — comes from the workspace's ftctl.yaml (when there is
one), the -c file or ``--set``; ftctl.yaml's mlx-lm keys do not reach a `ftctl lora` run, since the
command line must mean what it means to mlx_lm.lora.

The run is a job: submitted (the workspace created on first use), then trained by the daemon this
command runs in the foreground — or, when one already runs, by that daemon while this command follows
the job from the journal. The same command again finds the same job (same data, same config) and
resumes it instead of queueing it twice.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftctl.adapters import protocol as P
from ftctl.adapters.checkpoint import ADAPTERS
from ftctl.adapters.workspace import Workspace, read_mapping
from ftctl.core.config import (
    MLX_LM_DEFAULTS,
    MLX_LM_FILE_ONLY,
    MLX_LM_LORA_DEFAULTS,
    Config,
    ConfigError,
    decode_config,
    features,
    merge_overrides,
    override_key,
)
from ftctl.core.machine import ACTIVE
from ftctl.core.state import JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.types import Metrics

from . import jobs, models
from .ledger import Ledger
from .reporter import Reporter
from .standby import Standby
from .submit import DuplicateSubmission, Submission, read_source, submit

# mlx_lm.lora's keys, and mlx-lm-lora's preference keys (MLX_LM_LORA_DEFAULTS, the *_feature of its
# pairs): what the command line, the -c file and their defaults decide, never ftctl.yaml
MLX_LM_KEYS = (
    frozenset(MLX_LM_DEFAULTS)
    | frozenset(MLX_LM_FILE_ONLY)
    | frozenset(MLX_LM_LORA_DEFAULTS)
    | {"chosen_feature", "rejected_feature", "system_feature"}
)
UNFINISHED = ("queued", "crashed", "paused", *ACTIVE)
POLL_S = 0.5


class LoraRefused(UserError):
    """`ftctl lora` will not run as asked."""

    kept = "nothing was queued"


def resolve(
    ws: Workspace,
    flags: dict,
    file: Path | None = None,
    sets: list[str] = (),
    cwd: Path | None = None,
) -> tuple[Config, list[str]]:
    """The run's config: ``flags`` (the mlx-lm flags given, by config key) over the -c ``file`` over
    mlx_lm.lora's defaults; ftctl's own keys from ftctl.yaml (if the workspace has one) under the
    file; ``sets`` (``--set k=v``) over everything. A ConfigError names where the bad value came from."""
    sources: dict[str, str] = {}

    def layer(mapping: dict, source: str) -> dict:
        sources.update({k: source for k in mapping})
        return mapping

    own: dict = {}
    if ws.config_path.is_file():
        own = {k: v for k, v in ws.read_config_dict().items() if k not in MLX_LM_KEYS}
    filed = read_mapping(file) if file is not None else {}
    if file is not None and filed.get("config") is not None:
        named = (Path(cwd or Path.cwd()) / Path(str(filed["config"])).expanduser()).resolve()
        if named == Path(file).resolve():  # the file naming itself: what mlx-lm's example does
            filed = {k: v for k, v in filed.items() if k != "config"}
    data = {
        **layer(own, str(ws.config_path)),
        **layer(dict(MLX_LM_DEFAULTS), "mlx_lm.lora's default"),
        **layer(dict(MLX_LM_LORA_DEFAULTS), "mlx-lm-lora's default"),
        **layer(filed, str(file)),
        **layer(flags, "the command line"),
    }
    if "hf_dataset" in {**filed, **flags} and "data" not in {**filed, **flags}:
        data.pop("data")  # mlx-lm's default dataset name is not a second data source
    data = merge_overrides(data, list(sets))
    for s in sets:
        sources[(override_key(s) or "").split(".")[0]] = f"--set {s}"
    try:
        return decode_config(data, source="ftctl lora")
    except ConfigError as e:
        top = e.key.split(".")[0].split("[")[0]
        where = sources.get(top, "ftctl lora")
        raise ConfigError(
            e.what.replace("ftctl lora:", f"{where}:", 1),
            key=e.key,
            value=e.value,
            allowed=e.allowed,
            kept="nothing was queued or written"
            + ("" if ws.exists() else f" (no workspace was created at {ws.home})"),
            do=e.do or f"correct {e.key or 'the value'} in {where} and run the command again",
        ) from None


def ensure_workspace(ws: Workspace, cfg: Config, note) -> Workspace:
    """The workspace, created on first use for the run's model (no questions asked)."""
    if ws.exists():
        return ws
    from .setup import init

    made, model = init(ws.home, cfg.model, note=note)
    note(f"created the workspace {made.home} (ftctl.yaml for {model}, journal, jobs/, logs/)")
    return made


def own_daemon(ws: Workspace, cfg: Config, report: Reporter, spare: Standby | None = None):
    """The daemon this command will run (None: one already runs on the workspace, and the job is
    followed under it). It keeps ``spare``, the worker the command started first thing
    (control/standby.py early: its imports, most of a worker's start, overlap the config, the
    submission and the daemon's start; the job takes it), or one started now on the BLAS the config
    chose. A job that keeps no spare (``standby: false``, data-parallel) gets a worker of its own."""
    from .daemon import Daemon

    if jobs.daemon_alive(ws):
        if spare is not None:
            spare.dismiss()
        return None
    daemon = Daemon(ws, report=report, standby=spare)
    if cfg.standby and cfg.distributed is None:
        from ftctl.adapters import blas

        daemon.standby.ensure(blas.choose(cfg.blas).env)
    else:
        daemon.standby.dismiss()
    return daemon


@dataclass
class Queued:
    job: str
    how: str  # "queued" | "resumed" (an earlier run of the same command) | "done" | "rejected"
    submission: Submission | None = None


def queue(
    ws: Workspace, cfg: Config, warnings: list[str], *, lineage: str | None, again: bool, note
) -> Queued:
    """Submit the run, or find the job an earlier run of the same command left (same data, same
    config): unfinished, it is resumed (a paused one queued again); completed, it is the result."""
    ledger = Ledger(ws.open_journal())
    try:
        try:
            sub = submit(
                ws, ledger, None, config=(cfg, warnings), lineage=lineage, again=again, note=note
            )
        except DuplicateSubmission as e:
            j = ledger.state.jobs[e.job]
            if j.state == "completed":
                return Queued(j.job, "done")
            if j.state == "paused":
                jobs.request(ledger, j.job, "resume")
            return Queued(j.job, "resumed")
        return Queued(sub.job, sub.state, sub)
    finally:
        ledger.close()


def job(ws: Workspace, job_id: str) -> JobState:
    ledger = Ledger(ws.open_journal(), write_snapshots=False)
    try:
        return ledger.state.jobs[job_id]
    finally:
        ledger.close()


def follow(
    ws: Workspace, job_id: str, report: Reporter, interrupted: Callable[[], bool]
) -> JobState:
    """Follow a job another daemon trains, from the journal, until it is done or stops; the progress
    goes to ``report`` as the worker's own messages would. ``interrupted()`` true: the job is paused
    (a checkpoint first, as Ctrl-C under `ftctl start`), and this waits until it is."""
    ledger = Ledger(ws.open_journal(), write_snapshots=False)
    try:
        seen_seq, paused_asked = ledger.state.seq, False
        rows = ledger.journal.metric_rows(job_id)
        metric_id = rows[-1][0] if rows else 0
        j = ledger.state.jobs[job_id]
        training = j.state in ACTIVE
        if training:  # it trains already: the bar starts where it is
            report.training(job_id, j.name, j.config.iters)
        while True:
            ledger.refresh()
            j = ledger.state.jobs[job_id]
            for r in ledger.journal.read(after=seen_seq, stream=job_stream(job_id)):
                e, seen_seq = r.event, r.seq
                if isinstance(e, ev.TrainingStarted):
                    training = True
                    report.training(job_id, j.name, j.config.iters)
                elif isinstance(e, ev.Evaluated):
                    report.progress(
                        job_id,
                        P.Evaluated(
                            step=e.step,
                            global_step=e.global_step,
                            val_loss=e.val_loss,
                            eval_s=None,
                            preference=e.preference,
                        ),
                    )
                elif isinstance(e, ev.CheckpointCommitted):
                    report.progress(job_id, P.CheckpointWritten(checkpoint=e.checkpoint))
                elif type(e).kind() in (
                    "crashed",
                    "paused",
                    "failed",
                    "completed",
                    "interrupted",
                    "restart_planned",
                    "cancelled",
                ):
                    if training:
                        report.training_ended(job_id)
                        training = False
                    report.note(
                        f"job {job_id}: {type(e).kind()}"
                        + (f": {e.reason}" if getattr(e, "reason", "") else "")
                        + (f" ({e.guard} guard): {e.evidence}" if getattr(e, "guard", "") else "")
                    )
            for row in ledger.journal.metric_rows(job_id, metric_id):
                metric_id = row[0]
                if training:
                    report.progress(
                        job_id, P.Report(metrics=Metrics(**dict(zip(_METRIC_KEYS, row[2:]))))
                    )
            if (
                j.state not in UNFINISHED or j.state == "paused"
            ):  # paused: by us, or by someone else
                return j
            if interrupted() and not paused_asked:
                paused_asked = True
                report.note(f"job {job_id}: pausing (the daemon checkpoints it first)")
                jobs.request(ledger, job_id, "pause")
            time.sleep(POLL_S)
    finally:
        ledger.close()


_METRIC_KEYS = Metrics.__struct_fields__  # the order of Journal.metric_rows' columns after (id, ts)


@dataclass
class TestOnly:
    event: ev.AdapterEvaluated
    recorded_on: str | None  # the job whose adapter it is, where the result was recorded
    seq: int | None
    warnings: list[str]


def test_only(ws: Workspace, cfg: Config, cwd: Path | None = None) -> TestOnly:
    """mlx_lm.lora --test without --train: score the adapter at adapter_path (and the base model) on
    the test split. Recorded like `ftctl eval` on the job that produced that adapter, when one of
    this workspace did (same sha256); printed either way."""
    from ftctl.adapters.evaluate import score  # MLX: loaded only when a model is really scored

    cwd = Path(cwd or Path.cwd())
    if cfg.adapter_path is None:
        raise LoraRefused("--test without --train scores the adapter at --adapter-path: name one")
    adapter = (cwd / Path(cfg.adapter_path).expanduser()).resolve()
    if not (adapter / ADAPTERS).is_file() or not (adapter / "adapter_config.json").is_file():
        raise LoraRefused(
            f"--test without --train scores the adapter at {adapter}, but it holds no "
            f"{ADAPTERS} and adapter_config.json (mlx-lm's layout): train first, or name another --adapter-path"
        )
    try:
        model = models.resolve(ws.model(cfg.model)).path
    except models.ModelRefused as e:
        raise LoraRefused(f"the base model cannot be used: {e}") from None
    src = read_source(None, None, cfg, cwd)
    if src.test is None:
        raise LoraRefused(
            f"--test: {src.path} has no test split (test.jsonl in the folder, or hf_dataset's test_split)"
        )
    from ftctl.core.dataset import validate_jsonl

    r = validate_jsonl(src.test, features(cfg))
    if r.verdict == "reject":
        raise LoraRefused(f"the test split {src.labels.get('test')}: {'; '.join(r.reasons)}")
    s = score(
        model,
        str(adapter),
        src.test,
        batch_size=cfg.batch_size,
        max_seq_length=cfg.max_seq_length,
        mask_prompt=cfg.mask_prompt,
        features=features(cfg),
        num_batches=cfg.test_batches,
        trust_remote_code=cfg.trust_remote_code,
        beta=cfg.beta,
    )
    sha = hashlib.sha256((adapter / ADAPTERS).read_bytes()).hexdigest()
    ledger = Ledger(ws.open_journal()) if ws.exists() else None
    try:
        owner = (
            next(
                (
                    j
                    for j in ledger.state.jobs.values()
                    if j.state == "completed" and j.adapter_sha256 == sha
                ),
                None,
            )
            if ledger
            else None
        )
        e = ev.AdapterEvaluated(
            job=owner.job if owner else "",
            data_path=ws.rel(src.labels.get("test", src.path)),
            data_sha256=hashlib.sha256(src.test).hexdigest(),
            examples=s.examples,
            tokens=s.tokens,
            base_model=ws.rel(model),
            adapter_path=ws.rel(adapter),
            adapter_sha256=sha,
            base_loss=s.base_loss,
            base_ppl=s.base_ppl,
            adapter_loss=s.adapter_loss,
            adapter_ppl=s.adapter_ppl,
            preference=s.pairs,
        )
        seq = ledger.commit(job_stream(owner.job), e)[0].seq if owner else None
        return TestOnly(e, owner.job if owner else None, seq, list(r.reasons))
    finally:
        if ledger is not None:
            ledger.close()
