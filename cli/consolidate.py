"""Consolidation: fuse a lineage's adapter into a new base model, as an event-sourced operation.

    consolidation_started  ->  fuse into models/.tmp-vN, verify, rename to models/vN
                           ->  base_promoted (the commit point)  ->  retire the old base's
                               checkpoints, prune old fused models

A crash anywhere leaves either the old base + adapter in use (nothing committed yet) or the new
base promoted; recovery finishes or discards a half-done one (recovery/reconcile.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import datetime

from ftctl.adapters import checkpoint as ck
from ftctl.adapters import fuse, system
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.core.machine import TERMINAL
from ftctl.core.state import LineageState, lineage_stream
from ftctl.events import types as ev
from ftctl.recovery import reconcile
from ftctl.recovery.ledger import Ledger


class ConsolidationRefused(Exception):
    """Consolidation cannot run now; nothing was changed."""


def blockers(ledger: Ledger, lineage: str) -> list[str]:
    """Jobs of the lineage that are not finished: fusing under them would fork the lineage."""
    return [f"{j.job} ({j.state})" for j in ledger.state.jobs.values()
            if j.lineage == lineage and j.state not in TERMINAL]


def check(ws: Workspace, ledger: Ledger, lineage: str) -> LineageState:
    lin = ledger.state.lineages.get(lineage)
    if lin is None:
        raise ConsolidationRefused(f"no lineage {lineage!r}: no job was ever submitted to it")
    if lin.state == "consolidating":
        raise ConsolidationRefused(f"lineage {lineage!r} has a consolidation in progress; if nothing runs it, "
                                   "`ftctl recover` completes or discards it")
    if lin.head_job is None:
        raise ConsolidationRefused(f"lineage {lineage!r} has no completed adapter on its current base "
                                   f"({lin.base_model}): nothing to consolidate")
    busy = blockers(ledger, lineage)
    if busy:
        raise ConsolidationRefused(f"jobs of lineage {lineage!r} are not finished: {', '.join(busy)}. Consolidation "
                                   "never runs under a job: let them finish (or cancel them), then consolidate")
    return lin


def consolidate(ws: Workspace, ledger: Ledger, lineage: str, *, keep_models: int, min_free_gb: float,
                say: Callable[[str], None] = print) -> fuse.FusedModel:
    lin = check(ws, ledger, lineage)
    head = ledger.state.jobs[lin.head_job]
    base = lin.base_model
    need = 2 * fuse.folder_bytes(base) / system.GB + min_free_gb
    ws.models.mkdir(parents=True, exist_ok=True)
    free = system.free_disk_gb(ws.models)
    if free < need:
        raise ConsolidationRefused(f"only {free:.2f} GB free, fusing needs about {need:.2f} GB (twice the base model "
                                   "plus min_free_disk_gb): free space and retry; nothing was changed")
    if ck.adapter_sha256(head.adapter_path) != head.adapter_sha256:
        raise ConsolidationRefused(f"the adapter of job {head.job} at {head.adapter_path} no longer matches the sha256 "
                                   "recorded when it completed; nothing was changed — restore it before consolidating")
    version = max([lin.base_version] + [m.version for m in lin.models]) + 1
    stream = lineage_stream(lineage)
    ledger.commit(stream, ev.ConsolidationStarted(
        lineage=lineage, version=version, base_model=base, adapter_path=head.adapter_path,
        adapter_sha256=head.adapter_sha256, temp_path=str(fuse.temp_dir(ws.models, version))))
    say(f"lineage {lineage}: fusing job {head.job}'s adapter into {base} -> models/v{version:04d}")
    try:
        fused = fuse.fuse(base, head.adapter_path, ws.models, version)
    except BaseException as e:
        ledger.commit(stream, ev.ConsolidationAborted(lineage=lineage, version=version, reason=f"{type(e).__name__}: {e}"))
        if isinstance(e, Exception):
            raise ConsolidationRefused(f"consolidation v{version} failed and was discarded ({e}); the old base and "
                                       "adapter are intact and still in use") from e
        raise
    ledger.commit(stream, ev.BasePromoted(lineage=lineage, version=version, model_path=str(fused.path),
                                          weights_sha256=fused.weights_sha256, previous_base=base))
    say(f"lineage {lineage}: base v{version} promoted ({fused.path}, max |logit diff| {fused.max_abs_diff:.2e}); "
        "new jobs train a fresh adapter on it")
    crash_point("consolidate_after_event", version)
    retire(ledger, lineage, keep_models)
    return fused


def retire(ledger: Ledger, lineage: str, keep_models: int) -> None:
    """After the promotion is committed: prune the old base's checkpoints and old fused models."""
    lin = ledger.state.lineages[lineage]
    reconcile.apply(ledger, reconcile.retire_repairs(ledger.state, lin))
    lin = ledger.state.lineages[lineage]
    used = {lin.base_model} | {j.base_model for j in ledger.state.jobs.values() if j.state not in TERMINAL}
    newest = {m.version for m in sorted(lin.models, key=lambda m: m.version)[-keep_models:]}
    for m in list(lin.models):
        if m.version not in newest and m.path not in used:
            ledger.commit(lineage_stream(lineage), ev.ModelRemoved(
                lineage=lineage, version=m.version, path=m.path, reason=f"retention: keep_models={keep_models}"))
            shutil.rmtree(m.path, ignore_errors=True)


def due(schedule: str | None, last_started: str, now: datetime | None = None) -> bool:
    """Is the daily HH:MM (local time) consolidation due? Once per day, at or after the time."""
    if not schedule:
        return False
    now = now or datetime.now()
    hh, mm = map(int, schedule.split(":"))
    slot = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if now < slot:
        return False
    if not last_started:
        return True
    last = datetime.strptime(last_started, "%Y-%m-%dT%H:%M:%S.%fZ")
    from datetime import timezone

    last_local = last.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
    return last_local < slot
