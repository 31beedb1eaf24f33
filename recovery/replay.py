"""Replay: the journal folded into a projection — latest snapshot + the events after it — and time
travel (the projection as it was after any event). Read-only but for the snapshots it keeps fresh
(``write``); the one write path, which applies what it appends by this same fold, is control/ledger.py.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

from ftctl.core import state as S
from ftctl.events.journal import Journal

# events of tail after which a load (or the live ledger) writes a fresh snapshot
SNAPSHOT_EVERY = 2000
# Time travel: older snapshots are kept as milestones this many events apart (compressed), at most
# SNAPSHOT_MILESTONES of them (past that the spacing doubles). See docs/architecture.md, "Snapshots".
SNAPSHOT_INTERVAL = 50_000
SNAPSHOT_MILESTONES = 40


def save(journal: Journal, p: S.Projection, *, compress: bool = False) -> None:
    journal.save_snapshot(
        p.seq,
        S.SNAPSHOT_FORMAT,
        S.to_snapshot(p),
        interval=SNAPSHOT_INTERVAL,
        milestones=SNAPSHOT_MILESTONES,
        compress=compress,
    )


@contextmanager
def _gc_paused():
    """Replay creates millions of small objects, none in a cycle: the cyclic GC only slows it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load(journal: Journal, *, snapshot: bool = True, write: bool = True) -> S.Projection:
    """Rebuild the projection: latest snapshot + the events after it.

    With ``write`` (and ``snapshot``), a tail of SNAPSHOT_EVERY events or more is saved as a fresh
    snapshot, and a tail that crosses multiples of SNAPSHOT_INTERVAL leaves a milestone at each
    (so the first load of a long journal also makes every later point of it quick to travel to).
    ``write=False`` is for queries (`ftctl status`, `history`, `replay`): they never change the file."""
    p = S.Projection()
    if snapshot:
        snap = journal.latest_snapshot(S.SNAPSHOT_FORMAT)
        if snap is not None:
            p = S.from_snapshot(snap[1])
    before = p.seq
    writing = snapshot and write
    with _gc_paused():
        if writing:
            end = journal.last_seq()
            mark = (p.seq // SNAPSHOT_INTERVAL + 1) * SNAPSHOT_INTERVAL
            while mark < end:
                S.fold_rows(journal.rows(after=p.seq, to=mark), p)
                save(journal, p, compress=True)
                mark += SNAPSHOT_INTERVAL
        S.fold_rows(journal.rows(after=p.seq), p)
    if writing and p.seq - before >= SNAPSHOT_EVERY:
        save(journal, p)
    return p


def state_at(journal: Journal, seq: int) -> S.Projection:
    """The projection exactly as it was after event ``seq`` (replay-based debugging)."""
    snap = journal.latest_snapshot(S.SNAPSHOT_FORMAT, at_most=seq)
    p = S.from_snapshot(snap[1]) if snap is not None else S.Projection()
    with _gc_paused():
        return S.fold_rows(journal.rows(after=p.seq, to=seq), p)
