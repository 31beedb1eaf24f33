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
from ftctl.core.config import keep_last
from ftctl.core.machine import TERMINAL
from ftctl.core.policy import to_prune
from ftctl.core.state import JobState, LineageState, Projection, job_stream, lineage_stream
from ftctl.events import types as ev
from ftctl.events.types import CheckpointRecord
from ftctl.recovery.reconcile import Repair


def _discard(paths: list[str]) -> None:
    for p in paths:
        if os.path.lexists(p):  # a crash after the event may have deleted some already
            ck.discard_dir(p)


def prune(j: JobState, victims: list[CheckpointRecord], reason: str) -> Repair:
    """Remove committed checkpoints of a job: events first, folders after."""
    return Repair(
        f"job {j.job}: prune {len(victims)} checkpoint(s) ({reason})",
        job_stream(j.job),
        [ev.CheckpointPruned(job=j.job, step=c.step, path=c.path, reason=reason) for c in victims],
        after=lambda paths=[c.path for c in victims]: _discard(paths),
    )


def checkpoints(j: JobState) -> Repair | None:
    """The job's own retention (retention.keep_last / keep_best), or None if nothing is due."""
    victims = to_prune(j)
    if not victims:
        return None
    r = j.config.retention
    return prune(j, victims, f"retention: keep_last={keep_last(j.config)}, keep_best={r.keep_best}")


def superseded(p: Projection, lin: LineageState) -> list[Repair]:
    """After a promotion the old base's adapters are history: their checkpoints (optimizer state for
    warm starts) go; each job's final adapter stays as the archive. Only once `base_promoted` is
    committed — save first, delete last."""
    if lin.base_version == 0:
        return []
    why = f"consolidated into base v{lin.base_version}; its final adapter stays in jobs/<id>/adapters/"
    return [
        prune(j, list(j.checkpoints), why)
        for j in p.jobs.values()
        if j.lineage == lin.name
        and j.base_model != lin.base_model
        and j.state in TERMINAL
        and j.checkpoints
    ]


def models(p: Projection, lin: LineageState, keep_models: int) -> list[Repair]:
    """Fused models beyond the newest ``keep_models``, never one a lineage or an unfinished job uses."""
    used = {lin.base_model} | {j.base_model for j in p.jobs.values() if j.state not in TERMINAL}
    newest = {m.version for m in sorted(lin.models, key=lambda m: m.version)[-keep_models:]}
    reason = f"retention: keep_models={keep_models}"
    return [
        Repair(
            f"lineage {lin.name}: remove fused model v{m.version} ({reason})",
            lineage_stream(lin.name),
            [ev.ModelRemoved(lineage=lin.name, version=m.version, path=m.path, reason=reason)],
            after=lambda path=Path(m.path): shutil.rmtree(path, ignore_errors=True),
        )
        for m in lin.models
        if m.version not in newest and m.path not in used
    ]
