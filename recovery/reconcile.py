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
    # A finding, not a repair: something the journal references that recovery cannot find (a missing
    # checkpoint). Reported, never acted on: nothing is deleted or recorded for it.
    finding: bool = False

    def as_dict(self) -> dict:
        return {
            "what": self.what,
            "stream": self.stream,
            "events": [type(e).kind() for e in self.events],
            **({"finding": True} if self.finding else {}),
        }


def rm(path: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(path, ignore_errors=True)


def reported_step(ledger: Ledger, j: JobState) -> int:
    """The last step the journal saw the job's current attempt reach: its last progress report (the
    metrics table), its last checkpoint begun or committed — whichever is furthest. The last
    committed checkpoint alone lags behind by up to save_every steps, and by more while a checkpoint
    is being written in the background (the steps go on meanwhile)."""
    step = max(j.step, j.reached)
    if j.state in ACTIVE:
        started = ledger.journal.last_ts(job_stream(j.job), "training_started") or ""
        last = ledger.journal.recent_metrics(j.job, since_ts=started, limit=1)
        if last:
            step = max(step, last[-1]["step"])
    return step


def _stale_job(ws: Workspace, ledger: Ledger, j: JobState) -> list[Repair]:
    """A job the journal says is training, found with no live worker (or an orphan one)."""
    out = []
    alive = j.worker is not None and process.alive(j.worker)
    # A worker of another workspace (this one is a copy of it) is not ours to stop: it trains there.
    orphan = alive and process.works_for(j.worker, ws.home)
    if orphan:
        w = j.worker
        out.append(
            Repair(
                f"job {j.job}: stop orphan worker pid {w.pid} (its daemon is gone)",
                job_stream(j.job),
                before=lambda w=w: process.stop_group(w),
            )
        )
    elsewhere = (
        f"; its recorded worker pid {j.worker.pid} still runs, for another workspace (this one is a "
        "copy of it): left alone"
        if alive and not orphan
        else ""
    )
    what = (
        f"journal said {j.state!r} (worker pid {j.worker.pid if j.worker else '?'}) but no daemon "
        f"supervised it{'; the orphan worker was stopped' if orphan else ''}{elsewhere}"
    )
    step = reported_step(ledger, j)
    d = decide(Evidence(reported="daemon_died", what=what, step=step), j, time.time())
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
    """Temp and uncommitted folders of one job: only what ftctl provably left (its own temp names, a
    step-NNNNNNNN folder of the job's checkpoints/ that no committed checkpoint of the job names). The
    daemon also clears these before it restarts a crashed job, so a worker killed mid-save leaves
    nothing behind for long."""
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
                        job=j.job, path=ws.rel(tmp), reason="temp directory of an unfinished save"
                    )
                ],
                after=rm(tmp),
            )
        )
    # By folder name within the job's own checkpoints/: a committed checkpoint is never taken for
    # debris, whatever spelling of the workspace's location its event recorded.
    known = {Path(c.path).name for c in j.checkpoints}
    for d in ck.list_checkpoint_dirs(jdir):
        if d.name not in known:
            out.append(
                Repair(
                    f"job {j.job}: delete uncommitted checkpoint {d.name}",
                    stream,
                    [
                        ev.CheckpointDiscarded(
                            job=j.job,
                            path=ws.rel(d),
                            reason="on disk but never committed, or pruned",
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
                        job=j.job, path=ws.rel(leftover), reason="temp adapter export"
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
                        path=ws.rel(adapters),
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


def verify(ws: Workspace, j: JobState, c: CheckpointRecord) -> Repair | None:
    """Verify a committed checkpoint against its manifest: None if it is intact, else the repair
    that records it corrupt — or, if its folder is not there at all, a *finding* that it is missing
    (nothing recorded, nothing deleted: a checkpoint the journal committed is never written off because
    it cannot be found; restored, it is used again). The one check used by recovery, resume and warm
    start alike."""
    path = ws.abs(c.path)
    if not path.exists():
        return Repair(
            f"job {j.job}: checkpoint step {c.step} is missing: the journal committed it at {c.path} "
            f"(in the workspace, {ws.home}), but nothing is there; it is not deleted and not used to "
            "resume (restore the folder and it is used again)",
            job_stream(j.job),
            finding=True,
        )
    try:
        ck.verify_checkpoint(path)
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
        # We hold this workspace's lock, so the daemon the journal names does not run here. If that
        # very process still lives, it holds another workspace's lock: this one is a copy of that one.
        # Either way it is only recorded as stopped here, never signalled.
        pid = d.process.pid if d.process else 0
        copied = d.process is not None and process.alive(d.process)
        repairs.append(
            Repair(
                f"daemon pid {pid} runs another workspace (this one is a copy of it): mark it stopped here"
                if copied
                else f"daemon pid {pid or '?'} died without stopping: mark it stopped",
                DAEMON_STREAM,
                [
                    ev.DaemonStopped(
                        pid=pid,
                        reason="runs another workspace: this one is a copy (found by recovery)"
                        if copied
                        else "died (found by recovery)",
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
            repairs += _stale_job(ws, ledger, j)
        elif j.state == "crashed":
            repairs.append(_stranded(j))
        if j.state == "rejected" or (j.state in TERMINAL and j.updated_seq <= d.reconciled_seq):
            continue  # a finished job nothing touched since the last recovery: its folder was checked then
        repairs += debris(ws, j) + [r for c in j.good_checkpoints() if (r := verify(ws, j, c))]
    jobs_root = ws.home / "jobs"
    if jobs_root.exists():
        # Names first: a stat or a Path per folder of thousands of known jobs would cost more than the rest.
        for name in sorted(os.listdir(jobs_root)):
            d_ = jobs_root / name
            if name not in p.jobs and d_.is_dir() and _submit_leftover(d_):
                repairs.append(
                    Repair(
                        f"delete {d_.name}/ in jobs/: left by a submit that never committed",
                        DAEMON_STREAM,
                        [
                            ev.DebrisRemoved(
                                path=ws.rel(d_), reason="job folder without a submitted job"
                            )
                        ],
                        after=rm(d_),
                    )
                )
    return repairs


_SUBMIT_FILES = {"data", "data/train.jsonl", "data/valid.jsonl"}


def _submit_leftover(d: Path) -> bool:
    """Is ``d`` (jobs/<name>/, no job of that name) what a submit that died leaves: a job id's folder
    holding its data copies (or their temp files) and nothing else? Anything else in jobs/ was not made
    by ftctl for an uncommitted job, and is never deleted."""
    if not d.name.isdigit():
        return False
    for f in d.rglob("*"):
        rel = f.relative_to(d).as_posix()
        if rel not in _SUBMIT_FILES and not (rel.startswith("data/.") and f.is_file()):
            return False
    return True


def apply(ledger: Ledger, repairs: list[Repair]) -> int:
    """Carry out repairs in order: effect before (stop a process), event, effect after (delete).
    Findings are not repairs: they are skipped."""
    done = 0
    for r in repairs:
        if r.finding:
            continue
        crash_point("during_recovery", done)
        if r.before:
            r.before()
        if r.events:
            ledger.commit(r.stream, *r.events)
        if r.after:
            r.after()
        done += 1
    return done
