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
                f"job {j.job} is {j.state!r}: only a failed job can be retried"
                + (f" (`ftctl resume {j.job}` queues a paused one)" if j.state == "paused" else "")
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
