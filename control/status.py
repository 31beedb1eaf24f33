"""`ftctl status` as a query: what the journal says, checked against the world, and what it means now.

The journal records what the daemon last wrote; a SIGKILLed daemon writes nothing more, so the
journal alone would keep saying "running" and "training" forever. The daemon lock tells the truth
(the kernel drops an flock when its holder dies), so every answer here starts from that probe.
Nothing here writes: looking at a workspace never changes it (recovery is `ftctl start`'s job).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ftctl.adapters import process
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.config import epoch_of
from ftctl.core.crash import resumes_from
from ftctl.core.machine import ACTIVE
from ftctl.core.state import JobState, LineageState, Projection, job_stream
from ftctl.events.types import ts_epoch

from .inbox import inbox_pending
from .jobs import find_job

DEFAULT_LIMIT = 20  # jobs shown by default (beside every unfinished one)
UNFINISHED = ACTIVE | {"queued", "paused"}  # always shown by default
ETA_REPORTS = 10  # reports of the current attempt the step rate is measured over
# the backoff clause of core.crash.after_crash's requeue reason
_DELAY = re.compile(r", in [0-9.e+-]+ s$")


@dataclass(frozen=True)
class DaemonView:
    alive: bool  # the lock probe: a process holds run/daemon.lock now
    recorded: bool  # the journal says a daemon runs (it records no death it did not see)
    holder: str | None  # what the lock file says about its holder
    pid: int | None
    host: str
    started_at: str
    shutdown_requested: bool
    last_entry_at: str | None  # the journal's newest event or metrics row
    summary: str  # one sentence for people
    # the live daemon's spare worker: pid, started_at, rss_bytes, measured_at
    standby: dict | None = None
    # the power assertion of the training job (adapters/power.py): held, command, pid, note
    power: dict | None = None

    @property
    def running(self) -> bool:
        return self.alive and self.recorded

    @property
    def died(self) -> bool:
        """The journal says it runs but nobody holds the lock: it was killed without recording its stop."""
        return self.recorded and not self.alive


@dataclass(frozen=True)
class JobView:
    job: JobState
    metrics: dict | None  # the job's last report (of any attempt)
    live_step: int  # where training is now: the last report of this attempt, else the checkpoint
    live_global_step: int
    stale: bool  # the journal says training/checkpointing, but no daemon supervises it
    note: str  # what is true now (stale reasons dropped)
    eta_s: float | None  # seconds left, for a job training under a live daemon
    eta_basis: str | None  # how eta_s was computed

    @property
    def epoch(self) -> str | None:
        """'2/3': the epoch live_step is in, for a job trained by `epochs` (else None)."""
        e = epoch_of(self.job.config, self.live_step) if self.job.config else None
        return f"{e[0]}/{e[1]}" if e else None


@dataclass(frozen=True)
class Status:
    seq: int
    daemon: DaemonView
    jobs: list[JobView]  # the selected jobs, in submission order
    # why -> how many jobs the selection left out ("rejected", "older", "other states")
    hidden: dict[str, int]
    projection: Projection
    inbox: list[dict]  # files waiting in inbox/ and what happens to each (control.inbox)


def daemon_view(ws: Workspace, ledger: Ledger) -> DaemonView:
    d = ledger.state.daemon
    holder = process.lock_holder(ws.lock_path)
    alive = holder is not None
    pid = d.process.pid if d.process else None
    last = ledger.journal.last_ts()
    since = f"{d.started_at[:19].replace('T', ' ')} UTC"
    spare = awake = None
    if alive and d.running:
        summary = f"pid {pid} on {d.host} since {since}" + (
            ", shutting down" if d.shutdown_requested else ""
        )
        spare = _standby(ws)
        if spare:
            summary += (
                f", standby worker pid {spare['pid']} ({spare['rss_bytes'] / 1e6:.0f} MB RSS)"
            )
        awake = _power(ws)
        if awake and awake.get("held"):
            summary += (
                f", keeping the machine awake ({Path(awake['command'][0]).name} pid {awake['pid']})"
            )
        elif awake:
            summary += f", NOT keeping the machine awake: {awake.get('note', '')}"
    elif d.running:
        summary = (
            f"not running: daemon pid {pid} on {d.host} (started {since}) died without recording its stop; "
            f"the journal's last entry is from {_when(last)}. `ftctl start` recovers and carries on"
        )
    elif alive:
        summary = (
            f"the daemon lock is held ({holder}) but no running daemon is recorded yet: "
            "a daemon is starting, or `ftctl recover` / `ftctl doctor --fix` is running"
        )
    else:
        summary = "not running"
    return DaemonView(
        alive=alive,
        recorded=d.running,
        holder=holder,
        pid=pid,
        host=d.host,
        started_at=d.started_at,
        shutdown_requested=d.shutdown_requested,
        last_entry_at=last,
        summary=summary,
        standby=spare,
        power=awake if alive and d.running else None,
    )


def _power(ws: Workspace) -> dict | None:
    """The power assertion the daemon holds for the training job (run/power.json), checked alive."""
    from ftctl.adapters.power import read_state
    from ftctl.events.types import ProcessId

    s = read_state(ws.lock_path.parent)
    if not s or not s.get("held"):
        return s
    try:
        if process.alive(ProcessId(int(s["pid"]), float(s["started_at"]))):
            return s
    except (KeyError, TypeError, ValueError):
        pass
    return {**s, "held": False, "note": "its process is gone"}


def _standby(ws: Workspace) -> dict | None:
    """What the daemon wrote about its spare worker (control/standby.py), if that process still lives."""
    from ftctl.events.types import ProcessId

    from .standby import read_state

    s = read_state(ws)
    try:
        return s if s and process.alive(ProcessId(int(s["pid"]), float(s["started_at"]))) else None
    except (KeyError, TypeError, ValueError):
        return None


def status(
    ws: Workspace,
    ledger: Ledger,
    states: Iterable[str] = (),
    everything: bool = False,
    limit: int = DEFAULT_LIMIT,
    now: float | None = None,
) -> Status:
    """Every job (``everything``), the jobs in ``states``, or by default: no rejected submission,
    and past ``limit`` jobs only the last ``limit`` plus every unfinished one."""
    now = time.time() if now is None else now
    d = daemon_view(ws, ledger)
    metrics = ledger.journal.last_metrics()
    shown, hidden = select(list(ledger.state.jobs.values()), set(states), everything, limit)
    views = [_view(ws, ledger, j, metrics.get(j.job), d, now) for j in shown]
    return Status(ledger.state.seq, d, views, hidden, ledger.state, inbox_pending(ws, d.alive))


def job_status(
    ws: Workspace, ledger: Ledger, job: str, now: float | None = None
) -> tuple[DaemonView, JobView]:
    j = find_job(ledger, job)
    d = daemon_view(ws, ledger)
    return d, _view(
        ws,
        ledger,
        j,
        ledger.journal.last_metrics().get(j.job),
        d,
        time.time() if now is None else now,
    )


def located(ws: Workspace, j: JobState) -> JobState:
    """The job with the paths its events recorded (relative to the workspace: docs/architecture.md)
    made absolute against where the workspace is now: what `status` shows, so that every path it
    prints can be used as it is (`mlx_lm.generate --adapter-path …`)."""
    at = lambda p: str(ws.abs(p)) if p else p  # noqa: E731
    return msgspec.structs.replace(
        j,
        data_path=at(j.data_path),
        valid_path=at(j.valid_path),
        base_model=at(j.base_model),
        warm_start_from=at(j.warm_start_from),
        adapter_path=at(j.adapter_path),
        result_checkpoint=at(j.result_checkpoint),
        checkpoints=[msgspec.structs.replace(c, path=at(c.path)) for c in j.checkpoints],
        corrupt={at(k): v for k, v in j.corrupt.items()},
    )


def located_lineage(ws: Workspace, lin: LineageState) -> LineageState:
    """A lineage with its base models' paths absolute against where the workspace is now (as ``located``)."""
    return msgspec.structs.replace(
        lin,
        base_model=str(ws.abs(lin.base_model)) if lin.base_model else "",
        origin_model=str(ws.abs(lin.origin_model)) if lin.origin_model else "",
        models=[msgspec.structs.replace(m, path=str(ws.abs(m.path))) for m in lin.models],
    )


