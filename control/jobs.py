"""User requests on jobs and the daemon: pause, resume, cancel, shutdown — each one event.

A running job's pause or cancel is a ``control_requested`` event the daemon acts on (it owns the
worker); any other job takes the transition itself. Both work with no daemon running: a request
for a job a dead daemon left `training` is applied by the recovery of the next `ftctl start`.
Whether a daemon runs is asked of the lock (``process.lock_holder``), never of the journal alone:
a SIGKILLed daemon leaves the journal saying it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ftctl.adapters import process
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.config import Config
from ftctl.core.machine import ACTIVE
from ftctl.core.state import DAEMON_STREAM, JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError


def find_job(ledger: Ledger, job: str) -> JobState:
    """A job by id; "7" finds "0007"."""
    j = ledger.state.jobs.get(job) or ledger.state.jobs.get(job.zfill(4))
    if j is None:
        known = ", ".join(list(ledger.state.jobs)[-5:]) or "none yet"
        raise UserError(
            f"no job {job!r} in this workspace (recent jobs: {known}); see `ftctl status`"
        )
    return j


@dataclass(frozen=True)
class Outcome:
    job: str
    action: str  # "pause" | "resume" | "retry" | "cancel"
    event: str  # the event committed: "paused", "resumed", "cancelled" or "control_requested"
    deferred: bool  # True: the daemon carries it out (the job is training)
    # False: no daemon holds the lock; a deferred request waits for `ftctl start`
    daemon_alive: bool = True
    changes: tuple[str, ...] = ()  # retry --set: "key: old -> new"
    effect: str = ""  # retry: where it continues from, and whether bit-exact


def daemon_alive(ws: Workspace) -> bool:
    """A daemon holds the workspace's lock now (the journal's word is not enough: see above)."""
    return process.lock_holder(ws.lock_path) is not None


def request(
    ledger: Ledger, job: str, action: str, ws: Workspace | None = None, reshard: bool = False
) -> Outcome:
    """Pause, resume, retry or cancel a job. An illegal request raises IllegalTransition (or
    UserError), appending nothing.
    With ``ws``, the outcome says whether a daemon is alive to act on it."""
    j = find_job(ledger, job)
    stream = job_stream(j.job)
    if action == "resume":
        e = ev.Resumed(job=j.job)
    elif action == "retry":
        if j.state != "failed":
            raise UserError(
                f"job {j.job} is {j.state!r}: only a failed job can be retried as it is"
                + (
                    f" (`ftctl resume {j.job}` queues a paused one; `ftctl retry {j.job} --set "
                    "KEY=VALUE` changes its config and queues it)"
                    if j.state == "paused"
                    else ""
                )
            )
        good = j.good_checkpoints()
        e = ev.Retried(
            job=j.job,
            reason=f"retried by user: resumes from step {good[-1].step if good else 0} "
            "with a fresh restart budget" + (", resharded" if reshard else ""),
            reshard=reshard,
        )
    elif j.state in ACTIVE:
        e = ev.ControlRequested(job=j.job, action=action)
    elif action == "pause":
        e = ev.Paused(job=j.job, reason="paused by user")
    elif action == "cancel":
        e = ev.Cancelled(job=j.job, reason="cancelled by user")
    else:
        raise ValueError(f"unknown action {action!r}")
    ledger.commit(stream, e)
    alive = daemon_alive(ws) if ws is not None else ledger.state.daemon.running
    return Outcome(j.job, action, type(e).kind(), isinstance(e, ev.ControlRequested), alive)


def shutdown(ledger: Ledger, ws: Workspace | None = None) -> bool:
    """Ask the running daemon to checkpoint and exit. False, appending nothing, if none runs: the
    journal says so or (with ``ws``) nobody holds the lock (a request to a dead daemon would be
    read by no one: the next daemon starts with it cleared)."""
    if not ledger.state.daemon.running or (ws is not None and not daemon_alive(ws)):
        return False
    ledger.commit(DAEMON_STREAM, ev.ShutdownRequested(reason="ftctl shutdown"))
    return True


OUTCOMES = ("completed", "failed", "paused")


def outcomes_since(ledger: Ledger, seq: int) -> dict[str, list[str]]:
    """The jobs that completed, failed or were paused after journal position ``seq`` (for a run's summary)."""
    out: dict[str, list[str]] = {k: [] for k in OUTCOMES}
    for r in ledger.journal.read(after=seq):
        kind = type(r.event).kind()
        if kind in out and r.event.job not in out[kind]:
            out[kind].append(r.event.job)
    return out


def wait_stopped(ledger: Ledger, timeout_s: float, ws: Workspace | None = None) -> bool:
    """Wait until the journal records that the daemon stopped (or, with ``ws``, until nobody holds
    its lock: a daemon killed meanwhile records nothing); False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        ledger.refresh()
        if not ledger.state.daemon.running or (ws is not None and not daemon_alive(ws)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _by_epochs(ws: Workspace, j: JobState, cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` of a job trained by ``epochs``, with ``iters`` derived again (as submit derives it) from
    the training data the job holds: a new epochs or batch_size moves them. UserError for --set iters
    (epochs decide them) or a batch larger than the data."""
    from ftctl.core.config import ConfigError, features, override_key, resolve_epochs

    from .submit import _examples

    if any(override_key(o) == "iters" for o in overrides):
        raise UserError(
            f"job {j.job} trains by epochs = {cfg.epochs}, which decide its iters: --set epochs=N "
            "instead (or epochs=null together with iters=N). Nothing was changed"
        )
    train = (ws.job_dir(j.job) / "data" / "train.jsonl").read_bytes()
    try:
        return resolve_epochs(cfg, _examples(train, features(cfg)))
    except ConfigError as e:
        raise UserError(f"{e}. Nothing was changed") from None


def retry(
    ws: Workspace, ledger: Ledger, job: str, overrides: list[str], reshard: bool = False
) -> Outcome:
    """`ftctl retry JOB --set key=value…`: change a failed or paused job's recorded config (validated
    as submit validates --set) and queue it, with a fresh restart budget. Recorded as one ``retried``
    event with the new config and its sha256. Where the change allows it the job resumes from its last
    good checkpoint — bit-exact when only keys that change nothing it computes changed (core.config
    NEUTRAL_KEYS); a key a checkpoint cannot be resumed under (RESTART_KEYS: the adapter's shape, the
    model, the optimizer, the seed) only for a job that has no checkpoint and no warm start: it starts
    from step 0. Otherwise UserError, naming the way out; nothing is recorded."""
    from ftctl.adapters.group import problems as group_problems
    from ftctl.adapters.model import model_problem
    from ftctl.core.config import (
        DAEMON_KEYS,
        config_changes,
        config_sha256,
        job_config,
        override_key,
        with_overrides,
    )

    from .submit import SubmitError, resolve_model

    j = find_job(ledger, job)
    if j.state not in ("failed", "paused"):
        raise UserError(
            f"job {j.job} is {j.state!r}: only a failed or paused job's config can be changed by "
            "`ftctl retry --set`"
            + (
                f" (pause it first: `ftctl pause {j.job}`)"
                if j.state in ACTIVE | {"queued"}
                else ""
            )
        )
    for item in overrides:
        key = override_key(item) or ""
        if key.split(".")[0] in DAEMON_KEYS:
            raise UserError(
                f"--set {item}: {key.split('.')[0]} is the daemon's setting, not a job's: edit it in "
                "ftctl.yaml (the daemon reads it at its start). Nothing was changed"
            )
    cfg, _ = with_overrides(
        job_config(j.config), overrides, source=f"job {j.job}'s recorded config"
    )
    try:
        cfg = resolve_model(ws, ledger, cfg)[0] if cfg.model != j.config.model else cfg
    except SubmitError as e:
        raise UserError(str(e).replace("Nothing was queued", "Nothing was changed")) from None
    problem = model_problem(ws.abs(cfg.model))
    if problem:
        raise UserError(f"the base model cannot load: {problem}. Nothing was changed")
    if (
        cfg.epochs is not None
    ):  # trained by epochs: iters follow them, on the job's own training data
        cfg = _by_epochs(ws, j, cfg, overrides)
    broken = group_problems(cfg)
    if broken:
        raise UserError(
            f"the distributed config cannot run: {'; '.join(broken)}. Nothing was changed"
        )
    changes = config_changes(j.config, cfg)
    if not changes:
        raise UserError(
            f"--set {' '.join(overrides)} changes nothing in job {j.job}'s recorded config; nothing "
            f"was changed (`ftctl resume {j.job}` / `ftctl retry {j.job}` queue it as it is)"
        )
    good = j.good_checkpoints()
    shape = [c for c in changes if c.effect == "restart"]
    listed = "; ".join(map(str, changes))
    if shape and (j.checkpoints or j.warm_start_from):
        held = (
            f"committed checkpoints (the last at step {j.checkpoints[-1].step})"
            if j.checkpoints
            else f"a warm start from job {j.parent_job or '?'}'s adapter"
        )
        raise UserError(
            f"job {j.job} has {held} made under its current "
            f"{', '.join(c.key for c in shape)}, and a checkpoint cannot be resumed under "
            f"{'; '.join(map(str, shape))} (the adapter's shape, its optimizer state or its data order "
            f"differ). Nothing was changed. To train with it: `ftctl cancel {j.job}` (its checkpoints "
            f"stay on disk) and submit the data again with "
            + " ".join(f"--set {o}" for o in overrides)
        )
    if good and cfg.iters < good[-1].step:
        raise UserError(
            f"iters = {cfg.iters} is below the step-{good[-1].step} checkpoint job {j.job} resumes from; "
            "nothing was changed"
        )
    start = good[-1].step if good else 0
    if shape:
        effect = (
            f"it starts from step 0 ({', '.join(c.key for c in shape)} "
            "changes what a checkpoint holds; it has none to resume anyway)"
        )
    elif all(c.effect == "neutral" for c in changes):
        effect = (
            f"it resumes from step {start}, bit-exact: the changed keys change nothing it computes"
        )
    else:
        moved = ", ".join(c.key for c in changes if c.effect == "trajectory")
        effect = (
            f"it resumes from step {start} and follows the new {moved} from there: deterministic, "
            "not the trajectory the old value would have trained"
            if start
            else f"it starts from step 0 with the new {moved}"
        )
    e = ev.Retried(
        job=j.job,
        reason=f"retried by user with {listed}: {effect}; a fresh restart budget"
        + (", resharded" if reshard else ""),
        reshard=reshard,
        config=job_config(cfg),
        config_sha256=config_sha256(cfg),
        overrides=list(overrides),
        changes=[str(c) for c in changes],
    )
    ledger.commit(job_stream(j.job), e)
    return Outcome(
        j.job,
        "retry",
        "retried",
        False,
        daemon_alive(ws),
        tuple(str(c) for c in changes),
        effect,
    )
