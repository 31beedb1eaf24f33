"""Which BLAS the training worker runs on, and the environment fingerprint of an attempt.

`mlx[cpu]`'s Linux wheel links the netlib reference BLAS it bundles (mlx_cpu.libs/libblas-*.so):
a 1024x1024 float32 matmul runs at a few GFLOPS. ftctl launches the worker, so it can choose:
with ``blas: auto`` (the default) the worker runs with an OpenBLAS ``LD_PRELOAD``-ed, whose
``cblas_sgemm``/LAPACK symbols then win over the bundled ones (the dynamic linker searches the
preloaded library before libmlx.so's own dependencies).

Where an OpenBLAS comes from, first found wins:
1. the system's (Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas``): ldconfig and known paths;
2. PyPI: the ``cmeel-openblas`` wheel (``pip install "ftctl[openblas]"``), whose libopenblas keeps
   the plain symbol names (``ngsolve-openblas`` too, if installed). (``scipy-openblas32/64`` and
   numpy's bundled copy rename every symbol with a ``scipy_`` prefix, so preloading them changes
   nothing.) The wheel needs libgfortran.so.5; without a system one, a folder of links to the copy
   mlx_cpu.libs bundles goes on LD_LIBRARY_PATH.

A choice is probed once (a tiny subprocess loads the library with the environment the worker
will get and runs one multi-threaded sgemm): a library that cannot load, or cannot run on this CPU,
falls back to the reference BLAS with the reason, never a worker that dies at exec or at its first
matmul. Bit-exactness holds within one BLAS, not across BLAS builds: the
fingerprint (mlx, mlx-lm, BLAS library and threads, platform) is recorded in every attempt's
``training_started`` so a resume under another one is flagged.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import msgspec

from ftctl.core import threads as T

from . import system

KNOWN_PATHS = (  # Debian/Ubuntu (alternatives and the pthread flavour), Fedora/RHEL, Arch/Alpine
    "/usr/lib/{triplet}/libopenblas.so.0",
    "/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/libopenblas.so",
)
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
MEASURED = "measured at load"  # a fingerprint's blas_threads before the worker has measured them
INSTALL_HINT = (
    'install an optimized BLAS: `pip install "ftctl[openblas]"` (the cmeel-openblas wheel), '
    "or `sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu)"
)


class Choice(msgspec.Struct, frozen=True):
    setting: str  # the config value: auto | reference | a path
    kind: str  # openblas | reference | custom | platform
    library: str  # the library the worker's BLAS calls go to ("" = the platform's own)
    env: dict[str, str]  # added to the worker's environment
    why: str  # one line: why this one (and, for reference, how to get a fast one)
    threads: str

    def describe(self) -> str:
        return f"{self.kind} {self.library}".strip()


@functools.cache
def _ldconfig() -> str:
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


def _from_ldconfig(name: str) -> str | None:
    """The path ldconfig's cache gives for ``name`` (a 64-bit one first), e.g.
    ``\tlibopenblas.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libopenblas.so.0``."""
    hits = []
    for line in _ldconfig().splitlines():
        head, sep, path = line.strip().partition(" => ")
        if sep and head.split(" ")[0] == name:
            hits.append((0 if "64" in head else 1, path.strip()))
    return sorted(hits)[0][1] if hits else None


def system_openblas() -> str | None:
    found = _from_ldconfig("libopenblas.so.0")
    if found and os.path.exists(found):
        return found
    triplet = f"{platform.machine()}-linux-gnu"
    for pattern in KNOWN_PATHS:
        p = pattern.format(triplet=triplet)
        if os.path.exists(p):
            return p
    return None


def _dist_file(dist: str, suffix: str) -> str | None:
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(suffix):
            p = Path(f.locate())
            if p.exists():
                return str(p)
    return None


def pypi_openblas() -> str | None:
    """An OpenBLAS wheel's library with plain symbol names: cmeel-openblas (the `openblas` extra),
    else ngsolve-openblas if it happens to be installed."""
    if not sys.platform.startswith("linux"):
        return None
    return _dist_file("cmeel-openblas", "lib/libopenblas.so.0") or _dist_file(
        "ngsolve-openblas", ".so"
    )


@functools.cache
def bundled_reference() -> str | None:
    """The netlib BLAS mlx[cpu]'s Linux wheel links (None elsewhere)."""
    try:
        files = metadata.distribution("mlx-cpu").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if os.path.basename(str(f)).startswith("libblas") and ".so" in str(f):
            return str(Path(f.locate()).resolve())
    return None