def select(
    jobs: list[JobState], states: set[str], everything: bool, limit: int
) -> tuple[list[JobState], dict[str, int]]:
    if everything:
        return jobs, {}
    if states:
        shown = [j for j in jobs if j.state in states]
        return shown, ({"other states": len(jobs) - len(shown)} if len(shown) < len(jobs) else {})
    kept = [j for j in jobs if j.state != "rejected"]
    hidden = {"rejected": len(jobs) - len(kept)}
    if len(kept) > limit:
        recent = {j.job for j in kept[-limit:]}
        shown = [j for j in kept if j.job in recent or j.state in UNFINISHED]
        hidden["older"] = len(kept) - len(shown)
        kept = shown
    return kept, {k: n for k, n in hidden.items() if n}


# --------------------------------------------------------------------------- one job


def _view(
    ws: Workspace, ledger: Ledger, j: JobState, m: dict | None, d: DaemonView, now: float
) -> JobView:
    live, gstep, reports = j.step, j.global_step, []
    if j.state in ACTIVE:
        # Reports of an earlier attempt are past steps that were lost with it: only this attempt's count.
        started = ledger.journal.last_ts(job_stream(j.job), "training_started") or ""
        reports = ledger.journal.recent_metrics(j.job, since_ts=started, limit=ETA_REPORTS)
        if reports and reports[-1]["step"] > j.step:
            live, gstep = reports[-1]["step"], reports[-1]["global_step"]
    stale = j.state in ACTIVE and not d.alive
    eta, basis = _eta(j, live, reports, now) if j.state in ACTIVE and d.alive else (None, None)
    return JobView(
        job=located(ws, j),
        metrics=m,
        live_step=live,
        live_global_step=gstep,
        stale=stale,
        note=_with_env(j, _note(j, d, live, now)),
        eta_s=eta,
        eta_basis=basis,
    )


