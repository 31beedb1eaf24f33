"""Consolidation: fuse a lineage's adapter into a new base model, as an event-sourced operation.

    consolidation_started  ->  fuse into models/.tmp-vN, verify, rename to models/vN
                           ->  base_promoted (the commit point)  ->  retire the old base's
                               checkpoints, prune old fused models

The whole protocol lives here, its repair steps included: a crash anywhere leaves either the old
base + adapter in use (nothing committed yet) or the new base promoted, and ``repairs`` (run by
every recovery) finishes or discards a half-done one.
"""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone

from ftctl.adapters import checkpoint as ck
from ftctl.adapters import fuse, gguf, system
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.machine import TERMINAL
from ftctl.core.state import DAEMON_STREAM, LineageState, Projection, lineage_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.recovery.reconcile import Repair, apply, rm

from . import retention
from .jobs import find_job
from .models import IMPORTED
from .reporter import Note, quiet

_FUSED_NAME = re.compile(r"^(\.tmp-)?v\d{4}(-\d+)?$")  # fuse.model_dir / fuse.temp_dir


class ConsolidationRefused(UserError):
    """Consolidation cannot run now; nothing was changed."""

    kept = "nothing was changed"


def blockers(p: Projection, lineage: str) -> list[str]:
    """Jobs of the lineage that are not finished: fusing under them would fork the lineage."""
    return [
        f"{j.job} ({j.state})"
        for j in p.jobs.values()
        if j.lineage == lineage and j.state not in TERMINAL
    ]


def check(p: Projection, lineage: str) -> LineageState:
    """The lineage, if it can be consolidated now; else ConsolidationRefused saying why."""
    lin = p.lineages.get(lineage)
    if lin is None:
        raise ConsolidationRefused(f"no lineage {lineage!r}: no job was ever submitted to it")
    if lin.state == "consolidating":
        raise ConsolidationRefused(
            f"lineage {lineage!r} has a consolidation in progress; if nothing runs it, "
            "`ftctl recover` completes or discards it"
        )
    if lin.head_job is None:
        raise ConsolidationRefused(
            f"lineage {lineage!r} has no completed adapter on its current base "
            f"({lin.base_model}): nothing to consolidate"
        )
    busy = blockers(p, lineage)
    if busy:
        raise ConsolidationRefused(
            f"jobs of lineage {lineage!r} are not finished: {', '.join(busy)}. Consolidation "
            "never runs under a job: let them finish (or cancel them), then consolidate"
        )
    return lin


def _adapter_sha(ws: Workspace, path: str) -> str | None:
    """sha256 of the adapter the journal recorded at ``path`` (None: it is not there, or unreadable)."""
    try:
        return ck.adapter_sha256(ws.abs(path))
    except OSError:
        return None


def set_head(ws: Workspace, ledger: Ledger, job: str) -> ev.HeadSet:
    """Make a completed job of a lineage its head: what later jobs warm-start from and what
    consolidation fuses. The job must be on the lineage's current base, its adapter intact."""
    j = find_job(ledger, job)
    lin = ledger.state.lineages.get(j.lineage)
    if j.state != "completed":
        raise UserError(
            f"job {j.job} is {j.state!r}: only a completed job's adapter can be a lineage's head"
        )
    if lin is None or j.base_model != lin.base_model:
        raise UserError(
            f"job {j.job} trained on {j.base_model}, but lineage {j.lineage!r} now trains on "
            f"{lin.base_model if lin else '?'} (it was consolidated since): its adapter cannot be the head"
        )
    if lin.head_job == j.job:
        raise UserError(
            f"job {j.job} is already the head of lineage {j.lineage!r}", kept="nothing was changed"
        )
    if _adapter_sha(ws, j.adapter_path) != j.adapter_sha256:
        raise UserError(
            f"the adapter of job {j.job} at {j.adapter_path} no longer matches the sha256 recorded "
            "when it completed",
            kept="nothing was changed",
            do="restore it first",
        )
    e = ev.HeadSet(lineage=lin.name, job=j.job, previous=lin.head_job)
    # IllegalTransition while the lineage is consolidating
    ledger.commit(lineage_stream(lin.name), e)
    return e


