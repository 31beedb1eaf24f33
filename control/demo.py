"""The one-minute tour (`ftctl demo`) and `ftctl init --demo`, on the embedded tiny model.

``tour`` trains the demo job with its worker SIGKILLed at a chosen step, then trains the same job
uninterrupted in a reference workspace and returns both adapters' sha256 for the caller to show.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ftctl.adapters.fs import write_durable
from ftctl.adapters.workspace import Workspace, WorkspaceError, init_workspace
from ftctl.control.ledger import Ledger
from ftctl.core.config import config_sha256, config_to_dict
from ftctl.events.errors import UserError

from .daemon import Daemon
from .reporter import SILENT, Reporter
from .submit import submit

# Small enough to train in seconds on two CPU cores, with everything a real run exercises:
# dropout, warmup + cosine schedule, validation, checkpoints and retention.
DEMO_CONFIG = {
    "iters": 40,
    "batch_size": 4,
    "learning_rate": 5e-4,
    "save_every": 5,
    "steps_per_report": 5,
    "steps_per_eval": 10,
    "val_batches": -1,
    "max_seq_length": 256,
    "num_layers": -1,
    "seed": 7,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.1, "keys": None},
    "lr_schedule": {
        "name": "cosine_decay",
        "warmup": 5,
        "warmup_init": 1e-5,
        "arguments": [5e-4, 35, 1e-5],
    },
    "optimizer": "adamw",
    "timeouts": {"hang_s": 120.0, "eval_hang_s": 300.0, "stop_s": 60.0},
}


MARKER = ".ftctl-demo"  # in a folder `ftctl demo` made: the only kind of folder it will ever delete


class DemoRefused(UserError):
    """The demo will not run here as asked; nothing was changed."""

    kept = "nothing was changed"


def init_demo(home: Path):
    """Build the demo model and data under home/demo/, then a workspace that trains on them."""
    from ftctl.adapters.demo import build_demo  # MLX loads only here

    ws = Workspace(Path(home))
    if ws.exists():
        raise WorkspaceError(
            f"{ws.home} already holds an ftctl workspace", kept="nothing was changed"
        )
    paths = build_demo(ws.home / "demo")
    init_workspace(ws.home, str(paths.model_dir), DEMO_CONFIG)  # recorded as demo/model
    return paths


@dataclass
class Tour:
    ws: Workspace
    job: str
    kill_at: int
    killed_at: list[int]  # steps at which the journal recorded this job's worker SIGKILLed
    same_inputs: bool  # the reference job recorded the same data and config sha256
    sha256: str | None  # the killed-and-resumed job's adapter
    reference_sha256: str | None  # the same job, never interrupted

    @property
    def identical(self) -> bool:
        return self.sha256 is not None and self.sha256 == self.reference_sha256

    @property
    def proven(self) -> bool:
        """Every claim the tour makes was checked against the journals."""
        return self.identical and self.same_inputs and self.killed_at == [self.kill_at]


def _prepare(home: Path, reset: bool, report: Reporter) -> Workspace:
    """A demo workspace at home: made now, or one an earlier `ftctl demo` made. Anything else is
    refused untouched: the demo never trains into, nor deletes, a folder it did not make."""
    ws = Workspace(Path(home))
    ours = (ws.home / MARKER).is_file()
    empty = ws.home.is_dir() and not any(ws.home.iterdir())
    if ws.home.exists() and not ours and not empty:
        what = (
            "an ftctl workspace"
            if ws.exists()
            else ("a file" if not ws.home.is_dir() else "a folder")
        )
        raise DemoRefused(
            f"{ws.home} is {what} that `ftctl demo` did not make (no {MARKER} marker): the demo "
            "neither trains into nor deletes it",
            do="run the demo elsewhere (`ftctl demo --home NEW_FOLDER`, or without --home for "
            "./ftctl-demo)",
        )
    if reset and ours:
        shutil.rmtree(ws.home)
        report.note(f"deleted the previous demo workspace {ws.home} (--reset)")
    if ws.exists():
        report.note(
            f"{ws.home} holds the workspace of an earlier demo: reusing it (pass --reset to start over)"
        )
        return ws
    ws.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_durable(
        ws.home / MARKER, b"made by `ftctl demo`: `ftctl demo --reset` may delete this folder\n"
    )
    init_demo(ws.home)
    report.note(f"built the demo model and data in {ws.home / 'demo'} and a workspace in {ws.home}")
    return ws


def tour(home: Path, *, reset: bool, kill_at: int, report: Reporter = SILENT) -> Tour:
    iters = DEMO_CONFIG["iters"]
    if not 1 <= kill_at < iters:
        raise DemoRefused(
            f"--kill-at {kill_at} is outside the demo job's {iters} iterations",
            do=f"pick a step between 1 and {iters - 1}",
        )
    ws = _prepare(home, reset, report)
    data = ws.home / "demo" / "data"
    report.section("1. submit the demo data (validated before it is queued)")
    job = _submit(ws, data, "demo", report)
    report.section(f"2. train; the worker is SIGKILLed at step {kill_at} (a simulated crash)")
    # one per job: a re-run kills its own job too
    marker = ws.home / "run" / f"demo-crash-{job}.marker"
    Daemon(
        ws, until_idle=True, env={"FTCTL_CRASH_AT": f"mid_step:{kill_at}:{marker}"}, report=report
    ).run()
    report.section("3. the same job, never interrupted, in a reference workspace")
    j = _job(ws, job)
    ref = Workspace(ws.home / "reference")
    if ref.home.exists():
        shutil.rmtree(ref.home)  # inside the demo's own folder: made by an earlier tour
    # exactly the recorded config; its model (demo/model, recorded relative to the demo's workspace)
    # named by its absolute path, which is where the reference finds the same folder
    cfg = ws.located(j.config)
    threads = j.env.get("blas_threads", "")
    pinned = ""
    if threads.isdigit() and not cfg.blas_threads:  # as job trained: the bits depend on the count
        cfg = msgspec.structs.replace(cfg, blas_threads=int(threads))
        pinned = f", on the {threads} BLAS thread(s) job {job} trained with (the bits depend on it)"
    init_workspace(ref.home, cfg.model, config_to_dict(cfg))
    ref_job = _submit(ref, data, "reference", SILENT)
    report.note(
        f"job {ref_job} in {ref.home}: job {job}'s recorded config and the same data{pinned}, "
        "trained from start to end with nothing killed"
    )
    tic = time.monotonic()
    Daemon(ref, until_idle=True).run()
    r = _job(ref, ref_job)
    if r.state == "completed" and not r.crashes:
        report.note(
            f"job {ref_job} completed at step {r.step} in {time.monotonic() - tic:.1f} s with no "
            f"crash: adapter sha256 {r.adapter_sha256[:16]}…",
            "ok",
        )
    else:
        report.note(
            f"job {ref_job} ended {r.state} with {len(r.crashes)} crash(es): the comparison below "
            f"does not hold (see `ftctl history --home {ref.home}`)",
            "error",
        )
    return Tour(
        ws,
        job,
        kill_at,
        killed_at=[c.step for c in j.crashes if c.signal == signal.SIGKILL],
        same_inputs=(config_sha256(cfg), j.data_sha256)
        == (config_sha256(ref.located(r.config)), r.data_sha256),
        sha256=j.adapter_sha256,
        reference_sha256=r.adapter_sha256,
    )


def _job(ws: Workspace, job: str):
    ledger = Ledger(ws.open_journal())
    try:
        return ledger.state.jobs[job]
    finally:
        ledger.close()


def _submit(ws: Workspace, data: Path, name: str, report: Reporter) -> str:
    """Submit the demo data as a fresh adapter (a re-run must not warm-start from the last tour)."""
    ledger = Ledger(ws.open_journal())
    try:
        sub = submit(
            ws,
            ledger,
            data / "train.jsonl",
            valid=data / "valid.jsonl",
            name=name,
            fresh=True,
            again=True,
        )  # a reused demo workspace trains the same data again, on purpose
    finally:
        ledger.close()
    report.note(
        f"queued job {sub.job} ({sub.report.valid} valid {sub.report.format} examples)", "ok"
    )
    return sub.job
