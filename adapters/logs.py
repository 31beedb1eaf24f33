"""logs/: appended text files with a size cap. A file over MAX_BYTES is rotated (x.log -> x.log.1
-> … -> x.log.KEEP, the oldest dropped) before the next write, so logs/ stays under about
(KEEP + 1) * MAX_BYTES per log however long the daemon runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

MAX_BYTES = 10 * 1024 * 1024
KEEP = 3


def rotate(path: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> bool:
    """Rotate ``path`` if it has grown past ``max_bytes``; True if it did."""
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(keep, 0, -1):  # x.log.(keep-1) -> x.log.keep, …, x.log -> x.log.1
        src = path.with_name(f"{path.name}.{i - 1}") if i > 1 else path
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i}"))
    return True


def append(path: Path, text: str, max_bytes: int = MAX_BYTES) -> None:
    """Append one timestamped line (private file, rotated past the cap)."""
    rotate(path, max_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n".encode())
    finally:
        os.close(fd)
