"""The ledger: the journal and its live projection — the one write path every command uses.

``Ledger.commit`` is the command path: the event is checked against the state machine
*before* it is appended (``IllegalTransition`` otherwise, and nothing is written), and the
projection learns of it only *after* the append committed, by reading it back from the
journal — the same code path as a replay, so live state and replayed state cannot differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ftctl.core import state as S
from ftctl.core.machine import IllegalTransition
from ftctl.events.journal import ConcurrencyError, Journal
from ftctl.events.types import EventBase, Recorded
from ftctl.recovery.replay import SNAPSHOT_EVERY, load, save


def _subject(stream: str) -> str:
    kind, _, name = stream.partition(":")
    return f"{kind} {name}" if name else kind


def _stream_of(e: EventBase) -> str:
    """The one stream an event may be appended to: replay files it by its body, not its stream."""
    if type(e) in S.JOB_HANDLERS:
        return S.job_stream(e.job)
    if isinstance(e, S.LINEAGE_TYPES):
        return S.lineage_stream(e.lineage)
    return S.DAEMON_STREAM


class Ledger:
    """A journal plus its live projection."""

    def __init__(self, journal: Journal, *, write_snapshots: bool = True):
        """``write_snapshots=False``: a read-only query's ledger (see ``load``)."""
        self.journal = journal
        self.write_snapshots = write_snapshots and journal.readonly is None
        self.state = load(journal, write=self.write_snapshots)
        self.snapshot_seq = self.state.seq

    @classmethod
    def open(cls, path: Path) -> "Ledger":
        return cls(Journal.open(path))

    def close(self) -> None:
        self.journal.close()

    def refresh(self) -> list[Recorded]:
        """Apply what other processes appended since we last looked."""
        new = list(self.journal.read(after=self.state.seq))
        S.fold(new, self.state)
        if self.write_snapshots and self.state.seq - self.snapshot_seq >= SNAPSHOT_EVERY:
            # A long-lived ledger (the daemon's) keeps the snapshots fresh as it goes, so that the
            # read-only queries beside it fold a short tail.
            self.snapshot()
        return new

    def _version_and_check(self, stream: str, events: Sequence[EventBase]) -> int:
        for e in events:
            if _stream_of(e) != stream:
                raise ValueError(
                    f"a {type(e).kind()!r} event belongs to stream {_stream_of(e)!r}, not "
                    f"{stream!r}; nothing was appended"
                )
        p = self.state
        if stream.startswith("job:"):
            j = p.jobs.get(stream[4:])
            state, version = (j.state, j.version) if j else ("new", 0)
            lineage = False
        elif stream.startswith("lineage:"):
            lin = p.lineages.get(stream[8:])
            state, version = (lin.state, lin.version) if lin else ("idle", 0)
            lineage = True
        else:
            return p.daemon.version
        for e in events:
            new = S.check_command(state, e, lineage=lineage)
            if new is None:
                raise IllegalTransition(_subject(stream), state, type(e).kind())
            state = new
        return version

    def commit(self, stream: str, *events: EventBase, retries: int = 5) -> list[Recorded]:
        """Validate, append atomically, then apply. Retries when another process appended to
        the same stream first, re-validating against the state it left."""
        for attempt in range(retries):
            self.refresh()
            expected = self._version_and_check(stream, events)
            try:
                recs = self.journal.append(stream, events, expected)
            except ConcurrencyError:
                if attempt == retries - 1:
                    raise
                continue
            self.refresh()
            return recs
        raise AssertionError("unreachable")

    def snapshot(self) -> None:
        save(self.journal, self.state)
        self.snapshot_seq = self.state.seq
