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


def memory(gb: float | None) -> str:
    """Memory as people read it: 4.8 MB below a GB (not 0.00 GB), 1.23 GB above."""
    if gb is None:
        return "-"
    if gb >= 1:
        return f"{gb:.2f} GB"
    mb = gb * 1000
    return f"{mb:.1f} MB" if mb < 10 else f"{mb:.0f} MB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def pairs(m) -> str:
    """Preference training's figures beside a loss (a report's Metrics or an evaluation's PairStats):
    accuracy and reward margin; '' for sft."""
    if m is None or m.accuracy is None and m.reward_margin is None:
        return ""
    return f"  acc {_fmt(m.accuracy, '.2f')} margin {_fmt(m.reward_margin, '.3f')}"


def progress_line(job: str, m, iters: int) -> str:
    """A training report in one line, as the terminal and logs/daemon.log both show it."""
    return (
        f"job {job} step {m.step}/{iters}: loss {_fmt(m.loss, '.4f')}  lr {_fmt(m.lr, '.3g')}  "
        f"{_fmt(m.tokens_per_s, '.0f')} tok/s  peak {memory(m.peak_mem_gb)}" + pairs(m)
    )


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
