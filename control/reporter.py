"""How the control layer tells its caller what happens: a reporter object, never print().

The base class is silent. ``cli/`` subclasses it to draw to a terminal; a web page or a service
wrapper would subclass it too. Every method has a no-op default, so a caller overrides only what
it shows.
"""

from __future__ import annotations

import time
from typing import Callable

from ftctl.adapters import protocol as P

# note(text, level="info"): Reporter.note alone, for services that only say things
Note = Callable[..., None]


def quiet(text: str, level: str = "info") -> None:
    pass


class Every:
    """When a progress line is worth writing: at the first and last step, each time another tenth
    of the run is done, and at least every ``seconds`` in between — about a dozen lines per job
    whatever its length, instead of one per report."""

    def __init__(
        self, iters: int, seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        self.iters, self.seconds, self.clock = max(iters, 1), seconds, clock
        self.last_step, self.last_time = None, 0.0

    def due(self, step: int) -> bool:
        now = self.clock()
        tenth = lambda s: s * 10 // self.iters  # noqa: E731
        if (
            self.last_step is None
            or step >= self.iters
            or tenth(step) > tenth(self.last_step)
            or now - self.last_time >= self.seconds
        ):
            self.last_step, self.last_time = step, now
            return True
        return False


class Reporter:
    def note(self, text: str, level: str = "info") -> None:
        """One line for people. level: "info" | "ok" | "warn" | "error"."""

    def section(self, title: str) -> None:
        """A new stage of a multi-step workflow (the demo) begins."""

    def training(self, job: str, name: str, iters: int) -> None:
        """A worker started training ``job`` (``iters`` iterations in all)."""

    def progress(self, job: str, msg: P.WorkerMessage) -> None:
        """A message from the training worker (steps, reports, evaluations, checkpoints)."""

    def training_ended(self, job: str) -> None:
        """The worker of ``job`` is gone (for whatever reason: the journal says which)."""


SILENT = Reporter()