def _gfortran_shim(lib: str, shim_dir: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH for a PyPI OpenBLAS that needs libgfortran.so.5 where the system has none:
    links to the copy mlx_cpu.libs bundles (its own dependencies keep their hashed names)."""
    if lib.startswith("/usr/") or "libgfortran.so.5" in _ldconfig():
        return {}
    ref = bundled_reference()
    if not ref:
        return {}
    libs = Path(ref).parent
    gfortran = sorted(libs.glob("libgfortran*.so*"))
    if not gfortran:
        return {}
    shim_dir.mkdir(parents=True, exist_ok=True)
    links = {
        "libgfortran.so.5": gfortran[0],
        **{p.name: p for p in libs.iterdir() if not p.name.startswith("libblas")},
    }
    for name, target in links.items():
        link = shim_dir / name
        if not (link.is_symlink() and os.readlink(link) == str(target)):
            tmp = shim_dir / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
    prev = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": str(shim_dir) + (os.pathsep + prev if prev else "")}


# Loads the library and runs one 256x256 sgemm on all its threads (ones @ ones: every entry is 256):
# a build for a newer CPU than this one (cmeel-openblas 0.3.31's AVX-512 kernels on an AVX2 machine)
# loads fine and dies of SIGILL at its first real matmul, so loading alone proves nothing.
_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
n = 256
F = ctypes.c_float * (n * n)
a, b, c = F(*[1.0] * (n * n)), F(*[1.0] * (n * n)), F()
lib.cblas_sgemm.restype = None
lib.cblas_sgemm(101, 111, 111, n, n, n, ctypes.c_float(1.0), a, n, b, n, ctypes.c_float(0.0), c, n)
bad = [i for i in (0, n * n // 2, n * n - 1) if c[i] != n]
sys.exit(f"a {n}x{n} sgemm gave wrong results ({c[bad[0]]} instead of {n})" if bad else 0)
"""


def _probe(lib: str, env: dict[str, str]) -> str | None:
    """Why the worker could not run with ``env`` (None: it can): a preload that fails to load
    makes every exec fail, and one that cannot run on this CPU kills every worker at its first
    matmul, so try both once, without MLX, before a worker depends on it."""
    try:
        p = subprocess.run(
            [sys.executable, "-c", _PROBE, lib],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if p.returncode == 0:
        return None
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        cause = (
            " (an illegal instruction: built for a newer CPU than this one)"
            if sig == "SIGILL"
            else ""
        )
        return f"a test matmul killed the process with {sig}{cause}"
    return (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]


def _env_threads(env: dict[str, str]) -> str | None:
    for k in THREAD_VARS:
        v = env.get(k) or os.environ.get(k)
        if v:
            return v
    return None


def _probe_once(lib: str, env: dict[str, str], cache: Path) -> str | None:
    """``_probe``, remembered on success: a marker named by everything its answer depends on (the
    library's path, size and mtime, the environment given, this interpreter, the CPU's flags) saves
    each later command the probe's process (a fraction of a second before a worker can start). A
    failure is never remembered: it is probed again."""
    try:
        st = os.stat(os.path.realpath(lib))
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return _probe(lib, env)
    key = hashlib.sha256(
        repr((lib, st.st_size, st.st_mtime_ns, sorted(env.items()), sys.executable, flags)).encode()
    ).hexdigest()[:32]
    marker = cache / f"probed-{key}"
    if marker.exists():
        return None
    problem = _probe(lib, env)
    if problem is None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{lib}: loaded, and a 256x256 sgemm ran and was right\n")
        except OSError:
            pass  # a cache that cannot be written only means probing again next time
    return problem


def _threads(kind: str, env: dict[str, str]) -> str:
    if kind == "reference":
        return "1"
    if _env_threads(env):
        return _env_threads(env)
    return str(system.usable_cores())


@functools.cache
def choose(setting: str = "auto", shim_dir: str | None = None) -> Choice:
    """The BLAS the worker runs on for the config value ``setting`` (memoized: probed once)."""
    if shim_dir:
        shim = Path(shim_dir)
    else:  # one folder per installation (its links point into this interpreter's site-packages)
        tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        shim = system.cache_dir() / f"blas-{tag}"
    if not sys.platform.startswith("linux"):
        return Choice(
            setting, "platform", "", {}, f"{sys.platform}: MLX uses the platform's BLAS", ""
        )
    ref = bundled_reference() or ""
    if setting == "reference":
        return Choice(
            setting,
            "reference",
            ref,
            {},
            "blas: reference (the netlib BLAS bundled with mlx[cpu])",
            "1",
        )
    if setting == "auto":
        candidates = [(p, "system") for p in [system_openblas()] if p] + [
            (p, "PyPI") for p in [pypi_openblas()] if p
        ]
        kind = "openblas"
    else:
        candidates, kind = [(os.path.abspath(os.path.expanduser(setting)), "configured")], "custom"
    problems = []
    for lib, origin in candidates:
        if not os.path.exists(lib):
            problems.append(f"{lib} does not exist")
            continue
        prev = os.environ.get("LD_PRELOAD", "")  # the user's own preloads stay, after ours
        env = {"LD_PRELOAD": lib + (" " + prev if prev else ""), **_gfortran_shim(lib, shim)}
        problem = _probe_once(lib, env, shim.parent / "probed")
        if problem is None:
            return Choice(
                setting,
                kind,
                lib,
                env,
                f"{origin} OpenBLAS preloaded into the worker"
                if kind == "openblas"
                else "blas: path from the config, preloaded into the worker",
                _threads(kind, env),
            )
        problems.append(f"{lib} cannot be preloaded: {problem}")
    why = (
        ("; ".join(problems) + "; " if problems else "no optimized BLAS found; ")
        + "using mlx[cpu]'s bundled reference BLAS (slow): "
        + INSTALL_HINT
    )
    return Choice(setting, "reference", ref, {}, why, "1")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def job_threads(choice: Choice, config: int, recorded: str | None) -> int | None:
    """The OpenBLAS threads a job's worker is told to use (core/threads.py: its config's blas_threads,
    else the count its earlier attempts recorded, else the environment's); None: nothing to tell —
    with ``blas: auto``'s OpenBLAS the worker measures them at its first load, and a reference or
    platform BLAS has no threads to set."""
    if choice.kind == "openblas":
        return T.decided(config, recorded, _env_threads(choice.env))
    if choice.kind == "custom":  # maybe not an OpenBLAS: never measured, its count as today
        return T.decided(config, recorded, choice.threads)
    return None


def fingerprint(choice: Choice, threads: int | None = None) -> dict[str, str]:
    """What bit-exactness depends on besides the job itself: a resume under a different one is no
    longer bit-exact with the earlier attempts. ``threads``: the count the worker is told (job_threads);
    an OpenBLAS worker told none measures them at load and its ``worker_loaded`` records the count."""
    size = ""
    if choice.library:
        try:
            size = f" ({os.path.getsize(os.path.realpath(choice.library))} bytes)"
        except OSError:
            pass
    return {
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "blas": choice.describe() + size,
        "blas_threads": str(threads)
        if threads is not None
        else (MEASURED if choice.kind == "openblas" else choice.threads),
        "platform": f"{platform.system()}-{platform.machine()}",
        **_device(tuple(sorted(choice.env.items()))),
    }


@functools.cache
def _device(env: tuple) -> dict[str, str]:
    """The device MLX trains on with the worker's environment (probed once per process): its backend
    (cpu | metal | cuda) and name; a resume on another device is no longer bit-exact."""
    from .telemetry import probe_backend

    dev = probe_backend(dict(env)).device
    if dev is None:  # the worker will say why when it starts; nothing to record
        return {}
    return {"backend": dev.backend, "device": dev.label()}


def fingerprint_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The keys that differ, as 'key: old -> new' (empty when either side is unknown: old journals; a
    key only one side recorded, such as the device before ftctl recorded it, is not compared)."""
    if not before or not after:
        return []
    return [
        f"{k}: {before[k]} -> {after[k]}"
        for k in sorted(set(before) & set(after))
        if before[k] != after[k]
    ]


# --------------------------------------------------------------------------- in the worker


def _controls():
    """OpenBLAS's thread setters in this process (the preloaded library's symbols), or None."""
    try:
        lib = ctypes.CDLL(None)
        set_n, get_n = lib.openblas_set_num_threads, lib.openblas_get_num_threads
    except (OSError, AttributeError):  # not an OpenBLAS: the reference BLAS, Accelerate, …
        return None
    set_n.argtypes, set_n.restype, get_n.restype = [ctypes.c_int], None, ctypes.c_int
    return set_n, get_n


def settle_threads(
    want: int | None, model, tokens: int, full: bool
) -> tuple[int | None, dict, float | None]:
    """In the worker, once the model is loaded and before anything is trained: set the OpenBLAS
    threads to ``want``, or (None) measure them — the model's own matmuls (every distinct weight shape,
    forward and input-gradient, and the weight gradient when ``full``, on ``tokens`` rows) timed on 1,
    2, 4 … threads up to the pool in alternating rounds, and the other processes' threads running
    meanwhile; core/threads.py chooses. Returns the count in force (None: no OpenBLAS here), the ms
    per count measured ({} when not) and the others running (None when not measured)."""
    ctl = _controls()
    if ctl is None:
        return None, {}, None
    set_n, get_n = ctl
    if want:
        set_n(want)
        return get_n(), {}, None
    import mlx.core as mx

    pool = get_n()
    counts = T.candidates(pool)
    run = _matmuls(model, max(1, tokens), full) if mx.default_device() == mx.cpu else None
    if run is None or len(counts) < 2:
        return pool, {}, None
    from .faults import blas_ms, blas_others

    faked = blas_ms()
    ms, others = (faked, blas_others()) if faked else _time_counts(run, counts, set_n)
    cores = system.usable_cores()
    free = None if others is None else T.free_cores(cores, os.cpu_count() or cores, others)
    set_n(T.choose(ms, free=free))
    return get_n(), {str(n): round(t, 3) for n, t in ms.items()}, others


def _matmuls(model, tokens: int, full: bool):
    """A function running one of each of the model's matmul shapes (None: no float weight matrix)."""
    import mlx.core as mx
    import mlx.nn as nn

    weights = {}
    for _, m in model.named_modules():
        if (
            type(m) is nn.Linear
        ):  # a LoRA layer's frozen base is one too; quantized ones use no BLAS
            weights.setdefault((m.weight.shape, m.weight.dtype), m.weight)
    if not weights:
        return None
    xs = [
        (
            w,
            mx.full((tokens, w.shape[1]), 0.5, w.dtype),
            mx.full((tokens, w.shape[0]), 0.5, w.dtype),
        )
        for w in weights.values()
    ]
    mx.eval([a for x in xs for a in x[1:]])

    def run() -> None:
        out = []
        for w, x, g in xs:
            out += [x @ w.T, g @ w] + ([g.T @ x] if full else [])
        mx.eval(out)

    return run


