"""How many BLAS threads a job trains with: pure rules (the measuring is adapters/blas.py's).

The thread count changes the bits (OpenBLAS splits a matmul differently on 1 and on 2 threads), so a
job keeps one count for its life: decided once, recorded (``worker_loaded``), and used again by every
resume, retry and reproduction. On a busy machine more threads can be several times slower than one
(a preempted thread stalls the others at every matmul), on a quiet one faster: so the default is
measured, at the job's first load, on the job's own matmuls, with the machine as it is then.
"""

from __future__ import annotations

MARGIN = 0.10  # more threads must be at least this much faster than fewer to be chosen


def candidates(pool: int) -> list[int]:
    """The counts worth timing for a pool of ``pool`` threads: 1, 2, 4, … and the pool itself."""
    out, n = [], 1
    while n < pool:
        out.append(n)
        n *= 2
    return [*out, max(1, pool)]


def choose(ms: dict[int, float], margin: float = MARGIN, free: int | None = None) -> int:
    """The count to train with from the time each count took (any unit): the fewest threads unless
    more are at least ``margin`` faster — fewer threads leave cores to the rest of the machine and
    lose less when it gets busy. ``free``: the cores the machine's other work leaves (None: unknown);
    no more threads than those (at least one) are chosen, however fast they looked: a short
    measurement can fall in a lull of the other processes, and a job keeps its count for life."""
    best = min(ms)
    for n in sorted(ms):
        if free is not None and n > max(1, free):
            break
        if ms[n] < ms[best] * (1 - margin):
            best = n
    return best


def free_cores(cores: int, machine_cores: int, others: float) -> int:
    """The cores left to a process allowed ``cores`` of the machine's ``machine_cores`` while
    ``others`` threads of other processes run or wait for a CPU (spread over the whole machine)."""
    return max(0, cores - round(others * cores / max(cores, machine_cores)))


def decided(config: int, recorded: str | None, env: str | None) -> int | None:
    """The count already decided for a job, or None (measure it): the config's ``blas_threads``, else the
    count its earlier attempts recorded, else OPENBLAS_NUM_THREADS / OMP_NUM_THREADS of the worker's
    environment."""
    for v in (config, recorded, env):
        if v is not None and str(v).isdigit() and int(v) > 0:
            return int(v)
    return None
