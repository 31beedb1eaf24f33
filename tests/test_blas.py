"""The worker's BLAS (adapters/blas.py): what `auto` picks, that a preloaded OpenBLAS really serves
MLX's matmuls, and that a library that cannot load never reaches a worker. How much faster it is is
bench/blas.py's to measure (a ratio, run on demand), not a timed assertion here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ftctl.adapters import blas

LINUX = sys.platform.startswith("linux")

# In a subprocess with the worker's environment: a float32 matmul, checked against numpy; the dynamic
# linker's own log (LD_DEBUG=bindings) says which library libmlx's cblas_sgemm call was bound to.
PROBE = r"""
import json
import numpy as np
import mlx.core as mx
mx.set_default_device(mx.cpu)
a, b = mx.random.normal((256, 256)), mx.random.normal((256, 256))
c = a @ b
mx.eval(c)
ok = bool(np.allclose(np.array(c), np.array(a) @ np.array(b), rtol=1e-3, atol=1e-3))
print(json.dumps({"right": ok}))
"""


def probe(choice: blas.Choice, tmp_path) -> dict:
    log = tmp_path / f"ld-{choice.kind}"
    env = {**os.environ, **choice.env, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(log)}
    p = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    lines = [
        line
        for f in tmp_path.glob(log.name + ".*")
        for line in f.read_text(errors="replace").splitlines()
        if "libmlx.so" in line and "`cblas_sgemm'" in line
    ]
    assert lines, "libmlx's cblas_sgemm was never bound"
    out["sgemm_from"] = lines[-1].split(" to ", 1)[1].split(" [", 1)[0]
    return out


def test_reference_is_mlx_cpus_bundled_blas_and_needs_no_environment():
    ref = blas.choose("reference")
    assert ref.env == {} and ref.kind in ("reference", "platform")
    fp = blas.fingerprint(ref)
    assert set(fp) == {"mlx", "mlx_lm", "blas", "blas_threads", "platform", "backend", "device"}
    # the device the worker trains on, as MLX says with the worker's environment
    assert fp["backend"] in ("cpu", "metal", "cuda") and fp["device"].startswith(fp["backend"])
    if LINUX:
        assert "libblas" in ref.library and fp["blas"].startswith("reference ")


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is Linux's")
def test_a_library_that_cannot_load_falls_back_to_reference_with_the_reason(tmp_path):
    bogus = tmp_path / "libnotblas.so"
    bogus.write_bytes(b"not an ELF file")
    for setting, said in (
        (str(bogus), "cannot be preloaded"),
        (str(tmp_path / "missing.so"), "does not exist"),
    ):
        c = blas.choose(setting)
        assert c.kind == "reference" and c.env == {} and said in c.why and "pip install" in c.why


def test_fingerprint_diff():
    a = {"mlx": "1", "blas": "openblas x", "blas_threads": "2", "platform": "p"}
    assert blas.fingerprint_diff(a, dict(a)) == []
    assert blas.fingerprint_diff(a, {**a, "blas": "reference y"}) == [
        "blas: openblas x -> reference y"
    ]
    assert blas.fingerprint_diff({}, a) == []  # an old journal's attempt: unknown, not flagged


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is Linux's")
def test_the_chosen_openblas_serves_mlx_matmuls(tmp_path):
    fast = blas.choose("auto")
    if fast.kind != "openblas":
        pytest.skip(f"no optimized BLAS installed: {fast.why}")
    got, ref = probe(fast, tmp_path), probe(blas.choose("reference"), tmp_path)
    assert os.path.realpath(got["sgemm_from"]) == os.path.realpath(fast.library)
    assert "libblas" in os.path.basename(ref["sgemm_from"])
    assert got["right"] and ref["right"], (got, ref)  # and both multiply right


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is Linux's")
def test_doctor_says_which_blas_and_warns_only_about_a_configured_library_it_cannot_use(tmp_path):
    from ftctl.control.doctor import _blas
    from ftctl.core.config import Config

    auto = _blas(Config(model="m"))
    assert auto.severity == "ok" and auto.message.startswith("workers run on ")
    bad = _blas(Config(model="m", blas=str(tmp_path / "nope.so")))
    assert bad.severity == "warning" and "does not exist" in bad.message and "blas: auto" in bad.fix


FAKE_SGEMM = r"""
#include <signal.h>
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
#ifdef WRONG
    for (int i = 0; i < m * n; i++) c[i] = 1.0f;
