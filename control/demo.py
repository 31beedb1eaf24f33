"""The one-minute tour (`ftctl demo`) and `ftctl init --demo`, on the embedded tiny model.

``tour`` trains the demo job with its worker SIGKILLed at a chosen step, then trains the same job
uninterrupted in a reference workspace and returns both adapters' sha256 for the caller to show.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from ftctl.adapters.workspace import Workspace, WorkspaceError, init_workspace
from ftctl.recovery.ledger import Ledger

from .daemon import Daemon
from .reporter import SILENT, Reporter
from .submit import submit

# Small enough to train in seconds on two CPU cores, with everything a real run exercises:
# dropout, warmup + cosine schedule, validation, checkpoints and retention.
DEMO_CONFIG = {
    "iters": 40, "batch_size": 4, "learning_rate": 5e-4, "save_every": 5, "steps_per_report": 5,
    "steps_per_eval": 10, "val_batches": -1, "max_seq_length": 256, "num_layers": -1, "seed": 7,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.1, "keys": None},
    "lr_schedule": {"name": "cosine_decay", "warmup": 5, "warmup_init": 1e-5, "arguments": [5e-4, 35, 1e-5]},
    "optimizer": "adamw", "timeouts": {"hang_s": 120.0, "eval_hang_s": 300.0, "stop_s": 60.0},
}


def init_demo(home: Path):
    """Build the demo model and data under home/demo/, then a workspace that trains on them."""
    from ftctl.adapters.demo import build_demo  # MLX loads only here

    ws = Workspace(Path(home))
    if ws.exists():
        raise WorkspaceError(f"{ws.home} already holds an ftctl workspace; nothing was changed")
    paths = build_demo(ws.home / "demo")
    init_workspace(ws.home, str(paths.model_dir), DEMO_CONFIG)
    return paths


@dataclass
class Tour:
    ws: Workspace
    job: str
    killed_at: list[int]          # steps at which the journal recorded the worker killed
    sha256: str | None            # the killed-and-resumed job's adapter
    reference_sha256: str | None  # the same job, never interrupted

    @property
    def identical(self) -> bool:
        return self.sha256 is not None and self.sha256 == self.reference_sha256


def tour(home: Path, *, reset: bool, kill_at: int, report: Reporter = SILENT) -> Tour:
    ws = Workspace(Path(home))
    if reset and ws.home.exists():
        shutil.rmtree(ws.home)
    if ws.exists():
        report.note(f"{ws.home} already holds a workspace: reusing it (pass --reset to start over)")
    else:
        init_demo(ws.home)
        report.note(f"built the demo model and data in {ws.home / 'demo'} and a workspace in {ws.home}")
    data = ws.home / "demo" / "data"
    report.section("1. submit the demo data (validated before it is queued)")
    job = _submit(ws, data, "demo", report)
    report.section(f"2. train; the worker is SIGKILLed at step {kill_at} (a simulated crash)")
    marker = ws.home / "run" / "demo-crash.marker"
    Daemon(ws, until_idle=True, env={"FTCTL_CRASH_AT": f"mid_step:{kill_at}:{marker}"}, report=report).run()
    report.section("3. the same job, never interrupted, in a reference workspace")
    ref = Workspace(ws.home / "reference")
    if ref.home.exists():
        shutil.rmtree(ref.home)
    ledger = Ledger(ws.open_journal())
    try:
        init_workspace(ref.home, ledger.state.jobs[job].config.model, ws.read_config_dict())
        j = ledger.state.jobs[job]
        sha, killed = j.adapter_sha256, [c.step for c in j.crashes if c.signal == signal.SIGKILL]
    finally:
        ledger.close()
    ref_job = _submit(ref, data, "reference", SILENT)
    Daemon(ref, until_idle=True).run()
    ref_ledger = Ledger(ref.open_journal())
    try:
        return Tour(ws, job, killed, sha, ref_ledger.state.jobs[ref_job].adapter_sha256)
    finally:
        ref_ledger.close()


def _submit(ws: Workspace, data: Path, name: str, report: Reporter) -> str:
    ledger = Ledger(ws.open_journal())
    try:
        sub = submit(ws, ledger, data / "train.jsonl", valid=data / "valid.jsonl", name=name,
                     again=True)  # a reused demo workspace trains the same data again, on purpose
    finally:
        ledger.close()
    report.note(f"queued job {sub.job} ({sub.report.valid} valid {sub.report.format} examples)", "ok")
    return sub.job
