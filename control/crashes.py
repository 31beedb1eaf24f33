"""The crash list of a workspace, numbered per job, each with its latest reproduction: one query
behind `ftctl crashes` and the status page."""

from __future__ import annotations

from dataclasses import dataclass

from ftctl.control.ledger import Ledger
from ftctl.core.state import job_stream
from ftctl.events import types as ev
from ftctl.events.types import Recorded


@dataclass(frozen=True)
class Crash:
    seq: int
    ts: str
    job: str
    event: ev.Crashed
    number: int = 0  # the job's crash number (1 = its first), as `reproduce --crash N` takes it
    reproduced: Recorded | None = None  # its latest crash_reproduced event, if it was ever replayed


def crashes(ledger: Ledger, limit: int | None = None) -> list[Crash]:
    """The newest ``limit`` crashes (all if None), oldest first. Only the streams of jobs that crashed
    are read, those that crashed last first, until there are enough (not every stream of a long journal)."""
    crashed = sorted(
        (j for j in ledger.state.jobs.values() if j.crashes),
        key=lambda j: (j.crashes[-1].ts, j.updated_seq),
        reverse=True,
    )
    out: list[Crash] = []
    for j in crashed:
        if limit is not None and len(out) >= limit and j.crashes[-1].ts <= out[-1].ts:
            break  # (times are in microseconds: a tie is a synthetic journal's, not a real one's)
        stream = job_stream(j.job)
        replays = {
            r.event.crash: r
            for r in ledger.journal.tagged(stream, ev.CrashReproduced.__struct_config__.tag)
        }
        out += [
            Crash(r.seq, r.ts, j.job, r.event, n, replays.get(n))
            for n, r in enumerate(
                ledger.journal.tagged(stream, ev.Crashed.__struct_config__.tag), 1
            )
        ]
        out.sort(key=lambda c: c.seq, reverse=True)
        out = out[:limit]
    return out[::-1]