#else
    raise(SIGILL);  /* what an AVX-512 kernel does on a CPU without AVX-512 */
#endif
}
"""


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is Linux's")
@pytest.mark.parametrize(
    "flags,said",
    [([], "SIGILL (an illegal instruction"), (["-DWRONG"], "gave wrong results")],
    ids=["sigill", "wrong"],
)
def test_a_library_that_loads_but_cannot_multiply_falls_back_to_reference(tmp_path, flags, said):
    """cmeel-openblas 0.3.31 loads on an AVX2 machine and dies of SIGILL at its first sgemm: the
    probe must run a matmul, not only load the library."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the fake BLAS")
    src, lib = tmp_path / "fake.c", tmp_path / "libfakeblas.so"
    src.write_text(FAKE_SGEMM)
    subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    c = blas.choose(str(lib))
    assert c.kind == "reference" and c.env == {}, c
    assert "cannot be preloaded" in c.why and said in c.why and "pip install" in c.why


# --------------------------------------------------------------------------- the thread count


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ftctl.core import threads as T  # noqa: E402


@given(st.integers(1, 512))
def test_candidates_start_at_one_end_at_the_pool_and_double(pool):
    c = T.candidates(pool)
    assert c[0] == 1 and c[-1] == pool and c == sorted(set(c))
    assert all(b == 2 * a for a, b in zip(c, c[1:-1]))


@given(st.dictionaries(st.integers(1, 64), st.floats(0.001, 1e4), min_size=1))
def test_more_threads_are_chosen_only_when_clearly_faster(ms):
    n = T.choose(ms)
    assert n in ms
    # every count with fewer threads than the chosen one is beaten by more than the margin
    assert all(ms[n] < ms[k] * (1 - T.MARGIN) for k in ms if k < n)
    # and none with more threads is faster than it by the margin: it is within the margin of the fastest
    assert all(ms[k] >= ms[n] * (1 - T.MARGIN) for k in ms if k > n)
    assert ms[n] * (1 - T.MARGIN) <= min(ms.values())


@given(
    st.dictionaries(st.integers(1, 64), st.floats(0.001, 1e4), min_size=1),
    st.none() | st.integers(-4, 80),
)
def test_no_more_threads_than_the_cores_other_processes_leave(ms, free):
    n = T.choose(ms, free=free)
    assert n in ms
    if free is None or free >= max(ms):
        assert n == T.choose(ms)  # nothing busy beside it: the measurement alone decides
    else:
        assert n == min(ms) or n <= max(1, free)
        # and among the counts allowed, the rule is the unconstrained one
        allowed = {k: v for k, v in ms.items() if k <= max(1, free)} or {min(ms): ms[min(ms)]}
        assert n == T.choose(allowed)


@given(st.integers(1, 256), st.integers(1, 512), st.floats(0, 1000))
def test_the_cores_left_shrink_with_the_others_and_stay_within_the_allowed(cores, machine, others):
    machine = max(machine, cores)
    left = T.free_cores(cores, machine, others)
    assert 0 <= left <= cores
    assert T.free_cores(cores, machine, others + machine) <= left
    assert T.free_cores(cores, machine, 0) == cores


