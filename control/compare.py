"""`ftctl compare` and the page's runs table: jobs side by side, from the journal alone.

Each job's figures come from the projection (config, data, the epochs it made, the published result
and an early stop, evaluations, test results, the device it trained on, crashes, resumes, a guard's
planned restarts, alerts, when it started and ended) and from one aggregate query over the metrics
table (tokens/s, peak memory, the last report): no event stream is read, so 200 jobs of a
million-event journal answer in well under a second (bench/compare.py). core/compare.py makes the
columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec

from ftctl.control.ledger import Ledger
from ftctl.core import compare as C
from ftctl.core.config import epochs_trained
from ftctl.core.state import JobState
from ftctl.events.errors import UserError
from ftctl.events.types import ts_epoch

from .metrics import select_jobs


@dataclass(frozen=True)
class Comparison:
    columns: list[str]  # the figures shown, then the config keys
    differing: list[str]  # the config keys whose values differ between the jobs
    rows: list[dict[str, Any]]  # a row per job, in the order asked (or sorted)

    @property
    def keys(self) -> list[str]:
        """The config-key columns (the rest are figures)."""
        return [c for c in self.columns if c not in C.FIGURES]

    def to_builtins(self) -> dict:
        return {
            "columns": self.columns,
            "keys": self.keys,
            "differing": self.differing,
            "rows": self.rows,
        }


def choose(
    ledger: Ledger, jobs: list[str], lineage: str | None, last: int | None
) -> list[JobState]:
    """The jobs named, a lineage's jobs, or the ``last`` jobs submitted (rejected ones trained nothing)."""
    if last is not None:
        if jobs or lineage:
            raise UserError(
                "name jobs, --lineage NAME or --last N: one of them", do="drop the others"
            )
        if last < 1:
            raise UserError(f"--last {last}: name how many of the latest jobs, 1 or more")
        done = [j for j in ledger.state.jobs.values() if j.state != "rejected"]
        if not done:
            raise UserError("no jobs to compare yet: `ftctl submit` one")
        return done[-last:]
    if jobs and lineage:
        raise UserError("name jobs or --lineage NAME, not both", do="drop one of them")
    out = select_jobs(ledger, jobs, lineage)
    rejected = [j.job for j in out if j.config is None]
    if rejected:
        raise UserError(
            f"job {', '.join(rejected)} was rejected at submission: it has no config or curve to compare",
            do="leave it out (`ftctl status --all` lists the jobs)",
        )
    return list({j.job: j for j in out}.values())  # a job named twice is one row


def figures(j: JobState, agg: dict | None, now: float) -> dict[str, Any]:
    """One job's figures, as core/compare.py's FIGURES name them (None: not recorded)."""
    agg = agg or {}
    t = j.last_eval
    wall = None
    if j.started_at:
        end = ts_epoch(j.ended_at) if j.ended_at else now
        wall = round(max(0.0, end - ts_epoch(j.started_at)), 1)
    steps = max(j.step, agg.get("last_step") or 0) if j.started_at else None
    passes = epochs_trained(j.config, steps, j.train_examples) if steps is not None else None
    return {
        "job": j.job,
        "name": j.name,
        "lineage": j.lineage,
        "state": j.state,
        "data_file": j.data_path or None,
        "examples": j.examples or None,
        "steps": steps,
        # passes over the training data (step / batches per epoch), by epochs or by iters alike
        "epochs_trained": round(passes, 2) if passes is not None else None,
        "final_loss": agg.get("last_loss"),
        "best_val_loss": j.best_val_loss,
        "best_val_step": j.best_val_step if j.best_val_loss is not None else None,
        "final_val_loss": j.last_val_loss,
        "final_val_step": j.last_val_step,
        # the checkpoint the adapter was published from (config `result`: best or last)
        "result_step": j.result_step,
        "result_val_loss": j.result_val_loss,
        "stopped_early": j.stopped_early_step,  # the step early stopping ended training at
        "test_loss": t.adapter_loss if t else None,
        "test_ppl": t.adapter_ppl if t else None,
        "base_test_loss": t.base_loss if t else None,
        "tokens_per_s": round(agg["tokens_per_s"], 1) if agg.get("tokens_per_s") else None,
        "peak_mem_gb": agg.get("peak_mem_gb"),
        "device": j.env.get(
            "device"
        ),  # the latest attempt's, from its fingerprint (training_started)
        "wall_s": wall,
        "crashes": len(j.crashes) if j.started_at else None,
        "resumes": j.resumes if j.started_at else None,
        "planned_restarts": j.planned_restarts if j.started_at else None,
        "alerts": len(j.alerts) if j.started_at else None,
    }


def compare(
    ledger: Ledger,
    jobs: list[str],
    lineage: str | None = None,
    last: int | None = None,
    *,
    all_keys: bool = False,
    sort: str | None = None,
    reverse: bool = False,
    now: float | None = None,
) -> Comparison:
    chosen = choose(ledger, jobs, lineage, last)
    agg = ledger.journal.metric_summary([j.job for j in chosen])
    now = time.time() if now is None else now
    figs = [figures(j, agg.get(j.job), now) for j in chosen]
    configs = [msgspec.to_builtins(j.config) for j in chosen]
    columns, diff, rows = C.table(figs, configs, all_keys)
    if sort is not None:
        if sort not in columns:
            raise UserError(f"no column {sort!r} to sort by; the columns are: {', '.join(columns)}")
        rows = C.sort_rows(rows, sort, reverse)
    elif reverse:
        rows = rows[::-1]
    return Comparison(columns, diff, rows)