def _time_counts(
    run, counts: list[int], set_n, budget_s: float = 0.04
) -> tuple[dict[int, float], float | None]:
    """Ms of ``run`` on each thread count, the counts alternating round by round after a warm-up
    each: at least 5 rounds and about ``budget_s`` in all for a small model (its passes take a
    millisecond), one round for a big one (a pass of 0.1 s and more: the measuring stays near a
    second). Each count's figure is the mean of its passes without the fastest and the slowest: one
    preemption does not decide it, but stalls that keep coming back do, as they would slow every
    step (on a busy machine more threads stall often, for a few passes out of many, which a median
    hid: one of three busy runs trained on 2 threads, three times as slow). With them, the median of
    the other processes' running threads, sampled after each round (None where that cannot be read)."""
    import statistics
    import time

    times: dict[int, list[float]] = {n: [] for n in counts}
    seen: list[int] = []

    def one_round() -> float:
        total = 0.0
        for n in counts:
            set_n(n)
            t = time.perf_counter()
            run()
            took = time.perf_counter() - t
            times[n].append(took)
            total += took
        others = _others_running()
        if others is not None:
            seen.append(others)
        return total

    warm = one_round()
    for n in counts:
        times[n].clear()
    seen.clear()
    spent, rounds = 0.0, 0
    while rounds < (1 if warm > 0.1 else 5) or (spent < budget_s and rounds < 50):
        spent += one_round()
        rounds += 1
    ms = {n: statistics.mean(sorted(v)[1:-1] or v) * 1e3 for n, v in times.items()}
    return ms, (statistics.median(seen) if seen else None)


def _others_running() -> int | None:
    """Threads of other processes running or waiting for a CPU now (Linux's count of runnable
    threads, /proc/loadavg, less this process's own; None elsewhere). Busy processes beside a job
    show here every time; the measured passes can miss them (a lull of a few ms)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as f:
                own += f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)