def _note(j: JobState, d: DaemonView, live: int, now: float) -> str:
    good = j.good_checkpoints()
    resume = good[-1].step if good else None
    if j.state in ACTIVE and not d.alive:
        then = {
            "cancel": "it is cancelled (you asked to)",
            "pause": "it is paused (you asked to)",
        }.get(j.requested or "", resumes_from(resume))
        orphan = ""
        if j.worker is not None and process.alive(j.worker):
            orphan = f"; its worker pid {j.worker.pid} still runs unsupervised (`ftctl start` stops it first)"
        return f"the daemon died while this job was {j.state} at step {live}: on `ftctl start` {then}{orphan}"
    if j.state in ACTIVE:  # its reason is the requeue that preceded this attempt: no longer true
        return (
            f"{j.requested} requested: the daemon acts on it within a second" if j.requested else ""
        )
    if j.state == "queued" and j.not_before:
        reason = _DELAY.sub("", j.reason)
        return reason + (f", in {j.not_before - now:.0f} s" if j.not_before > now else "")
    if j.state == "completed" and not j.reason:
        if not j.adapter_sha256:
            return ""
        early = f"; stopped early at step {j.step}" if j.stopped_early else ""
        return f"adapter {j.adapter_sha256[:12]} {describe_result(j)}{early}"
    return j.reason


def describe_result(r) -> str:
    """Which checkpoint a completion published, in words: 'from step 30 (best: val loss 1.2345)'.
    ``r``: a Completed message or event, or a JobState (result, result_step, result_val_loss)."""
    val = f": val loss {r.result_val_loss:.4f}" if r.result_val_loss is not None else ""
    note = f"; {r.result_note}" if r.result_note else ""
    return f"from step {r.result_step} ({r.result or 'last'}{val}){note}"


def _with_env(j: JobState, note: str) -> str:
    """A resume under another environment fingerprint (BLAS, mlx, ...) is said on the job: from
    then on it is no longer bit-exact with the earlier attempts (or with an uninterrupted run)."""
    if not j.env_changed:
        return note
    drift = (
        f"resumed under a different environment ({'; '.join(j.env_changed)}): "
        f"no longer bit-exact with the earlier attempts"
    )
    return f"{note}; {drift}" if note else drift


def _eta(
    j: JobState, live: int, reports: list[dict], now: float
) -> tuple[float | None, str | None]:
    """Seconds to the last iteration: the step rate between the first and the last report of this
    attempt (wall clock, so evaluations and checkpoints are included), or with a single report the
    tokens/s it measured divided by the tokens per step so far (pure training time). No estimate
    once reports are overdue (3 report intervals and 30 s without one): a stalled worker is not
    about to finish, whatever the arithmetic says."""
    left = j.iters - live
    if left <= 0:
        return 0.0, "no iterations left"
    rate = basis = None
    if len(reports) >= 2:
        a, b = reports[0], reports[-1]
        dt, ds = ts_epoch(b["ts"]) - ts_epoch(a["ts"]), b["step"] - a["step"]
        if dt > 0 and ds > 0:
            rate, basis = (
                ds / dt,
                f"{ds / dt:.3g} steps/s between the reports at steps {a['step']} and {b['step']}",
            )
    last = reports[-1] if reports else None
    if (
        rate is None
        and last
        and last.get("tokens_per_s")
        and last.get("trained_tokens")
        and last["step"] > 0
    ):
        per_step = last["trained_tokens"] / last["step"]
        rate = last["tokens_per_s"] / per_step
        basis = f"{last['tokens_per_s']:.0f} tokens/s at {per_step:.0f} tokens/step (report at step {last['step']})"
    if rate is None:
        return None, None
    since = now - ts_epoch(last["ts"])
    every = j.config.steps_per_report / rate
    if since > max(3 * every, 30.0):
        return (
            None,
            f"no progress report for {since:.0f} s (one was due every {every:.0f} s): no estimate",
        )
    eta = left / rate - since
    if eta <= 0:  # it should have finished by now at that rate and has not: the estimate is wrong
        return (
            None,
            f"{left} steps were due {-eta:.0f} s ago at {basis}, and the last report is {since:.0f} s "
            "old: no estimate",
        )
    return eta, basis


def _when(ts: str | None) -> str:
    return f"{ts[:19].replace('T', ' ')} UTC" if ts else "never"
