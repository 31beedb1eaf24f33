"""System stats: free disk, available memory, the cores this process may use, the cgroup OOM-kill
counter; where ftctl caches what it can rebuild."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil

GB = 1024**3


def free_disk_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / GB


def cache_dir() -> Path:
    """ftctl's own folder for what can be rebuilt at any time: $XDG_CACHE_HOME/ftctl or ~/.cache/ftctl."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftctl"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform has one (Linux), else
    the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_memory_gb() -> float:
    return psutil.virtual_memory().available / GB


def total_memory_gb() -> float:
    """The memory this process may use: the machine's RAM, or our cgroup's limit (v2 memory.max) if lower."""
    total = psutil.virtual_memory().total
    try:
        rel = next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        limit = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return total / GB


def oom_kill_count() -> int | None:
    """The kernel OOM killer's counter for our cgroup (v2 memory.events, v1 memory.oom_control),
    or None where it cannot be read (macOS, containers without the file)."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for entry in line:
        _, controllers, rel = entry.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":
            candidates.append((Path("/sys/fs/cgroup") / rel / "memory.events", "oom_kill"))
        elif "memory" in controllers.split(","):
            candidates.append(
                (Path("/sys/fs/cgroup/memory") / rel / "memory.oom_control", "oom_kill")
            )
            candidates.append((Path("/sys/fs/cgroup/memory/memory.oom_control"), "oom_kill"))
    for path, key in candidates:
        try:
            for row in path.read_text().splitlines():
                k, _, v = row.partition(" ")
                if k == key:
                    return int(v)
        except (OSError, ValueError):
            continue
    return None


def kernel_xids(since: float, limit: int = 5) -> list[str]:
    """The kernel log's NVIDIA Xid lines ("NVRM: Xid (PCI:0000:3b:00): 79, ...") logged since the epoch time
    ``since`` (dmesg's stamps are seconds since boot): what the driver saw while a GPU worker ran. [] where
    there are none or the log cannot be read (dmesg restricted, macOS)."""
    import re
    import subprocess

    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return []
    after = since - psutil.boot_time() - 1.0
    out = []
    for line in p.stdout.splitlines():
        stamp = re.match(r"\[\s*(\d+\.\d+)\]", line)
        if "NVRM: Xid" in line and stamp and float(stamp.group(1)) >= after:
            out.append(line.strip())
    return out[-limit:]
