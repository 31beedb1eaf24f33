"""The warm standby: one spare worker, its imports done, that takes the next job or restart at once.

A worker spends most of a cold start importing MLX, mlx-lm and transformers. While a job trains
(``standby: true``, the default) the daemon keeps one more worker process that has done those
imports and blocks on its stdin (adapters/worker.py reads the plan only after importing). When a
job starts — the next one, or a restart after a crash — the daemon writes the plan to the spare
(``Worker.assign``) instead of spawning a worker, and starts a new spare at that worker's first
step (not before: on a small machine the spare's imports would slow the load it is there to
shorten).

* The spare is started by ``process.spawn_worker`` like any worker: its own session, process group
  and PR_SET_PDEATHSIG, dies on stdin EOF, ``--workspace`` on its command line (so
  ``process.orphan_workers`` and `ftctl doctor` find it) and ``--job standby``. It trains nothing
  before it has a plan. The daemon dismisses it when it stops; it never outlives the daemon.
* Its output goes to logs/standby.log until it is assigned; then it moves its stdout/stderr to the
  job log (the plan's ``log_path``) and the daemon takes that attempt's crash evidence from there,
  from the offset where the assignment found the log.
* `ftctl lora --train` (or `-c FILE`) starts the job's worker as a spare first thing (``early``),
  before it reads its config, creates its workspace or starts its daemon (which takes it:
  ``attach``); one started before the workspace existed has no standby.log.
* It is skipped while available memory is below ``MIN_AVAILABLE_GB`` (said once in daemon.log).
* Its memory (RSS) is written to run/standby.json (pid, start time, rss_bytes, measured_at) so that
  `ftctl status` can show it without touching the process or importing anything heavy; the file is
  removed when the spare is dismissed or assigned.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from ftctl.adapters import process, system
from ftctl.adapters.workspace import Workspace

MIN_AVAILABLE_GB = 1.0  # below this much available memory no spare is started
# a spare starts once the worker has trained this many times as long as it took to load; the tests'
# seam FTCTL_STANDBY_AFTER_LOADS=0 starts it at the first step
AFTER_LOADS = 10.0
STATE_FILE = "standby.json"
REPORT_EVERY_S = 2.0
RESPAWN_AFTER_S = 10.0  # after a spare died on its own


def state_path(ws: Workspace) -> Path:
    return ws.lock_path.parent / STATE_FILE


def read_state(ws: Workspace) -> dict | None:
    """What the daemon last wrote about its spare (read-only; None if it has none)."""
    try:
        return json.loads(state_path(ws).read_text())
    except (OSError, ValueError):
        return None


def early(ws: Workspace) -> Standby:
    """The spare of a command that trains in the foreground (`ftctl lora`), started first thing: before
    the command reads its config, creates its workspace or starts its daemon, so that its imports
    overlap all of that (the job's worker is the spare: it starts that much sooner). It runs on the
    default BLAS (``auto``); a config that chooses another gets a spare of its own (``ensure``). Before
    the workspace exists it has no log (it says nothing before its plan but that its imports are done),
    and its news waits for the daemon that takes it (``attach``)."""
    from ftctl.adapters import blas

    spare = Standby(ws, {})
    spare.ensure(blas.choose("auto").env)
    return spare


class Standby:
    def __init__(self, ws: Workspace, env: dict, say: Callable[[str, str], None] | None = None):
        self.ws, self.env = ws, env
        self.unsaid: list[tuple[str, str]] = []  # news before a daemon took this spare (attach)
        self.say = say or (lambda text, level="info": self.unsaid.append((text, level)))
        self.w: process.Worker | None = None
        self.after_loads = float(os.environ.get("FTCTL_STANDBY_AFTER_LOADS", AFTER_LOADS))
        self.w_env: dict = {}  # the BLAS environment the spare was started with
        self.low_memory_said = False
        self.reported: tuple[float, int] | None = None  # (when, rss) last written
        # after a spare died on its own, the next one waits a little (no spawn storm)
        self.not_before = 0.0

    # ------------------------------------------------------------------ the spare's life
    def attach(self, say: Callable[[str, str], None]) -> None:
        """The daemon that now owns this spare: its news goes there, what was said before included."""
        self.say = say
        for text, level in self.unsaid:
            say(text, level)
        self.unsaid = []

    def ensure(self, blas_env: dict) -> None:
        """Start a spare if there is none (or it died, or runs on another BLAS) and memory allows, on
        the BLAS ``blas_env`` chooses (adapters/blas.py): a job takes it only with that same BLAS."""
        if self.w is not None and self.w.proc.poll() is None:
            if self.w_env == blas_env:
                return
            self._drop()  # started before the config chose its BLAS (early): no job would take it
        elif self.w is not None:
            log = (
                "see logs/standby.log"
                if self.w.log_path
                else "no log: it started before its workspace"
            )
            self.say(
                f"standby worker pid {self.w.id.pid} died (exit {self.w.proc.returncode}, {log}); "
                f"another in {RESPAWN_AFTER_S:g} s",
                "warn",
            )
            self._drop()
            self.not_before = time.time() + RESPAWN_AFTER_S
        if time.time() < self.not_before:
            return
        avail = system.available_memory_gb()
        if avail < MIN_AVAILABLE_GB:
            if not self.low_memory_said:
                self.low_memory_said = True
                self.say(
                    f"standby worker skipped: only {avail:.2f} GB of memory available "
                    f"(it needs {MIN_AVAILABLE_GB:g} GB free)",
                    "warn",
                )
            return
        self.low_memory_said = False
        log = self.ws.logs / "standby.log" if self.ws.exists() else None
        self.w = process.spawn_worker(
            None,
            log,
            {**blas_env, **self.env},
            label=("standby", str(self.ws.home)),
        )
        self.w_env = dict(blas_env)
        self.reported = (
            time.time(),
            0,
        )  # first report after REPORT_EVERY_S: not the size of a fresh fork
        before = "" if log else ", before its workspace existed: it logs nothing until its job"
        self.say(f"standby worker started (pid {self.w.id.pid}{before})", "info")

    def take(self, plan_json: bytes, log_path: Path, blas_env: dict) -> process.Worker | None:
        """The spare, now training ``plan_json`` with its output in ``log_path``; None if there is
        no live spare, or it runs on another BLAS than ``blas_env`` (the caller spawns a worker)."""
        w, self.w = self.w, None
        self._forget_state()
        if w is None:
            return None
        if self.w_env != blas_env:  # bit-exactness holds within one BLAS only
            w.dismiss()
            return None
        if not w.assign(plan_json, log_path):
            w.dismiss()
            return None
        return w

    def dismiss(self) -> None:
        if self.w is not None:
            self._drop()

    def _drop(self) -> None:
        w, self.w = self.w, None
        w.dismiss()
        self._forget_state()

    # ------------------------------------------------------------------ its memory, for `status`
    def report(self) -> None:
        """Write the spare's RSS to run/standby.json when it changed (at most every REPORT_EVERY_S)."""
        if self.w is None:
            return
        now = time.time()
        if self.reported is not None and now - self.reported[0] < REPORT_EVERY_S:
            return
        rss = self.w.rss()
        if rss is None:
            return
        if self.reported is not None and abs(rss - self.reported[1]) < (1 << 20):
            self.reported = (now, self.reported[1])
            return
        self.reported = (now, rss)
        path = state_path(self.ws)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": self.w.id.pid,
                    "started_at": self.w.id.started_at,
                    "rss_bytes": rss,
                    "measured_at": now,
                }
            )
        )
        os.replace(tmp, path)

    def _forget_state(self) -> None:
        self.reported = None
        try:
            state_path(self.ws).unlink()
        except FileNotFoundError:
            pass
