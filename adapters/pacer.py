"""The pacer: while a worker trains (its steps and evaluations) on Linux, a thread that does nothing
but wake up every ``PERIOD_S``.

Training on MLX's CPU backend is two threads handing work to each other hundreds of times a step:
Python's, which builds each step's graph, and MLX's stream thread, which computes it. Beside other
busy processes, Linux's scheduler (measured on 6.18: EEVDF, autogroup on) left such a process about
0.6 of a core: 100 steps of the demo model (1 BLAS thread, two spinning processes in sessions of
their own) took 8.4-9.0 s for 5.0 s of CPU. The same steps with one more thread waking every 10 or
20 ms took 5.2-5.3 s, on the same CPU time (every 100 ms: 7.4 s; every second: 8.8 s). mlx_lm.lora
has such a thread by accident, its progress bar's, which redraws ten times a second: without it,
its run took 9.5 s instead of 5.6 s. The figures: ``bench/train_overhead.py --mode lora --busy 2``.

It is a scheduling effect, not a priority: the worker asks for no more than any process may, and the
pacer's 50 wake-ups a second cost no CPU time measurable beside training's (those 100 steps took
4.8-5.2 s of CPU with such a thread, 4.9-5.2 s without). It runs only while the job's BLAS
threads leave a core free: beside 2 OpenBLAS threads on 2 quiet cores its wake-ups preempted them
(`ftctl lora` on the demo, 6 runs each: 6.41 s with it, 6.13 s without). Nor does it run while the
worker loads and measures its BLAS threads (adapters/blas.py): with it, 2 threads looked fast enough
there on a busy machine in one of three runs, and that job trained three times as slowly. Other
platforms and MLX's GPU backends are not measured, so it runs on Linux's CPU backend only.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from . import system

PERIOD_S = 0.02


@contextmanager
def paced(cpu: bool, blas_threads: int | None, period_s: float = PERIOD_S) -> Iterator[None]:
    """Keep the pacer running for the block: on Linux, when MLX trains on the CPU (``cpu``: a GPU's
    is not measured) and the job's BLAS threads (None: a BLAS that has none of its own) leave a core
    free."""
    cores = system.usable_cores() if sys.platform.startswith("linux") else 0
    if not cpu or (blas_threads or 0) >= cores:
        yield
        return
    done = threading.Event()
    thread = threading.Thread(target=_wake, args=(done, period_s), daemon=True, name="pacer")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _wake(done: threading.Event, period_s: float) -> None:
    while not done.wait(period_s):
        pass
