"""The pacer (adapters/pacer.py): a thread that only wakes, while a job trains, on Linux, when the
job's BLAS threads leave a core free. Its effect is a speed, measured by bench/train_overhead.py."""

import os
import sys
import threading

import pytest

from ftctl.adapters.pacer import paced

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _pacers() -> int:
    return sum(t.name == "pacer" for t in threading.enumerate())


def test_it_runs_while_a_core_is_free_and_stops_with_the_block():
    cores = len(os.sched_getaffinity(0))
    for threads in (None, cores - 1):
        if threads == 0:
            continue  # one core: 0 threads is no count
        with paced(True, threads, period_s=0.001):
            assert _pacers() == 1
        assert _pacers() == 0
        with paced(False, threads):  # a GPU's training is not measured: no pacer
            assert _pacers() == 0


def test_it_never_runs_beside_blas_threads_on_every_core():
    cores = len(os.sched_getaffinity(0))
    for threads in (cores, cores + 2):
        with paced(True, threads):
            assert _pacers() == 0
