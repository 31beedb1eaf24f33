"""Training curves out of the journal: every recorded point of a job, which attempt recorded it,
and whether a resume superseded it; checkpoints, crashes and resumes as markers.

A resume rewinds to the last committed checkpoint: what the crashed attempt reported after that
checkpoint was never committed and was trained again. Such a point is *superseded*: it stays in
the journal (it happened) and is shown on request (`ftctl metrics --all`), but the *effective*
curve has, for each step, only the attempt that finally covered it. Global steps continue across
warm-started jobs of a lineage (the journal records them so), so one lineage is one x axis.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from operator import itemgetter

from ftctl.control.ledger import Ledger
from ftctl.core.config import batches_per_epoch
from ftctl.core.state import JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.journal import Journal
from ftctl.events.types import READINGS

from .jobs import find_job

# the device and its readings per report (events.types.Metrics; adapters/telemetry.py)
DEVICE_COLUMNS = ("device", *READINGS)
COLUMNS = (
    "job",
    "attempt",
    "global_step",
    "step",
    "loss",
    "val_loss",
    "lr",
    "tokens_per_s",
    "rank_tokens_per_s",
    "peak_mem_gb",
    "trained_tokens",
    *DEVICE_COLUMNS,
    "ts",
    "superseded",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "accuracy",
    "val_reward_margin",
    "val_accuracy",
    "val_chosen_reward",
    "val_rejected_reward",
)  # rank_tokens_per_s: a data-parallel job's, per rank; the rewards, margin and accuracy: preference
# training's (train_mode dpo, orpo), null for sft — of the report's window, and (val_) of the
# validation pairs (`evaluated`)
PAIRS = ev.PAIR_FIELDS
VAL_PAIRS = tuple(f"val_{k}" for k in PAIRS)
_NO_PAIRS = dict.fromkeys(PAIRS + VAL_PAIRS)


def val_pairs(pairs: ev.PairStats | None) -> dict[str, float | None]:
    """An evaluation's pair figures under the names every view gives them (these columns, TensorBoard,
    the trackers): val_chosen_reward, …; {} for sft."""
    return {} if pairs is None else dict(zip(VAL_PAIRS, (getattr(pairs, k) for k in PAIRS)))


@dataclass(frozen=True)
class Marker:
    kind: str  # "checkpoint" | "crash" | "resume" | "completed" | "alert"
    step: int
    global_step: int
    seq: int  # the journal event
    ts: str
    text: str


@dataclass
class Series:
    job: str
    name: str
    lineage: str
    state: str
    iters: int
    global_step_base: int
    # the batches of one epoch of its training data (core/config.py): step / this = epochs; None when
    # not known (a job trained by iters submitted before job_submitted recorded train_examples)
    batches_per_epoch: int | None
    # COLUMNS + "id" (the metrics row; None for a val-only point)
    points: list[dict] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    last_id: int = 0  # the newest metrics row seen: `since_id` for the next incremental read

    @property
    def counts(self) -> dict[str, int]:
        live = [p for p in self.points if not p["superseded"]]
        return {
            "points": len(self.points),
            "effective": len(live),
            "train": sum(p["loss"] is not None for p in live),
            "val": sum(p["val_loss"] is not None for p in live),
            "superseded": len(self.points) - len(live),
        }


def select_jobs(ledger: Ledger, jobs: list[str], lineage: str | None = None) -> list[JobState]:
    """The jobs named (7 or 0007), or every job of a lineage in submission order (rejected ones have no curve)."""
    if lineage is not None:
        out = [
            j for j in ledger.state.jobs.values() if j.lineage == lineage and j.state != "rejected"
        ]
        if not out:
            known = sorted({j.lineage for j in ledger.state.jobs.values() if j.state != "rejected"})
            raise UserError(
                f"lineage {lineage!r} has no jobs"
                + (f" (lineages: {', '.join(known)})" if known else "")
            )
        return out
    if not jobs:
        raise UserError("name at least one job (7 or 0007), or --lineage NAME")
    return [find_job(ledger, x) for x in jobs]


def series(
    journal: Journal,
    j: JobState,
    *,
    since: int | None = None,
    superseded: bool = False,
    after_id: int = 0,
) -> Series:
    """The job's points (global step > ``since`` if given), oldest first. With ``superseded`` also
    the points a resume rewound past, flagged; ``after_id``: only reports recorded after that row
    (a live view's increment; val points come from events and are left to a full read)."""
    starts: list[tuple[str, int, int]] = []  # (ts, attempt, resume_step) of every attempt
    vals: list[tuple[str, int, int, float | None]] = []
    # (ts, step, tokens/s of each rank) of a data-parallel job
    ranks: list[tuple[str, int, list]] = []
    markers: list[Marker] = []
    crashes: list[
        tuple[int, str, str, int]
    ] = []  # (marker index, ts, its attempt's start ts, base)
    base = j.global_step_base
    for r in journal.read(stream=job_stream(j.job)):
        e = r.event
        if isinstance(e, ev.TrainingStarted):
            starts.append((r.ts, e.attempt, e.resume_step))
            base = e.global_step_base
            if e.resume_checkpoint:
                markers.append(
                    Marker(
                        "resume",
                        e.resume_step,
                        base + e.resume_step,
                        r.seq,
                        r.ts,
                        f"attempt {e.attempt} resumed from step {e.resume_step}",
                    )
                )
        elif isinstance(e, ev.CheckpointCommitted):
            c = e.checkpoint
            markers.append(
                Marker(
                    "checkpoint", c.step, c.global_step, r.seq, r.ts, f"checkpoint at step {c.step}"
                )
            )
        elif isinstance(e, ev.Crashed):
            crashes.append((len(markers), r.ts, starts[-1][0] if starts else "", base))
            step = e.step if e.step is not None else 0
            markers.append(
                Marker(
                    "crash",
                    step,
                    base + step,
                    r.seq,
                    r.ts,
                    f"crashed ({e.category}) at step {step}",
                )
            )
        elif isinstance(e, ev.Completed):
            markers.append(
                Marker(
                    "completed", e.step, e.global_step, r.seq, r.ts, f"completed at step {e.step}"
                )
            )
        elif isinstance(e, ev.Evaluated):
            vals.append((r.ts, e.step, e.global_step, e.val_loss, e.preference))
        elif isinstance(e, ev.TrainingAlert):
            markers.append(Marker("alert", e.step, e.global_step, r.seq, r.ts, e.text))
        elif isinstance(e, ev.RanksReported):
            ranks.append((r.ts, e.step, e.tokens_per_s))
    stamps = [s[0] for s in starts]
    # After attempt k, training went on from min(resume steps of the later attempts): a point of
    # attempt k beyond it was rewound over.
    rewound = [1 << 62] * (len(starts) + 2)
    for k in range(len(starts) - 1, -1, -1):
        rewound[k] = min(rewound[k + 1], starts[k][2])

    def attempt_of(ts: str) -> int:
        # a report before any recorded start: the first attempt
        return max(bisect_right(stamps, ts), 1)

    out = Series(
        job=j.job,
        name=j.name,
        lineage=j.lineage,
        state=j.state,
        iters=j.iters,
        global_step_base=base,
        batches_per_epoch=batches_per_epoch(j.config, j.train_examples) if j.config else None,
        markers=markers,
    )
    rows = journal.metric_rows(j.job, after_id)
    out.last_id = rows[-1][0] if rows else after_id
    points: dict[tuple[int, int], dict] = {}
    lo = -1 if since is None else since
    # rows come in the order recorded, so their times only grow: walk the attempts alongside
    k = attempt_of(rows[0][1]) if rows else 1
    nxt = stamps[k] if k < len(stamps) else None  # when the next attempt started
    limit = rewound[k]
    job = j.job
    for mid, ts, step, gstep, loss, lr, tps, mem, tokens, *rest in rows:
        pairs, dev = rest[: len(PAIRS)], rest[len(PAIRS) :]  # Metrics' order
        while nxt is not None and ts >= nxt:
            k += 1
            nxt = stamps[k] if k < len(stamps) else None
            limit = rewound[k]
        if gstep <= lo:
            continue
        gone = step > limit
        if gone and not superseded:
            continue
        points[(k, step)] = {
            "job": job,
            "attempt": k,
            "global_step": gstep,
            "step": step,
            "loss": loss,
            "val_loss": None,
            "lr": lr,
            "tokens_per_s": tps,
            "rank_tokens_per_s": None,
            "peak_mem_gb": mem,
            "trained_tokens": tokens,
            **dict(zip(DEVICE_COLUMNS, dev)),
            "ts": ts,
            "superseded": gone,
            "id": mid,
            **_NO_PAIRS,
            **dict(zip(PAIRS, pairs)),
        }
    if not after_id:
        for ts, step, gstep, val, pref in vals:
            if gstep <= lo:
                continue
            k = attempt_of(ts)
            gone = step > rewound[k]
            if gone and not superseded:
                continue
            p = points.get((k, step))
            if p is None:
                points[(k, step)] = {
                    "job": j.job,
                    "attempt": k,
                    "global_step": gstep,
                    "step": step,
                    "loss": None,
                    "val_loss": val,
                    "lr": None,
                    "tokens_per_s": None,
                    "rank_tokens_per_s": None,
                    "peak_mem_gb": None,
                    "trained_tokens": None,
                    **dict.fromkeys(DEVICE_COLUMNS),
                    "ts": ts,
                    "superseded": gone,
                    "id": None,
                    **_NO_PAIRS,
                }
                p = points[(k, step)]
            p["val_loss"] = val
            p.update(val_pairs(pref))
    for (
        ts,
        step,
        rates,
    ) in ranks:  # journalled once every rank reported that step: after rank 0's metrics row
        p = points.get((attempt_of(ts), step))
        if p is not None:
            p["rank_tokens_per_s"] = rates
    out.points = sorted(points.values(), key=itemgetter("global_step", "attempt"))
    if not after_id:
        _crash_steps(markers, crashes, rows, vals)
    return out


def _crash_steps(markers: list[Marker], crashes, rows, vals) -> None:
    """Each crash at the last step its attempt is known to have run: the crash's own step, or a
    later report or evaluation of that attempt (a crash recorded with its checkpoint's step — a
    dead daemon's — is not drawn back at the checkpoint)."""
    seen = sorted([(r[1], r[2]) for r in rows] + [(v[0], v[1]) for v in vals])
    stamps = [t for t, _ in seen]
    for i, ts, started, base in crashes:
        m = markers[i]
        ran = [step for _, step in seen[bisect_left(stamps, started) : bisect_left(stamps, ts)]]
        step = max([m.step, *ran])
        if step != m.step:
            markers[i] = Marker(
                "crash",
                step,
                base + step,
                m.seq,
                m.ts,
                m.text.rsplit(" at step ", 1)[0]
                + f" after step {step} (the last step reported before it)",
            )


def lineage_series(
    ledger: Ledger, jobs: list[str], lineage: str | None = None, **kw
) -> list[Series]:
    return [series(ledger.journal, j, **kw) for j in select_jobs(ledger, jobs, lineage)]
