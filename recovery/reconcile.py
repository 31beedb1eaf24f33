"""Reconcile the disk and the process table with the journal.

``plan`` looks (reads the journal's projection, lists folders, verifies hashes, asks the
process table) and returns the repairs; it changes nothing, which is what
``ftctl recover --dry-run`` prints. ``apply`` carries them out. Every repair is recorded as
an event, so ``ftctl history`` explains what recovery did and why; a second run finds
nothing left to do.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ftctl.adapters import checkpoint as ck
from ftctl.adapters import process
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.core.crash import Decision, Evidence, after_crash, decide, follow_up, resumes_from
from ftctl.core.machine import ACTIVE, TERMINAL
from ftctl.core.state import DAEMON_STREAM, JobState, Projection, job_stream
from ftctl.events import types as ev
from ftctl.events.types import CheckpointRecord, EventBase, Recorded


class Ledger(Protocol):
    """What repairs need of the write path (control/ledger.py): the projection, and commit."""

    state: Projection

    def refresh(self) -> list[Recorded]: ...

    def commit(self, stream: str, *events: EventBase) -> list[Recorded]: ...


@dataclass
class Repair:
    what: str  # one line for people
    stream: str
    events: list[EventBase] = field(default_factory=list)
    before: Callable[[], None] | None = None  # effect that must precede the event (stop a process)
    after: Callable[[], None] | None = None  # effect that follows the event (delete a folder)

    def as_dict(self) -> dict:
        return {
            "what": self.what,
            "stream": self.stream,
            "events": [type(e).kind() for e in self.events],
        }


def rm(path: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(path, ignore_errors=True)


def _stale_job(j: JobState) -> list[Repair]:
    """A job the journal says is training, found with no live worker (or an orphan one)."""
    out = []
    orphan = j.worker is not None and process.alive(j.worker)
    if orphan:
        w = j.worker
        out.append(
            Repair(
                f"job {j.job}: stop orphan worker pid {w.pid} (its daemon is gone)",
                job_stream(j.job),
                before=lambda w=w: process.stop_group(w),
            )
        )
    what = (
        f"journal said {j.state!r} (worker pid {j.worker.pid if j.worker else '?'}) but no daemon "
        f"supervised it{'; the orphan worker was stopped' if orphan else ''}"
    )
    d = decide(Evidence(reported="daemon_died", what=what, step=j.step), j, time.time())
    good = j.good_checkpoints()
    where = resumes_from(good[-1].step if good else None)
    out.append(
        Repair(
            f"job {j.job}: {j.state} with no live worker -> crashed, then {type(d.follow).kind()} "
            f"({where})",
            job_stream(j.job),
            [d.crashed, d.follow],
        )
    )
    return out


def _stranded(j: JobState) -> Repair:
    """A job left `crashed` without the decision that follows a crash (written by an older ftctl
    in two steps, the daemon dying in between): take the decision now, by the same rules."""
    last = j.crashes[-1] if j.crashes else None
    category = last.category if last else "killed"
    if last is None:
        dec = Decision("requeue", "recovery: crashed with no record")
    else:
        dec = after_crash(
            j.crashes[j.budget_from :] or j.crashes[-1:],
            time.time(),
            resume_step=j.step,
            policy=j.config.restart,
        )
    nxt = follow_up(j.job, dec, j.requested, category, time.time())
    return Repair(
        f"job {j.job}: crashed with no decision recorded -> {type(nxt).kind()}",
        job_stream(j.job),
        [nxt],
    )


def debris(ws: Workspace, j: JobState) -> list[Repair]:
    """Temp and uncommitted folders of one job. The daemon also clears these before it restarts
    a crashed job, so a worker killed mid-save leaves nothing behind for long."""
    out = []
    jdir = ws.job_dir(j.job)
    stream = job_stream(j.job)
    for tmp in ck.temp_dirs(jdir):
        out.append(
            Repair(
                f"job {j.job}: delete temp checkpoint {tmp.name}",
                stream,
                [
                    ev.CheckpointDiscarded(
                        job=j.job, path=str(tmp), reason="temp directory of an unfinished save"
                    )
                ],
                after=rm(tmp),
            )
        )
    known = {c.path for c in j.checkpoints}
    for d in ck.list_checkpoint_dirs(jdir):
        if str(d) not in known:
            out.append(
                Repair(
                    f"job {j.job}: delete uncommitted checkpoint {d.name}",
                    stream,
                    [
                        ev.CheckpointDiscarded(
                            job=j.job, path=str(d), reason="on disk but never committed, or pruned"
                        )
                    ],
                    after=rm(d),
                )
            )
    for leftover in jdir.glob(".tmp-adapters*"):
        out.append(
            Repair(
                f"job {j.job}: delete unfinished adapter export {leftover.name}",
                stream,
                [
                    ev.CheckpointDiscarded(
                        job=j.job, path=str(leftover), reason="temp adapter export"
                    )
                ],
                after=rm(leftover),
            )
        )
    adapters = jdir / "adapters"
    if adapters.exists() and j.state != "completed":
        out.append(
            Repair(
                f"job {j.job}: delete uncommitted final adapter (the job never completed)",
                stream,
                [
                    ev.CheckpointDiscarded(
                        job=j.job,
                        path=str(adapters),
                        reason="adapter exported but `completed` never committed",
                    )
                ],
                after=rm(adapters),
            )
        )
    return out


def mark_corrupt(job: str, c: CheckpointRecord, reason: str) -> Repair:
    return Repair(
        f"job {job}: checkpoint step {c.step} is corrupt ({reason}); resume falls back",
        job_stream(job),
        [ev.CheckpointCorrupt(job=job, step=c.step, path=c.path, reason=reason)],
    )


def verify(j: JobState, c: CheckpointRecord) -> Repair | None:
    """Verify a committed checkpoint against its manifest: None if it is intact, else the repair
    that records it corrupt. The one check used by recovery, resume and warm start alike."""
    try:
        ck.verify_checkpoint(c.path)
        return None
    except ck.CheckpointCorrupt as e:
        return mark_corrupt(j.job, c, e.reason)


def plan(ws: Workspace, ledger: Ledger) -> list[Repair]:
    """Recovery runs holding the daemon lock, before any worker of this daemon starts: every
    job the journal calls active is stale, and a live worker recorded for it is an orphan."""
    ledger.refresh()
    p = ledger.state
    repairs: list[Repair] = []
    d = p.daemon
    if d.running:
        repairs.append(
            Repair(
                f"daemon pid {d.process.pid if d.process else '?'} died without stopping: mark it stopped",
                DAEMON_STREAM,
                [
                    ev.DaemonStopped(
                        pid=d.process.pid if d.process else 0, reason="died (found by recovery)"
                    )
                ],
            )
        )
    recorded = {j.worker.pid for j in p.jobs.values() if j.state in ACTIVE and j.worker is not None}
    for w, parent in process.workers_of(ws.home):
        # Holding the lock, no daemon of this workspace runs: a worker that is not our own child is
        # unsupervised. A job's recorded orphan is stopped by that job's repair below.
        if parent != os.getpid() and w.pid not in recorded:
            repairs.append(
                Repair(
                    f"stop worker pid {w.pid}: a worker of this workspace that no daemon supervises "
                    f"(a spare or an unrecorded start; it trains nothing the journal relies on)",
                    DAEMON_STREAM,
                    before=lambda w=w: process.stop_group(w),
                )
            )
    for j in p.jobs.values():
        if j.state in ACTIVE:
            repairs += _stale_job(j)
        elif j.state == "crashed":
            repairs.append(_stranded(j))
        if j.state == "rejected" or (j.state in TERMINAL and j.updated_seq <= d.reconciled_seq):
            continue  # a finished job nothing touched since the last recovery: its folder was checked then
        repairs += debris(ws, j) + [r for c in j.good_checkpoints() if (r := verify(j, c))]
    jobs_root = ws.home / "jobs"
    if jobs_root.exists():
        # Names first: a stat or a Path per folder of thousands of known jobs would cost more than the rest.
        for name in sorted(os.listdir(jobs_root)):
            d_ = jobs_root / name
            if name not in p.jobs and d_.is_dir():
                repairs.append(
                    Repair(
                        f"delete {d_.name}/ in jobs/: left by a submit that never committed",
                        DAEMON_STREAM,
                        [
                            ev.DebrisRemoved(
                                path=str(d_), reason="job folder without a submitted job"
                            )
                        ],
                        after=rm(d_),
                    )
                )
    return repairs


def apply(ledger: Ledger, repairs: list[Repair]) -> int:
    """Carry out repairs in order: effect before (stop a process), event, effect after (delete)."""
    done = 0
    for r in repairs:
        crash_point("during_recovery", done)
        if r.before:
            r.before()
        if r.events:
            ledger.commit(r.stream, *r.events)
        if r.after:
            r.after()
        done += 1
    return done
