"""inbox/: files a user drops in for the daemon to submit. What waits there and why."""

from __future__ import annotations

import time
from pathlib import Path

from ftctl.adapters.workspace import Workspace

SETTLE_S = 2.0  # a file younger than this may still be being written


def inbox_files(ws: Workspace) -> list[Path]:
    """Files waiting in inbox/ (not the accepted/ and rejected/ folders, not hidden files)."""
    if not ws.inbox.is_dir():
        return []
    return sorted(p for p in ws.inbox.iterdir() if p.is_file() and not p.name.startswith("."))


def skip_reason(path: Path) -> str:
    """Why the daemon leaves an inbox file where it is, or "" if it will be submitted."""
    if path.suffix.lower() == ".jsonl":
        return ""
    if path.suffix.lower() == ".json":
        return (
            "only .jsonl files are queued; if it holds one JSON object per line, rename it to .jsonl "
            "(a JSON array must be converted to one object per line first)"
        )
    return "only .jsonl files are queued (one JSON object per line); it was left where it is"


def inbox_pending(ws: Workspace, daemon_alive: bool = True) -> list[dict]:
    """What `ftctl status` lists: each inbox file, its size, age and what the daemon does with it."""
    now = time.time()
    out = []
    for p in inbox_files(ws):
        st = p.stat()
        why = skip_reason(p)
        settling = not why and now - st.st_mtime < SETTLE_S
        out.append(
            {
                "file": p.name,
                "bytes": st.st_size,
                "age_s": round(now - st.st_mtime, 1),
                "note": why
                or (
                    "still being written: queued once it settles"
                    if settling
                    else "queued at the daemon's next look (within a second)"
                    if daemon_alive
                    else "queued when `ftctl start` runs (no daemon is running)"
                ),
            }
        )
    return out
