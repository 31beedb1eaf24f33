"""Recovery as the application runs it: the journal's repairs (recovery.reconcile: stale jobs,
orphans, debris, corrupt checkpoints) plus consolidation's (a half-done fuse, model debris, what
a promotion superseded). Run by every daemon start, `ftctl recover`, `ftctl doctor --fix` and
before `ftctl consolidate` (``consolidate_now``: the lock, recovery, then the fuse), always holding
the daemon lock.
"""

from __future__ import annotations

from collections.abc import Callable

from ftctl.adapters import process
from ftctl.adapters.fuse import FusedModel
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.state import DAEMON_STREAM
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.recovery import reconcile
from ftctl.recovery.reconcile import Repair

from . import consolidation
from .reporter import Note, quiet


class DaemonRunning(UserError):
    """The daemon lock is held: the running daemon recovered at its start and owns the workspace."""

    kept = "nothing was changed"

    def __init__(self, holder: str):
        self.holder = holder
        super().__init__(
            f"a daemon is running ({holder}); it recovered at its start and keeps the workspace "
            "consistent now"
        )


def plan(ws: Workspace, ledger: Ledger) -> list[Repair]:
    """Every repair due now; changes nothing (``ftctl recover --dry-run``)."""
    return reconcile.plan(ws, ledger) + consolidation.repairs(ws, ledger.state) + _scratch(ws)


def _scratch(ws: Workspace) -> list[Repair]:
    """The scratch copies of reproductions killed before they cleaned up (never the job's own files)."""
    return [
        Repair(
            f"delete {d.name}/ in run/: the scratch copy of a reproduction that was killed",
            DAEMON_STREAM,
            [ev.DebrisRemoved(path=ws.rel(d), reason="scratch folder of a killed reproduction")],
            after=reconcile.rm(d),
        )
        for d in ws.abandoned_scratch()
    ]


def recover(
    ws: Workspace, ledger: Ledger, on_repair: Callable[[Repair], None] = lambda r: None
) -> list[Repair]:
    """Plan and apply until nothing is left (a repair can reveal the next: promoting a pending
    consolidation makes the old base's checkpoints retirable), then record that recovery ran.
    Findings (a missing checkpoint) are reported once, never acted on. Returns the repairs and the
    findings. The caller holds the daemon lock."""
    done: list[Repair] = []
    said: set[str] = set()
    for _ in range(5):
        repairs = plan(ws, ledger)
        new = [r for r in repairs if not (r.finding and r.what in said)]
        for r in new:
            on_repair(r)
        said |= {r.what for r in new if r.finding}
        done += new
        todo = [r for r in repairs if not r.finding]
        if not todo:
            break
        reconcile.apply(ledger, todo)
    fixed = [r for r in done if not r.finding]
    if fixed:
        ledger.commit(
            DAEMON_STREAM,
            ev.RecoveryFinished(repairs=len(fixed), summary=[r.what for r in fixed][:50]),
        )
    return done


class Locked:
    """``with Locked(ws):`` — hold the daemon lock for a one-off maintenance command, or raise
    DaemonRunning."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def __enter__(self) -> "Locked":
        self.ws.require()
        try:
            self.fd = process.acquire_lock(self.ws.lock_path)
        except process.LockHeld as e:
            raise DaemonRunning(e.holder.strip()) from None
        return self

    def __exit__(self, *exc) -> None:
        process.release_lock(self.fd)


def run(ws: Workspace, ledger: Ledger, *, dry_run: bool = False) -> list[Repair]:
    """`ftctl recover [--dry-run]`: refused (DaemonRunning) while a daemon runs."""
    with Locked(ws):
        return plan(ws, ledger) if dry_run else recover(ws, ledger)


def consolidate_now(
    ws: Workspace, ledger: Ledger, lineage: str, note: Note = quiet
) -> FusedModel | None:
    """`ftctl consolidate`: with no daemon running, recover then consolidate now (holding the lock);
    with one running, record a request it carries out when the lineage is idle (returns None)."""
    try:
        with Locked(ws):
            cfg, _ = ws.load_config()
            recover(ws, ledger)  # never fuse on top of debris
            return consolidation.consolidate(
                ws,
                ledger,
                lineage,
                keep_models=cfg.consolidation.keep_models,
                min_free_gb=cfg.min_free_disk_gb,
                note=note,
            )
    except DaemonRunning:
        consolidation.request(ledger, lineage)
        return None
