"""TensorBoard, all of it: event files written with tensorboardX (the `ftctl[tensorboard]` extra) from
the journal, live while training (`metrics.tensorboard: true`) and after the fact (`ftctl export-tb`).

One run folder per job; each attempt opens its own event file. A resumed attempt opens it with
``purge_step`` = the resume point's global step + 1: that writes TensorBoard's "restarted here"
marker (a SessionLog START at that step), and TensorBoard then drops every point at or past it
that was written before it — exactly the points the crashed attempt reported after its last
committed checkpoint. The curves never show a step twice or out of order.

Live, the daemon hands each report to ``Live`` *after* it is recorded in the journal, never on the
worker's path; a failure to write (tensorboardX missing, disk full) is said once and turns the
writer off for that attempt: it never stops the daemon. A resumed attempt purges what the crashed
one wrote after the resume point (``purge_step``), so TensorBoard shows the effective
curve — the one `ftctl metrics` shows without `--all`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.state import JobState
from ftctl.events.errors import UserError
from ftctl.events.types import PAIR_FIELDS, READINGS, Metrics, PairStats, ts_epoch

from .metrics import select_jobs, series, val_pairs

# --------------------------------------------------------------------------- the writer

EXTRA = "pip install 'ftctl[tensorboard]'"
TAGS = {
    "loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "lr",
    "tokens_per_s": "tokens_per_s",
    "peak_mem_gb": "peak_mem_gb",
    # the device's readings (adapters/telemetry.py): absent on a device that does not report them
    **{k: f"device/{k}" for k in READINGS},
    # preference training (train_mode dpo, orpo): the report window's (train) and the validation
    # pairs' (val): preference/accuracy/train, preference/accuracy/val, …
    **{k: f"preference/{k}/train" for k in PAIR_FIELDS},
    **{f"val_{k}": f"preference/{k}/val" for k in PAIR_FIELDS},
}


class Missing(Exception):
    """tensorboardX is not installed; str() says how to get it."""


def available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class Run:
    """One job's event file for one attempt."""

    def __init__(
        self, folder: Path, *, attempt: int, purge_step: int | None = None, flush_secs: int = 5
    ):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise Missing(f"writing TensorBoard files needs tensorboardX: {EXTRA}") from None
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.writer = SummaryWriter(
            logdir=str(folder),
            purge_step=purge_step,
            flush_secs=flush_secs,
            filename_suffix=f".attempt{attempt}",
        )

    def point(self, global_step: int, values: dict, walltime: float | None = None) -> None:
        for key, tag in TAGS.items():
            v = values.get(key)
            if v is not None:
                self.writer.add_scalar(tag, v, global_step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- live and export


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
            self.run = Run(run_folder(ws.tensorboard, j), attempt=j.attempt, purge_step=purge)
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
                        **{k: getattr(m, k) for k in READINGS},
                        **{k: getattr(m, k) for k in PAIR_FIELDS},
                    },
                )
            except Exception as e:  # noqa: BLE001
                self._off(e)

    def val(self, global_step: int, val_loss: float | None, pairs: PairStats | None = None) -> None:
        if self.run is not None:
            try:
                self.run.point(global_step, {"val_loss": val_loss, **val_pairs(pairs)})
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
    if not available():
        raise UserError(f"`ftctl export-tb` needs tensorboardX: {EXTRA}")
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
            run = Run(tmp, attempt=0)
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