def request(ledger: Ledger, lineage: str) -> None:
    """Ask the running daemon to consolidate once the lineage is idle."""
    if lineage not in ledger.state.lineages:
        check(ledger.state, lineage)  # raises: no such lineage
    ledger.commit(lineage_stream(lineage), ev.ConsolidationRequested(lineage=lineage))


def consolidate(
    ws: Workspace,
    ledger: Ledger,
    lineage: str,
    *,
    keep_models: int,
    min_free_gb: float,
    note: Note = quiet,
) -> fuse.FusedModel:
    lin = check(ledger.state, lineage)
    head = ledger.state.jobs[lin.head_job]
    base = lin.base_model
    base_dir = ws.abs(
        base
    )  # the journal's paths are relative to the workspace: used where it is now
    need = (fuse.folder_bytes(base_dir) + fuse.fused_bytes(base_dir)) / system.GB + min_free_gb
    ws.models.mkdir(parents=True, exist_ok=True)
    free = system.free_disk_gb(ws.models)
    if free < need:
        raise ConsolidationRefused(
            f"only {free:.2f} GB free, fusing needs about {need:.2f} GB (the base model, "
            "the fused one — dequantized if the base is quantized — plus min_free_disk_gb)",
            do="free space and retry",
        )
    if _adapter_sha(ws, head.adapter_path) != head.adapter_sha256:
        raise ConsolidationRefused(
            f"the adapter of job {head.job} at {head.adapter_path} no longer matches the sha256 "
            "recorded when it completed",
            do="restore it before consolidating",
        )
    version = max([lin.base_version] + [m.version for m in lin.models]) + 1
    stream = lineage_stream(lineage)
    ledger.commit(
        stream,
        ev.ConsolidationStarted(
            lineage=lineage,
            version=version,
            base_model=base,
            adapter_path=head.adapter_path,
            adapter_sha256=head.adapter_sha256,
            temp_path=ws.rel(fuse.temp_dir(ws.models, version)),
        ),
    )
    what = (
        f"promoting job {head.job}'s full fine-tune ({base} with its trained layers; nothing to fuse)"
        if fuse.fine_tune_type(ws.abs(head.adapter_path)) == "full"
        else f"fusing job {head.job}'s adapter into {base}"
    )
    note(f"lineage {lineage}: {what} -> models/v{version:04d}")
    try:
        fused = fuse.fuse(base_dir, ws.abs(head.adapter_path), ws.models, version)
    except BaseException as e:
        ledger.commit(
            stream,
            ev.ConsolidationAborted(
                lineage=lineage, version=version, reason=f"{type(e).__name__}: {e}"
            ),
        )
        if isinstance(e, Exception):
            raise ConsolidationRefused(
                f"consolidation v{version} failed and was discarded ({e}); the old base and "
                "adapter are intact and still in use"
            ) from e
        raise
    ledger.commit(
        stream,
        ev.BasePromoted(
            lineage=lineage,
            version=version,
            model_path=ws.rel(fused.path),
            weights_sha256=fused.weights_sha256,
            previous_base=base,
        ),
    )
    note(
        f"lineage {lineage}: base v{version} promoted ({fused.path}, max |logit diff| {fused.max_abs_diff:.2e}); "
        "new jobs train on it from scratch (a fresh adapter, or its weights as they are for full)",
        "ok",
    )
    crash_point("consolidate_after_event", version)
    retire(ws, ledger, lineage, keep_models, note)
    return fused


def retire(
    ws: Workspace, ledger: Ledger, lineage: str, keep_models: int, note: Note = quiet
) -> None:
    """After the promotion is committed: prune the old base's checkpoints, then old fused models."""
    for line in retention.spared(ws, ledger.state, ledger.state.lineages[lineage]):
        note(line)
    for step in (
        lambda p: retention.superseded(ws, p, p.lineages[lineage]),
        lambda p: retention.models(ws, p, p.lineages[lineage], keep_models),
    ):
        repairs = step(ledger.state)
        for r in repairs:
            note(r.what)
        apply(ledger, repairs)


