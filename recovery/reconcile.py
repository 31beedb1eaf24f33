"""Reconcile the disk and the process table with the journal.

``plan`` looks (reads the journal's projection, lists folders, verifies hashes, asks the
process table) and returns the repairs; it changes nothing, which is what
``ftctl recover --dry-run`` prints. ``apply`` carries them out. Every repair is recorded as
an event, so ``ftctl history`` explains what recovery did and why; a second run finds
nothing left to do.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ftctl.adapters import checkpoint as ck
from ftctl.adapters import fuse, process
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.core.machine import ACTIVE, TERMINAL
from ftctl.core.policy import SUGGESTIONS, Decision, after_crash, follow_up
from ftctl.core.state import DAEMON_STREAM, JobState, LineageState, Projection, job_stream, lineage_stream
from ftctl.events import types as ev
from ftctl.events.types import EventBase

from .ledger import Ledger


@dataclass
class Repair:
    what: str                                 # one line for people
    stream: str
    events: list[EventBase] = field(default_factory=list)
    before: Callable[[], None] | None = None  # effect that must precede the event (stop a process)
    after: Callable[[], None] | None = None   # effect that follows the event (delete a folder)

    def as_dict(self) -> dict:
        return {"what": self.what, "stream": self.stream, "events": [type(e).kind() for e in self.events]}


def _rm(path: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(path, ignore_errors=True)


def _stale_job(j: JobState) -> list[Repair]:
    """A job the journal says is training, found with no live worker (or an orphan one)."""
    out = []
    orphan = j.worker is not None and process.alive(j.worker)
    if orphan:
        w = j.worker
        out.append(Repair(f"job {j.job}: stop orphan worker pid {w.pid} (its daemon is gone)",
                          job_stream(j.job), before=lambda w=w: process.stop_group(w)))
    evidence = (f"journal said {j.state!r} (worker pid {j.worker.pid if j.worker else '?'}) but no daemon "
                f"supervised it{'; the orphan worker was stopped' if orphan else ''}")
    crash = ev.Crashed(job=j.job, category="daemon_died", step=j.step, evidence=evidence,
                       suggestion=SUGGESTIONS["daemon_died"])
    if j.requested == "cancel":
        follow = ev.Cancelled(job=j.job, reason="cancelled by user while its daemon was down")
    elif j.requested == "pause":
        follow = ev.Paused(job=j.job, reason="paused by user while its daemon was down")
    else:
        follow = ev.Requeued(job=j.job, reason=f"recovery: resume from step {j.step}")
    out.append(Repair(f"job {j.job}: {j.state} with no live worker -> crashed, then {type(follow).kind()} "
                      f"(resumes from step {j.step})", job_stream(j.job), [crash, follow]))
    return out


def _stranded(j: JobState) -> Repair:
    """A job left `crashed` without the decision that follows a crash (written by an older ftctl
    in two steps, the daemon dying in between): take the decision now, by the same policy."""
    r = j.config.get("restart", {})
    last = j.crashes[-1] if j.crashes else None
    category = last.category if last else "killed"
    if last is None:
        dec = Decision("requeue", "recovery: crashed with no record")
    else:
        dec = after_crash(j.crashes, time.time(), resume_step=j.step, max_restarts=r.get("max_restarts", 3),
                          window_s=r.get("window_s", 300.0), backoff_s=r.get("backoff_s", 2.0),
                          backoff_max_s=r.get("backoff_max_s", 60.0))
    nxt = follow_up(j.job, dec, j.requested, category, time.time())
    return Repair(f"job {j.job}: crashed with no decision recorded -> {type(nxt).kind()}", job_stream(j.job), [nxt])


def debris(ws: Workspace, j: JobState) -> list[Repair]:
    """Temp and uncommitted folders of one job. The daemon also clears these before it restarts
    a crashed job, so a worker killed mid-save leaves nothing behind for long."""
    out = []
    jdir = ws.job_dir(j.job)
    stream = job_stream(j.job)
    for tmp in ck.temp_dirs(jdir):
        out.append(Repair(f"job {j.job}: delete temp checkpoint {tmp.name}", stream,
                          [ev.CheckpointDiscarded(job=j.job, path=str(tmp), reason="temp directory of an unfinished save")],
                          after=_rm(tmp)))
    known = {c.path for c in j.checkpoints}
    for d in ck.list_checkpoint_dirs(jdir):
        if str(d) not in known:
            out.append(Repair(f"job {j.job}: delete uncommitted checkpoint {d.name}", stream,
                              [ev.CheckpointDiscarded(job=j.job, path=str(d), reason="on disk but never committed, or pruned")],
                              after=_rm(d)))
    for leftover in jdir.glob(".tmp-adapters*"):
        out.append(Repair(f"job {j.job}: delete unfinished adapter export {leftover.name}", stream,
                          [ev.CheckpointDiscarded(job=j.job, path=str(leftover), reason="temp adapter export")],
                          after=_rm(leftover)))
    adapters = jdir / "adapters"
    if adapters.exists() and j.state != "completed":
        out.append(Repair(f"job {j.job}: delete uncommitted final adapter (the job never completed)", stream,
                          [ev.CheckpointDiscarded(job=j.job, path=str(adapters), reason="adapter exported but `completed` never committed")],
                          after=_rm(adapters)))
    return out


def _verify(j: JobState) -> list[Repair]:
    out = []
    for c in j.checkpoints:
        if c.corrupt is not None:
            continue
        try:
            ck.verify_checkpoint(c.path)
        except ck.CheckpointCorrupt as e:
            out.append(Repair(f"job {j.job}: checkpoint step {c.step} is corrupt ({e.reason}); resume falls back",
                              job_stream(j.job), [ev.CheckpointCorrupt(job=j.job, step=c.step, path=c.path, reason=e.reason)]))
    return out


def plan(ws: Workspace, ledger: Ledger) -> list[Repair]:
    """Recovery runs holding the daemon lock, before any worker of this daemon starts: every
    job the journal calls active is stale, and a live worker recorded for it is an orphan."""
    ledger.refresh()
    p = ledger.state
    repairs: list[Repair] = []
    d = p.daemon
    if d.running:
        repairs.append(Repair(f"daemon pid {d.process.pid if d.process else '?'} died without stopping: mark it stopped",
                              DAEMON_STREAM, [ev.DaemonStopped(pid=d.process.pid if d.process else 0,
                                                               reason="died (found by recovery)")]))
    for j in p.jobs.values():
        if j.state in ACTIVE:
            repairs += _stale_job(j)
        elif j.state == "crashed":
            repairs.append(_stranded(j))
        if j.state == "rejected" or (j.state in TERMINAL and j.updated_seq <= d.reconciled_seq):
            continue  # a finished job nothing touched since the last recovery: its folder was checked then
        repairs += debris(ws, j) + _verify(j)
    jobs_root = ws.home / "jobs"
    if jobs_root.exists():
        for d_ in sorted(jobs_root.iterdir()):
            if d_.is_dir() and d_.name not in p.jobs:
                repairs.append(Repair(f"delete {d_.name}/ in jobs/: left by a submit that never committed", DAEMON_STREAM,
                                      [ev.DebrisRemoved(path=str(d_), reason="job folder without a submitted job")],
                                      after=_rm(d_)))
    for lin in p.lineages.values():
        if lin.pending is not None:
            repairs.append(_pending_consolidation(ws, lin))
    repairs += _model_debris(ws, p)
    for lin in p.lineages.values():
        repairs += retire_repairs(p, lin)
    return repairs


def _pending_consolidation(ws: Workspace, lin: LineageState) -> Repair:
    """A consolidation died midway: complete it if its model is whole, else discard the output.
    Either way the lineage ends in one good state: new base promoted, or old base + adapter."""
    pend = lin.pending
    version, final = pend["version"], fuse.model_dir(ws.models, pend["version"])
    stream = lineage_stream(lin.name)
    temps = list(ws.models.glob(f".tmp-v{version:04d}-*"))

    def cleanup(paths=temps):
        for t in paths:
            shutil.rmtree(t, ignore_errors=True)

    if final.exists():
        try:
            sha = fuse.verify_model_dir(final)
        except fuse.ModelCorrupt as e:
            return Repair(f"lineage {lin.name}: fused model v{version} is incomplete ({e.reason}): discard it, keep the old base",
                          stream, [ev.ConsolidationAborted(lineage=lin.name, version=version, reason=f"recovery: {e.reason}")],
                          after=lambda: cleanup(temps + [final]))
        return Repair(f"lineage {lin.name}: fused model v{version} is complete and verified: promote it", stream,
                      [ev.BasePromoted(lineage=lin.name, version=version, model_path=str(final), weights_sha256=sha,
                                       previous_base=pend["base_model"])], after=cleanup)
    return Repair(f"lineage {lin.name}: consolidation v{version} died before its model was complete: discard the partial output",
                  stream, [ev.ConsolidationAborted(lineage=lin.name, version=version, reason="interrupted; recovery discarded the partial output")],
                  after=cleanup)


def _model_debris(ws: Workspace, p: Projection) -> list[Repair]:
    if not ws.models.exists():
        return []
    pending = {fuse.model_dir(ws.models, lin.pending["version"]).name for lin in p.lineages.values() if lin.pending}
    pending_tmp = {f".tmp-v{lin.pending['version']:04d}-" for lin in p.lineages.values() if lin.pending}
    known = {m.path for lin in p.lineages.values() for m in lin.models}
    out = []
    for d in sorted(ws.models.iterdir()):
        if d.name in pending or any(d.name.startswith(t) for t in pending_tmp) or str(d) in known:
            continue
        why = "temp folder of a fuse that died" if d.name.startswith(".tmp-") else "model folder never promoted"
        out.append(Repair(f"delete models/{d.name}: {why}", DAEMON_STREAM, [ev.DebrisRemoved(path=str(d), reason=why)],
                          after=_rm(d)))
    return out


def retire_repairs(p: Projection, lin: LineageState) -> list[Repair]:
    """After a promotion the old base's adapters are history: their checkpoints (optimizer
    state for warm starts) are pruned; the final adapters stay as the archive. Runs only once
    `base_promoted` is committed — save first, delete last."""
    out = []
    if lin.base_version == 0:
        return out
    for j in p.jobs.values():
        if j.lineage == lin.name and j.base_model != lin.base_model and j.state in TERMINAL and j.checkpoints:
            out.append(Repair(f"job {j.job}: prune {len(j.checkpoints)} checkpoint(s) of a base superseded by v{lin.base_version}",
                              job_stream(j.job),
                              [ev.CheckpointPruned(job=j.job, step=c.step, path=c.path, reason=f"consolidated into base v{lin.base_version}")
                               for c in j.checkpoints],
                              after=lambda paths=[c.path for c in j.checkpoints]: [shutil.rmtree(x, ignore_errors=True) for x in paths]))
    return out


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


def recover(ws: Workspace, ledger: Ledger, on_repair: Callable[[Repair], None] = lambda r: None) -> list[Repair]:
    """Plan and apply until nothing is left (a repair can reveal the next: promoting a pending
    consolidation makes the old base's checkpoints retirable), then record that recovery ran."""
    done: list[Repair] = []
    for _ in range(5):
        repairs = plan(ws, ledger)
        if not repairs:
            break
        for r in repairs:
            on_repair(r)
        apply(ledger, repairs)
        done += repairs
    if done:
        ledger.commit(DAEMON_STREAM, ev.RecoveryFinished(repairs=len(done), summary=[r.what for r in done][:50]))
    return done
