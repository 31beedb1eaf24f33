"""Named crash points for the kill-matrix tests: a process SIGKILLs itself at a chosen point.

Set ``FTCTL_CRASH_AT="point:step:marker"`` (several separated by commas). The point fires at
most once: it creates ``marker`` first, so the restarted process runs past it. ``step`` may be
``*`` for the first time the point is reached. ``FTCTL_HANG_AT`` takes the same form but makes
the process stand still instead (no progress: the hang watchdog's tests) until the predicate
given to ``wake_when`` is true, or forever if none was given. The worker passes its stop flag,
so a pause or shutdown sent to a hung worker stops it at exactly that step. ``FTCTL_STUCK_AT``
stands still for good, stop or not: a worker that no longer listens. The step of a
worker point is the global step (the job step for a lineage's first job); of a consolidation
point, the new base version. ``point@R`` (e.g. ``mid_step@1:5:marker``) fires only in rank R of a
data-parallel job (its ``MLX_RANK``; a single worker is rank 0). Unset (the
normal case), ``crash_point`` is a dict lookup that returns at once.

``FTCTL_POISON="TEXT"`` is the data-driven seam (``poison_marker``): a training batch holding an example
whose JSON line contains TEXT makes that step's loss NaN, in the daemon's worker and in a reproduction
alike, so a test's job diverges as a user's would on a bad example. ``FTCTL_POISON_SCALE=F`` makes
that loss F times what it was instead of NaN: a large but finite loss, the loss spike a bad batch
makes (the training-health watch's tests). Unset, training is untouched.

``FTCTL_BLAS_MS="1:5,2:1"`` is the thread-measurement seam (``blas_ms``): the worker takes these ms per
OpenBLAS thread count as what it measured (core/threads.py chooses from them), so a test decides what
the measurement finds, as a busy or a quiet machine would; ``FTCTL_BLAS_OTHERS=N`` (default 0) the
other processes' threads it saw running meanwhile (``blas_others``).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Callable

POINTS = {  # every crash_point() call names one of these (tests/test_layers.py checks both ways)
    "while_loading": "worker: model, data and checkpoint loaded, `loaded` not yet sent (step: the resume step)",
    "mid_step": "worker: after an optimizer step, before the next",
    "after_temp_write": "worker: checkpoint files written and fsynced in the temp dir",
    "after_rename": "worker: checkpoint renamed into place, before the daemon hears of it",
    "daemon_before_commit": "daemon: checkpoint reported by the worker, event not yet appended",
    "daemon_after_spawn": "daemon: worker spawned, `training_started` not yet appended",
    "during_recovery": "daemon: recovery has started repairing (step = repairs done)",
    "notify_before_send": "daemon: a committed event is due to a notification target, not yet sent (step = its seq)",
    "consolidate_mid_fuse": "consolidate: the fused weights computed, nothing written",
    "consolidate_mid_write": "consolidate: the temp model folder written, not yet hashed or verified",
    "consolidate_after_rename": "consolidate: models/vN in place, `base_promoted` not yet appended",
    "consolidate_after_event": "consolidate: `base_promoted` appended, the old base not yet retired",
}


def _armed() -> dict[str, list[tuple[str, str, str]]]:
    out: dict[str, list[tuple[str, str, str]]] = {}
    rank = os.environ.get("MLX_RANK", "0")
    for var, action in (
        ("FTCTL_CRASH_AT", "kill"),
        ("FTCTL_HANG_AT", "hang"),
        ("FTCTL_STUCK_AT", "stuck"),
    ):
        for item in filter(None, os.environ.get(var, "").split(",")):
            name, step, marker = item.split(":", 2)
            name, _, only = name.partition("@")
            if name not in POINTS:  # a typo would make a kill test pass without killing anything
                raise ValueError(f"{var}: unknown crash point {name!r}; known: {', '.join(POINTS)}")
            if only and only != rank:
                continue
            out.setdefault(name, []).append((step, marker, action))
    return out


_ARMED = _armed()


def _wake() -> bool:  # what ends a hang: by default, nothing
    return False


def wake_when(predicate: Callable[[], bool]) -> None:
    """A hang point of this process returns once ``predicate()`` is true."""
    global _wake
    _wake = predicate


def crash_point(name: str, step: int | None = None) -> None:
    for want, marker, action in _ARMED.get(name, ()):
        if want not in ("*", str(step)):
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        os.write(fd, f"{name}:{step} pid {os.getpid()}\n".encode())
        os.fsync(fd)
        os.close(fd)
        if action == "hang":
            while not _wake():
                time.sleep(0.05)
            return
        while action == "stuck":
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)


def poison_marker() -> str | None:
    """The FTCTL_POISON text, or None (the normal case)."""
    return os.environ.get("FTCTL_POISON") or None


def poison_scale() -> float:
    """What a poisoned batch's loss is multiplied by: FTCTL_POISON_SCALE, NaN by default."""
    return float(os.environ.get("FTCTL_POISON_SCALE") or "nan")


def blas_ms() -> dict[int, float] | None:
    """FTCTL_BLAS_MS's ms per thread count (None: unset, measure for real)."""
    spec = os.environ.get("FTCTL_BLAS_MS")
    if not spec:
        return None
    return {int(n): float(t) for n, t in (item.split(":") for item in spec.split(","))}


def blas_others() -> int:
    """FTCTL_BLAS_OTHERS: the other processes' running threads the faked measurement saw (default 0)."""
    return int(os.environ.get("FTCTL_BLAS_OTHERS") or 0)


def fs_from_env():
    """``FTCTL_FS_FAULT="N:ENOSPC:marker"``: this process's checkpoint writes go through a
    FaultyFS failing its N-th write operation with that errno. Once per marker (created here),
    so the restarted worker writes normally: the fault "is gone"."""
    spec = os.environ.get("FTCTL_FS_FAULT")
    if not spec:
        return None
    n, err, marker = spec.split(":", 2)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return None
    from .fs import FaultyFS

    return FaultyFS(int(n), getattr(errno, err))