def repairs(ws: Workspace, p: Projection) -> list[Repair]:
    """What recovery does for consolidation: finish or discard a half-done one, delete model folders
    no event accounts for, and retire what a promotion superseded."""
    out = [_pending(ws, lin) for lin in p.lineages.values() if lin.pending is not None]
    out += _model_debris(ws, p)
    for lin in p.lineages.values():
        out += retention.superseded(ws, p, lin)
    return out


def _pending(ws: Workspace, lin: LineageState) -> Repair:
    """A consolidation died midway: complete it if its model is whole, else discard the output.
    Either way the lineage ends in one good state: new base promoted, or old base + adapter."""
    version, final = lin.pending.version, fuse.model_dir(ws.models, lin.pending.version)
    stream = lineage_stream(lin.name)
    temps = list(ws.models.glob(f".tmp-v{version:04d}-*"))

    def cleanup(paths=temps):
        for t in paths:
            shutil.rmtree(t, ignore_errors=True)

    if final.exists():
        try:
            sha = fuse.verify_model_dir(final)
        except fuse.ModelCorrupt as e:
            return Repair(
                f"lineage {lin.name}: fused model v{version} is incomplete ({e.reason}): discard it, keep the old base",
                stream,
                [
                    ev.ConsolidationAborted(
                        lineage=lin.name, version=version, reason=f"recovery: {e.reason}"
                    )
                ],
                after=lambda: cleanup(temps + [final]),
            )
        return Repair(
            f"lineage {lin.name}: fused model v{version} is complete and verified: promote it",
            stream,
            [
                ev.BasePromoted(
                    lineage=lin.name,
                    version=version,
                    model_path=ws.rel(final),
                    weights_sha256=sha,
                    previous_base=lin.pending.base_model,
                )
            ],
            after=cleanup,
        )
    return Repair(
        f"lineage {lin.name}: consolidation v{version} died before its model was complete: discard the partial output",
        stream,
        [
            ev.ConsolidationAborted(
                lineage=lin.name,
                version=version,
                reason="interrupted; recovery discarded the partial output",
            )
        ],
        after=cleanup,
    )


def _model_debris(ws: Workspace, p: Projection) -> list[Repair]:
    if not ws.models.exists():
        return []
    pending = {lin.pending.version for lin in p.lineages.values() if lin.pending}
    keep = {fuse.model_dir(ws.models, v).name for v in pending}
    keep_tmp = tuple(f".tmp-v{v:04d}-" for v in pending)
    known = {m.path for lin in p.lineages.values() for m in lin.models}
    # Only folders named as ftctl names them (vNNNN, .tmp-vNNNN-PID): anything else in models/ is not
    # ftctl's (a user's own model folder, say), and is never deleted.
    out = _import_debris(ws, p)
    for d in sorted(ws.models.iterdir()):
        if (
            d.name in keep
            or d.name.startswith(keep_tmp)
            or ws.rel(d) in known
            or d.name == IMPORTED
            or not _FUSED_NAME.match(d.name)
        ):
            continue
        why = (
            "temp folder of a fuse that died"
            if d.name.startswith(".tmp-")
            else "model folder never promoted"
        )
        out.append(
            Repair(
                f"delete models/{d.name}: {why}",
                DAEMON_STREAM,
                [ev.DebrisRemoved(path=ws.rel(d), reason=why)],
                after=rm(d),
            )
        )
    return out


def _import_debris(ws: Workspace, p: Projection) -> list[Repair]:
    """models/imported/: a folder no model_imported event names is an import that died (its temp
    folder, or the renamed folder before its event)."""
    root = ws.models / IMPORTED
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if ws.rel(d) in p.imported or not (
            d.name.startswith(".tmp-") or (d / gguf.MANIFEST).is_file()
        ):
            continue  # committed, or not an import of ftctl's (no manifest of ours): never deleted
        why = (
            "temp folder of an import that died"
            if d.name.startswith(".tmp-")
            else "imported model never committed"
        )
        out.append(
            Repair(
                f"delete models/{IMPORTED}/{d.name}: {why}",
                DAEMON_STREAM,
                [ev.DebrisRemoved(path=ws.rel(d), reason=why)],
                after=rm(d),
            )
        )
    return out


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
    last_local = last.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
    return last_local < slot
