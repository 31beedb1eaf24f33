"""The journal read as a story: `ftctl history` (its selection and its --follow) and `ftctl replay` (a
job exactly as it was after an event). Read-only: a query never changes journal.db."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.state import JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.journal import Journal
from ftctl.recovery.replay import state_at

from .jobs import find_job
from .status import located

FOLLOW_EVERY_S = 0.5
CRASH_KINDS = ("crashed", "failed")


@dataclass(frozen=True)
class Selection:
    """Which events: one job's (None: all), only crashes and failures, after a point in the journal."""

    job: str | None = None
    crashes: bool = False
    since: tuple[str, str] | None = None  # ("seq", "42"), or (an event time, the text given)
    last: int | None = None  # only the last N of those


def _read(ledger: Ledger, sel: Selection, stream: str | None, after: int) -> list[ev.Recorded]:
    recs = list(ledger.journal.read(after=after, stream=stream))
    if sel.crashes:
        recs = [r for r in recs if type(r.event).kind() in CRASH_KINDS]
    return recs


def _stream(ledger: Ledger, sel: Selection) -> str | None:
    return job_stream(find_job(ledger, sel.job).job) if sel.job else None


def events(ledger: Ledger, sel: Selection) -> tuple[list[ev.Recorded], int]:
    """The selected events, oldest first, and the journal's last seq (where a follow goes on from)."""
    stream = _stream(ledger, sel)
    after = since_seq(ledger, sel.since)
    if sel.last is not None and stream is None and not sel.crashes:
        # seq has no gaps: skip reading the rest
        after = max(after, ledger.journal.last_seq() - sel.last)
    last = ledger.journal.last_seq()
    recs = _read(ledger, sel, stream, after)
    last = max([last, *(r.seq for r in recs)])  # what came in between is read, not read again
    if sel.last is not None:
        recs = recs[-sel.last :] if sel.last else []
    return recs, last


def follow(
    ledger: Ledger, sel: Selection, after: int, every_s: float = FOLLOW_EVERY_S
) -> Iterator[list[ev.Recorded]]:
    """The selected events appended after seq ``after``, a batch every ``every_s`` (empty when none
    came), for as long as the caller reads."""
    stream = _stream(ledger, sel)
    while True:
        time.sleep(every_s)
        new = _read(ledger, sel, stream, after)
        after = max([after, *(r.seq for r in new)])
        yield new


def since_seq(ledger: Ledger, since: tuple[str, str] | None) -> int:
    """`--since`: the seq to read after (a seq as given, or the last event before a time)."""
    if since is None:
        return 0
    kind, text = since
    return int(text) if kind == "seq" else ledger.journal.seq_before(kind)


@dataclass(frozen=True)
class Replayed:
    job: str
    at: int  # the seq it was replayed to
    last: int  # the journal's last seq, now
    state: JobState


def replay(ws: Workspace, journal: Journal, job: str, to: int) -> Replayed:
    """Job ``job`` exactly as it was after event ``to``, its paths where the workspace is now (as
    `status` shows them); ``journal`` is the workspace's (read-only will do), closed when done. Only
    the past is folded (the nearest snapshot at or before it, then its tail): the present projection
    is loaded only to word an error about a job id that does not exist."""
    try:
        # as find_job: "7" finds "0007"
        jid = job if journal.stream_version(job_stream(job)) else job.zfill(4)
        if not journal.stream_version(job_stream(jid)):
            find_job(Ledger(journal, write_snapshots=False), job)  # raises, naming the recent jobs
        last = journal.last_seq()
        if to < 0 or to > last:
            raise UserError(
                f"--to {to} is outside the journal (seq 0..{last})",
                kept="nothing was changed",
                do="`ftctl history` shows the seq of every event",
            )
        p = state_at(journal, to)
    finally:
        journal.close()
    past = p.jobs.get(jid)
    if past is None:
        raise UserError(
            f"job {jid} did not exist yet at seq {to} (it was submitted later)",
            do=f"`ftctl history {jid}` shows its events",
        )
    return Replayed(jid, to, last, located(ws, past))
