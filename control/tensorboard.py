"""TensorBoard files from the journal: live while training (`metrics.tensorboard: true`) and after
the fact (`ftctl export-tb`).

Live, the daemon hands each report to ``Live`` *after* it is recorded in the journal, never on the
worker's path; a failure to write (tensorboardX missing, disk full) is said once and turns the
writer off for that attempt: it never stops the daemon. A resumed attempt purges what the crashed
one wrote after the resume point (adapters/tensorboard.py), so TensorBoard shows the effective
curve — the one `ftctl metrics` shows without `--all`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftctl.adapters import tensorboard as tb
from ftctl.adapters.workspace import Workspace
from ftctl.core.state import JobState
from ftctl.events.types import PAIR_FIELDS, Metrics, PairStats, ts_epoch
from ftctl.recovery.ledger import Ledger

from .jobs import UserError
from .metrics import select_jobs, series


def run_folder(root: Path, j: JobState) -> Path:
    return root / j.job


class Live:
    """The running attempt's TensorBoard writer (one per supervised attempt)."""

    def __init__(self, ws: Workspace, j: JobState, say: Callable[[str, str], None]):
        self.say, self.run, self.job = say, None, j.job
        if not (j.config and j.config.metrics.tensorboard):
            return
        good = j.good_checkpoints()
        # a later attempt goes on from its resume point (or from the start): TensorBoard drops what
        # earlier attempts wrote past it
        purge = (
            (good[-1].global_step if good else j.global_step_base) + 1 if j.attempt > 1 else None
        )
        try:
            self.run = tb.Run(run_folder(ws.tensorboard, j), attempt=j.attempt, purge_step=purge)
        except Exception as e:  # noqa: BLE001 - TensorBoard is a view: it may fail, training may not
            self._off(e)

    def _off(self, e: Exception) -> None:
        self.say(
            f"job {self.job}: TensorBoard files are not written for this attempt: {e} "
            "(training goes on; `ftctl export-tb` writes them from the journal later)",
            "warn",
        )
        self.run = None

    def report(self, m: Metrics) -> None:
        if self.run is not None:
            try:
                self.run.point(
                    m.global_step,
                    {
                        "loss": m.loss,
                        "lr": m.lr,
                        "tokens_per_s": m.tokens_per_s,
                        "peak_mem_gb": m.peak_mem_gb,
                        **{k: getattr(m, k) for k in PAIR_FIELDS},
                    },
                )
            except Exception as e:  # noqa: BLE001
                self._off(e)

    def val(self, global_step: int, val_loss: float | None, pairs: PairStats | None = None) -> None:
        if self.run is not None:
            try:
                more = (
                    {}
                    if pairs is None
                    else {
                        "val_accuracy": pairs.accuracy,
                        "val_reward_margin": pairs.reward_margin,
                    }
                )
                self.run.point(global_step, {"val_loss": val_loss, **more})
            except Exception as e:  # noqa: BLE001
                self._off(e)

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.close()
            except Exception as e:  # noqa: BLE001
                self._off(e)


@dataclass(frozen=True)
class Exported:
    job: str
    folder: str
    points: int


def export(
    ws: Workspace,
    ledger: Ledger,
    jobs: list[str],
    lineage: str | None = None,
    out: Path | None = None,
) -> list[Exported]:
    """Write each job's effective curve as one TensorBoard run folder ``OUT/<job>`` (default OUT:
    WS/tensorboard). A folder already there is replaced only if it holds nothing but TensorBoard
    event files (what ftctl writes there); the new one is written aside and renamed into place."""
    if not tb.available():
        raise UserError(f"`ftctl export-tb` needs tensorboardX: {tb.EXTRA}")
    if not jobs and lineage is None:
        selected = [j for j in ledger.state.jobs.values() if j.state != "rejected"]
        if not selected:
            raise UserError("no jobs yet: nothing to export")
    else:
        selected = select_jobs(ledger, jobs, lineage)
    root = out or ws.tensorboard
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    done = []
    for j in selected:
        dest = run_folder(root, j)
        if dest.exists() and (
            not dest.is_dir()
            or any(not p.name.startswith("events.out.tfevents.") for p in dest.iterdir())
        ):
            raise UserError(
                f"{dest} exists and holds files other than TensorBoard event files: it was not written by "
                "ftctl, so it is left alone; choose another folder with -o DIR"
            )
        s = series(ledger.journal, j)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{j.job}-", dir=root))
        try:
            run = tb.Run(tmp, attempt=0)
            for p in s.points:
                run.point(p["global_step"], p, walltime=ts_epoch(p["ts"]))
            run.close()
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        done.append(Exported(j.job, str(dest), len(s.points)))
    return done
