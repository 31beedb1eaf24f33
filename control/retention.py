"""Retention: what ftctl deletes to bound disk use, and the one way it deletes it.

Every removal is a repair (recovery.reconcile.Repair): the ``*_pruned`` / ``model_removed`` events
are committed first and the folders are deleted after, so a crash in between leaves a folder no
event accounts for, which recovery deletes. The daemon (after each checkpoint), ``ftctl doctor
--fix``, recovery and consolidation all prune through these functions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ftctl.adapters import checkpoint as ck
from ftctl.adapters.workspace import Workspace
from ftctl.core.config import keep_last
from ftctl.core.machine import TERMINAL
from ftctl.core.retention import to_prune
from ftctl.core.state import JobState, LineageState, Projection, job_stream, lineage_stream
from ftctl.events import types as ev
from ftctl.events.types import CheckpointRecord
from ftctl.recovery.reconcile import Repair


def _discard(paths: list[Path]) -> None:
    for p in paths:
        if os.path.lexists(p):  # a crash after the event may have deleted some already
            ck.discard_dir(p)


def prune(ws: Workspace, j: JobState, victims: list[CheckpointRecord], reason: str) -> Repair:
    """Remove committed checkpoints of a job: events first, folders after."""
    return Repair(
        f"job {j.job}: prune {len(victims)} checkpoint(s) ({reason})",
        job_stream(j.job),
        [ev.CheckpointPruned(job=j.job, step=c.step, path=c.path, reason=reason) for c in victims],
        after=lambda paths=[c.path for c in victims]: _discard([ws.abs(p) for p in paths]),
    )


def checkpoints(ws: Workspace, j: JobState) -> Repair | None:
    """The job's own retention (retention.keep_last / keep_best), or None if nothing is due. It never
    takes a job's newest keep_last checkpoints, whatever its state."""
    victims = to_prune(j)
    if not victims:
        return None
    r = j.config.retention
    return prune(
        ws, j, victims, f"retention: keep_last={keep_last(j.config)}, keep_best={r.keep_best}"
    )


def superseded(ws: Workspace, p: Projection, lin: LineageState) -> list[Repair]:
    """After a promotion the old base's completed adapters are history: their checkpoints (optimizer
    state for warm starts) go, and each job's final adapter stays as the archive — checked to be there,
    intact (its recorded sha256), before a checkpoint is touched. Only completed jobs: a cancelled or
    failed job has no final adapter, its checkpoints are all that is left of its training, and they are
    kept (a paused or queued job blocks consolidation anyway). Only once `base_promoted` is committed
    — save first, delete last."""
    if lin.base_version == 0:
        return []
    out = []
    for j in p.jobs.values():
        if not (
            j.lineage == lin.name
            and j.base_model != lin.base_model
            and j.state == "completed"
            and j.checkpoints
            and j.adapter_path
        ):
            continue
        try:
            intact = ck.adapter_sha256(ws.abs(j.adapter_path)) == j.adapter_sha256
        except OSError:
            intact = False
        if intact:
            why = (
                f"consolidated into base v{lin.base_version}; its final adapter stays in "
                f"{j.adapter_path}/ (sha256 checked)"
            )
            out.append(prune(ws, j, list(j.checkpoints), why))
    return out


def spared(ws: Workspace, p: Projection, lin: LineageState) -> list[str]:
    """What a promotion leaves of the old base's jobs, and why (said beside what it prunes): the
    checkpoints of a job with no final adapter, or whose adapter is not there as recorded."""
    if lin.base_version == 0:
        return []
    pruned = {r.stream for r in superseded(ws, p, lin)}
    return [
        f"job {j.job} ({j.state}): its {len(j.checkpoints)} checkpoint(s) are kept"
        + (
            ": it has no final adapter, they are all that is left of its training"
            if j.state != "completed"
            else f": its final adapter is not in {j.adapter_path}/ as recorded"
        )
        for j in p.jobs.values()
        if j.lineage == lin.name
        and j.base_model != lin.base_model
        and j.state in TERMINAL
        and j.state != "rejected"
        and j.checkpoints
        and job_stream(j.job) not in pruned
    ]


def models(ws: Workspace, p: Projection, lin: LineageState, keep_models: int) -> list[Repair]:
    """Fused models beyond the newest ``keep_models``, never one a lineage or an unfinished job uses."""
    used = {lin.base_model} | {j.base_model for j in p.jobs.values() if j.state not in TERMINAL}
    newest = {m.version for m in sorted(lin.models, key=lambda m: m.version)[-keep_models:]}
    reason = f"retention: keep_models={keep_models}"
    return [
        Repair(
            f"lineage {lin.name}: remove fused model v{m.version} ({reason})",
            lineage_stream(lin.name),
            [ev.ModelRemoved(lineage=lin.name, version=m.version, path=m.path, reason=reason)],
            after=lambda path=m.path: shutil.rmtree(ws.abs(path), ignore_errors=True),
        )
        for m in lin.models
        if m.version not in newest and m.path not in used
    ]