def test_a_decided_count_wins_in_order_config_recorded_environment():
    assert T.decided(0, None, None) is None
    assert T.decided(0, blas.MEASURED, "") is None  # recorded before the worker measured: measure
    assert T.decided(0, None, "3") == 3
    assert T.decided(0, "2", "3") == 2
    assert T.decided(4, "2", "3") == 4


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is Linux's")
def test_a_probe_is_remembered_only_when_it_succeeded(tmp_path, monkeypatch):
    """The probe's process runs once per library, environment, interpreter and CPU: a success is
    remembered, a failure probed again (a library replaced in place changes its size or mtime)."""
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"x")
    answers, calls = [None, "SIGILL"], []
    monkeypatch.setattr(blas, "_probe", lambda path, env: calls.append(path) or answers[0])
    cache = tmp_path / "probed"
    assert blas._probe_once(str(lib), {}, cache) is None
    assert blas._probe_once(str(lib), {}, cache) is None and len(calls) == 1
    assert blas._probe_once(str(lib), {"LD_PRELOAD": "y"}, cache) is None and len(calls) == 2
    answers.pop(0)
    lib.write_bytes(b"xy")  # replaced: probed again, and its failure is not remembered
    assert blas._probe_once(str(lib), {}, cache) == "SIGILL"
    assert blas._probe_once(str(lib), {}, cache) == "SIGILL" and len(calls) == 4


def _timed(stalls: dict[int, list[int]]):
    """_time_counts on a fake matmul: 2 ms on 1 thread, 1 ms on 2, and on a count's listed passes
    (counted after the warm-up round) a 20 ms stall (a preemption)."""
    import time

    current, seen, passes = [1], [], {1: 0, 2: 0}

    def run():
        seen.append(current[0])
        n = current[0]
        if len(seen) > 2:  # after the warm-up round
            passes[n] += 1
            if passes[n] in stalls.get(n, []):
                time.sleep(0.02)
        time.sleep(0.002 if n == 1 else 0.001)

    ms, _ = blas._time_counts(run, [1, 2], lambda n: current.__setitem__(0, n))
    return ms, seen


def test_the_measurement_alternates_counts_and_one_preemption_does_not_decide():
    """One slow pass on a count (a preemption) is dropped: 2 threads, twice as fast, are chosen."""
    ms, seen = _timed({2: [1]})
    assert seen[:4] == [1, 2, 1, 2] and len(seen) >= 12  # a warm-up, then at least 5 rounds
    assert ms[2] < ms[1] < 5 and T.choose(ms) == 2


def test_stalls_that_keep_coming_back_decide_against_more_threads():
    """A count stalled on every fourth pass (a busy machine: more threads wait for each other) is
    slower on average though its median is not: its stalls would slow every training step."""
    ms, _ = _timed({2: list(range(2, 100, 4))})
    assert ms[1] < ms[2] and T.choose(ms) == 1


@pytest.mark.skipif(not LINUX, reason="/proc/loadavg is Linux's")
def test_busy_processes_beside_the_worker_are_seen_running():
    """What the measurement reads of the other processes: two spinning beside it are counted (its own
    threads are not: this process is running as it reads)."""
    import statistics
    import time

    spin = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(2)
    ]
    try:
        time.sleep(0.3)
        seen = [blas._others_running() for _ in range(9)]
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert statistics.median(seen) >= 2, seen


# In a subprocess with the worker's OpenBLAS: the seam says 2 threads are 5 times as fast; how many does
# the worker choose when the other processes' threads leave it no second core?
SETTLE = r"""
import json, mlx.core as mx, mlx.nn as nn
from ftctl.adapters import blas
mx.set_default_device(mx.cpu)
threads, ms, others = blas.settle_threads(None, nn.Linear(64, 64), 8, False)
print(json.dumps([threads, others]))
"""


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is Linux's")
@pytest.mark.parametrize("others,want", [("0", 2), ("1", 1), ("2", 1)])
def test_more_threads_are_not_chosen_when_other_processes_keep_the_cores(others, want):
    fast = blas.choose("auto")
    if fast.kind != "openblas" or len(os.sched_getaffinity(0)) != 2 or os.cpu_count() != 2:
        pytest.skip("needs an OpenBLAS and a machine of exactly two cores")
    env = {**os.environ, **fast.env, "FTCTL_BLAS_MS": "1:5,2:1", "FTCTL_BLAS_OTHERS": others}
    env["OPENBLAS_NUM_THREADS"] = (
        "2"  # the suite pins 1 (conftest.py): a pool of two to choose from
    )
    p = subprocess.run(
        [sys.executable, "-c", SETTLE], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [want, int(others)]
