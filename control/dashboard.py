"""The queries behind `ftctl serve`'s page: a read-only view of a workspace.

The journal is opened with SQLite's read-only mode and the projection never writes snapshots, so
nothing the page does can change the workspace. The daemon's liveness is ``status``'s own answer
(the lock probe), and ``pulse`` is the cheap question a live page asks twice a second: did the
journal move (sequence number, metrics row), did the daemon live or die?
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.state import JobState, job_stream
from ftctl.events.errors import UserError
from ftctl.events.journal import Journal
from ftctl.events.types import Recorded
from ftctl.recovery.replay import state_at

from . import status as st
from .crashes import Crash, crashes
from .metrics import Series, series

HISTORY_TAIL = 40
CRASHES = 50


@dataclass(frozen=True)
class Pulse:
    seq: int
    metric_id: int
    alive: bool
    died: bool


class Viewer:
    """One workspace, read-only. Not thread-safe: one caller at a time (the server's event loop)."""

    def __init__(self, ws: Workspace):
        ws.require()
        self.ws = ws
        self.ledger = Ledger(Journal.open_readonly(ws.journal_path), write_snapshots=False)
        self._pulse: tuple[float, Pulse] | None = None

    def close(self) -> None:
        self.ledger.close()

    def refresh(self) -> None:
        self.ledger.refresh()

    def pulse(self, max_age: float = 0.0) -> Pulse:
        """Where the journal is and whether the daemon lives; reused for ``max_age`` seconds, so
        many open pages cost one look."""
        now = time.monotonic()
        if self._pulse is not None and now - self._pulse[0] < max_age:
            return self._pulse[1]
        self.refresh()
        d = st.daemon_view(self.ws, self.ledger)
        p = Pulse(self.ledger.state.seq, self.ledger.journal.last_metric_id(), d.alive, d.died)
        self._pulse = (now, p)
        return p

    def status(self) -> st.Status:
        self.refresh()
        return st.status(self.ws, self.ledger)

    def lineages(self) -> list:
        """Every lineage: its head job, its branches (completed jobs that did not become the head),
        its base (paths where the workspace is now). What the page shows beside the jobs."""
        self.refresh()
        return [st.located_lineage(self.ws, lin) for lin in self.ledger.state.lineages.values()]

    def history(self, n: int = HISTORY_TAIL, job: str | None = None) -> list[Recorded]:
        self.refresh()
        if job is not None:
            return list(self.ledger.journal.read(stream=job_stream(self.job(job).job)))
        last = self.ledger.journal.last_seq()
        return list(self.ledger.journal.read(after=max(0, last - n)))

    def crashes(self, limit: int = CRASHES) -> list[Crash]:
        """The newest ``limit`` crashes with their evidence and latest reproduction."""
        self.refresh()
        return crashes(self.ledger, limit)

    def job(self, job: str) -> JobState:
        j = self.ledger.state.jobs.get(job)
        if j is None:
            raise UserError(f"no job {job!r} in this workspace")
        return j

    def job_view(self, job: str) -> st.JobView:
        """The job as `ftctl status JOB` sees it now: live step, note, ETA."""
        self.refresh()
        return st.job_status(self.ws, self.ledger, self.job(job).job)[1]

    def series(self, job: str, *, superseded: bool = False, after_id: int = 0) -> Series:
        self.refresh()
        return series(self.ledger.journal, self.job(job), superseded=superseded, after_id=after_id)

    def replay(self, job: str, to: int) -> JobState:
        """The job as it was right after event ``to`` (as `ftctl replay`)."""
        self.refresh()
        self.job(job)
        last = self.ledger.state.seq
        if to < 0 or to > last:
            raise UserError(f"seq {to} is outside the journal (0..{last})")
        past = state_at(self.ledger.journal, to).jobs.get(job)
        if past is None:
            raise UserError(f"job {job} did not exist yet at seq {to}")
        return st.located(self.ws, past)  # its paths where the workspace is now
