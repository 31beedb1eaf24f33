"""Shared test helpers: real workspaces, real `ftctl` processes, real MLX."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# A job small enough for CI (2 cores) that still exercises dropout, warmup + cosine,
# validation, several checkpoints and retention.
TEST_CONFIG = {
    "iters": 40,
    "batch_size": 2,
    "learning_rate": 5e-4,
    "save_every": 5,
    "steps_per_report": 5,
    "steps_per_eval": 10,
    "val_batches": 2,
    "max_seq_length": 256,  # above the demo lines (169 bytes) + TEMPLATE_SLACK: submit loads no tokenizer
    "num_layers": -1,
    "seed": 3,
    "optimizer": "adamw",
    "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1, "keys": None},
    "lr_schedule": {
        "name": "cosine_decay",
        "warmup": 4,
        "warmup_init": 1e-5,
        "arguments": [5e-4, 36, 1e-5],
    },
    "restart": {"max_restarts": 3, "window_s": 300.0, "backoff_s": 0.05, "backoff_max_s": 0.2},
    "timeouts": {"hang_s": 120.0, "eval_hang_s": 240.0, "stop_s": 60.0},
    "min_free_disk_gb": 0.01,
}


# what the kill-at-crash-point tests train, each against its own uninterrupted run (conftest.py):
# both fine-tune types, and preference training (DPO on the demo's pairs, the adapter switched off
# as its reference). ORPO, the same loop with another loss and no reference, is killed at one
# point only (ORPO_POINTS, tests/test_daemon.py): the suite's time
RUNS = {"lora": {}, "full": {"fine_tune_type": "full"}, "dpo": {"train_mode": "dpo"}}
ORPO = {"train_mode": "orpo"}


def training_data(demo, cfg: dict) -> tuple[Path, Path]:
    """The demo's (train, valid) files for a config: its preference pairs for dpo and orpo."""
    if cfg.get("train_mode", "sft") != "sft":
        return demo.preference["train"], demo.preference["valid"]
    return demo.train, demo.valid


def ftctl(
    home: Path, *args: str, env: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ftctl.cli", *args, "--home", str(home)]
    full_env = {k: v for k, v in os.environ.items() if k != "FTCTL_CRASH_AT"}
    full_env.update({"COLUMNS": "200", **(env or {})})
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(
            f"ftctl {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        )
    return p


FAULT_VARS = (
    "FTCTL_CRASH_AT",
    "FTCTL_HANG_AT",
    "FTCTL_STUCK_AT",
    "FTCTL_FS_FAULT",
    "FTCTL_FAKE_TELEMETRY",
)


def daemon(home: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`ftctl start --quiet ARGS` in the background; fault points only as ``env`` arms them."""
    full = {k: v for k, v in os.environ.items() if k not in FAULT_VARS}
    full.update({"COLUMNS": "200", **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "ftctl.cli", "start", "--quiet", *args, "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full,
    )


def make_workspace(home: Path, model: Path, **overrides) -> Path:
    from ftctl.adapters.workspace import init_workspace

    cfg = {**TEST_CONFIG, **overrides}
    init_workspace(home, str(model), cfg)
    return home


def ftctl_json(home: Path, *args: str):
    """Run a read-only `ftctl ... --json` command in this process (no interpreter start-up)."""
    import contextlib
    import io

    from ftctl.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([*args, "--json", "--home", str(home)])
    assert code == 0, (args, code)
    return json.loads(buf.getvalue())


def status(home: Path, job: str | None = None) -> dict:
    return ftctl_json(home, "status", *([job] if job else []))


def history(home: Path) -> list[dict]:
    return ftctl_json(home, "history")


def kinds(home: Path, job: str | None = None) -> list[str]:
    return [e["type"] for e in history(home) if job is None or e["stream"] == f"job:{job}"]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensor_sha256s(path: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes in a safetensors file (or adapters.safetensors of a folder),
    by name: what "the same trained weights" means, tensor by tensor."""
    import struct

    path = Path(path)
    data = (path / "adapters.safetensors" if path.is_dir() else path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return {
        k: hashlib.sha256(body[t["data_offsets"][0] : t["data_offsets"][1]]).hexdigest()
        for k, t in header.items()
        if k != "__metadata__"
    }


def crash_env(tmp: Path, *points: str) -> dict:
    """FTCTL_CRASH_AT for named points ("name:step"), each firing once."""
    items = [f"{p}:{tmp / ('marker-' + p.replace(':', '-').replace('*', 'any'))}" for p in points]
    return {"FTCTL_CRASH_AT": ",".join(items)}


def wait_for(pred, timeout: float = 120, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("condition not met in time")


def leftovers(home: Path) -> list[Path]:
    """Temp directories anywhere under jobs/ (there must be none after a run)."""
    return [p for p in (home / "jobs").rglob(".tmp*")]


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie waits for a reaper; it runs nothing)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stray_workers(home: Path) -> list[int]:
    """Pids of every `ftctl.adapters.worker` process of this workspace still alive, recorded or
    not: the standby worker is in no event, but must not outlive its daemon either."""
    import psutil

    names = {str(home), str(Path(home).resolve())}
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if (
            "ftctl.adapters.worker" in cmd
            and names & set(cmd)
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ):
            out.append(p.info["pid"])
    return out


def survivors(home: Path) -> list[int]:
    """Pids of every worker and daemon the journal ever recorded that are still alive
    (matched by pid AND start time, so a reused pid does not count), and of any other worker
    process of the workspace (the standby: stray_workers)."""
    from ftctl.adapters.process import alive
    from ftctl.events.types import ProcessId

    out = []
    for e in history(home):
        d = e["data"]
        if e["type"] == "training_started":
            pid_id = ProcessId(d["worker_pid"], d["worker_started_at"])
        elif e["type"] == "daemon_started":
            pid_id = ProcessId(d["process"]["pid"], d["process"]["started_at"])
        else:
            continue
        if alive(pid_id):
            out.append(pid_id.pid)
    return out + [p for p in stray_workers(home) if p not in out]


def finished(home: Path, job: str = "0001") -> dict:
    """The job's status, after checking it completed cleanly: its adapter matches its recorded
    sha256, no temp directory or process is left, and the journal passes its integrity check."""
    from ftctl.events.journal import Journal

    s = status(home, job)
    assert s["state"] == "completed", s
    assert s["adapter_sha256"] == sha256_file(f"{s['adapter_path']}/adapters.safetensors")
    assert leftovers(home) == []
    assert survivors(home) == []
    with Journal.open(home / "journal.db") as j:
        assert j.integrity_check() == "ok"
    return s


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def run(capsys, *args) -> tuple[int, str, str]:
    """`ftctl ARGS` in this process: (exit code, stdout, stderr with whitespace folded)."""
    from ftctl.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())
