"""Which device trains, and its readings: MLX's own memory counters on every backend, the worker's
RSS and swap, and on an NVIDIA GPU what NVML says (used / total memory, utilisation, temperature,
power) through ``nvidia-ml-py`` (the ``ftctl[cuda]`` extra; absent, those readings are None).

The seam: ``FTCTL_FAKE_TELEMETRY`` holds JSON that replaces readings, for tests and rehearsals on a
machine without the hardware. Each key is a reading (``rss_gb``, ``device_temp_c``, ...) set to a
fixed value; ``<reading>_per_step`` adds that much per training step *this process* has run (a fresh
worker starts again from the base value, as a leaking process's memory does); ``backend`` and
``device`` name a device that is not there. A reading the seam does not mention is the real one.
Tests that run in-process pass ``fake=`` to ``Telemetry`` instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import msgspec

from ftctl.events.types import READINGS

GB = 1e9
FAKE_ENV = "FTCTL_FAKE_TELEMETRY"


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """The device MLX trains on: backend cpu | metal | cuda, its name and memory (bytes, 0 unknown)."""

    backend: str
    index: int = 0
    name: str = ""
    memory_bytes: int = 0

    def label(self) -> str:
        """'cuda:0 NVIDIA H100 80GB HBM3', 'metal Apple M2 Max', 'cpu AMD EPYC'."""
        where = f"{self.backend}:{self.index}" if self.backend == "cuda" else self.backend
        return f"{where} {self.name}".strip()


def fake() -> dict:
    """The seam's readings, {} when unset (the normal case)."""
    text = os.environ.get(FAKE_ENV, "")
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{FAKE_ENV} is not JSON: {e}") from None
    known = {*READINGS, "backend", "device", "index"}
    for key in data:
        if key.removesuffix("_per_step") not in known:  # a typo would fake nothing, silently
            raise ValueError(
                f"{FAKE_ENV}: unknown reading {key!r}; known: {', '.join(sorted(known))}"
            )
    return data


def mlx_device(overrides: dict | None = None) -> Device:
    """What MLX's default device is (in the worker, where MLX is imported anyway)."""
    over = fake() if overrides is None else overrides
    if "backend" in over:
        return Device(
            backend=over["backend"], index=int(over.get("index", 0)), name=over.get("device", "")
        )
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.DeviceType.gpu:
        backend = (
            "cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "gpu"
        )
    else:
        backend = "cpu"
    try:
        info = mx.device_info()
    except Exception:  # an older MLX: the name is only decoration
        info = {}
    name = str(info.get("device_name") or info.get("architecture") or "")
    memory = int(info.get("total_memory") or info.get("memory_size") or 0)
    if backend == "cpu" and not memory:
        import psutil

        memory = psutil.virtual_memory().total
    index = getattr(dev, "index", 0)  # MLX 0.32's Device exposes its type only
    return Device(backend=backend, index=index, name=name, memory_bytes=memory)


class NVML:
    """One NVIDIA GPU through nvidia-ml-py (``import pynvml``). ``open`` returns None when the
    package, the driver or the device is missing: those readings are then simply not reported."""

    def __init__(self, nv, handle):
        self.nv, self.handle = nv, handle

    @classmethod
    def open(cls, index: int = 0) -> "NVML | None":
        try:
            import pynvml as nv
        except ImportError:
            return None
        try:
            nv.nvmlInit()
            cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            first = cuda.split(",")[0].strip() if cuda else ""
            if first.startswith("GPU-"):  # a UUID
                handle = nv.nvmlDeviceGetHandleByUUID(first)
            else:
                handle = nv.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else index)
        except Exception:  # NVMLError: no driver, no device
            return None
        return cls(nv, handle)

    def name(self) -> str:
        n = self.nv.nvmlDeviceGetName(self.handle)
        return n.decode() if isinstance(n, bytes) else str(n)

    def read(self) -> dict[str, float | None]:
        """Each reading on its own: a GPU that does not report power still reports its memory."""
        nv, h = self.nv, self.handle
        out: dict[str, float | None] = {}

        def get(key, f):
            try:
                out[key] = f()
            except Exception:
                out[key] = None

        mem = None
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
        except Exception:
            pass
        out["device_mem_used_gb"] = mem.used / GB if mem is not None else None
        out["device_mem_total_gb"] = mem.total / GB if mem is not None else None
        get("device_util_pct", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
        get(
            "device_temp_c",
            lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        )
        get("device_power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
        return out


def process_swap_gb(pid: int) -> float | None:
    """The process's own swapped-out memory (Linux: VmSwap in /proc/PID/status, cheap; elsewhere the
    system's swap in use, the best there is)."""
    if sys.platform.startswith("linux"):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmSwap:"):
                    return int(line.split()[1]) * 1024 / GB
        except (OSError, ValueError, IndexError):
            return None
        return None
    import psutil

    try:
        return psutil.swap_memory().used / GB
    except Exception:
        return None


class Telemetry:
    """The worker's sampler: ``read(steps)`` gives every reading (None = not reported on this
    device), ``steps`` being the training steps this process has run (the seam's per-step growth)."""

    def __init__(
        self, device: Device | None = None, *, nvml: NVML | None = None, fake: dict | None = None
    ):
        self.fake = globals()["fake"]() if fake is None else fake
        self.device = device or mlx_device(self.fake)
        self.nvml = (
            nvml
            if nvml is not None
            else (NVML.open(self.device.index) if self.device.backend == "cuda" else None)
        )
        import psutil  # here, not at import: `ftctl status` reads READINGS without loading psutil

        self.proc = psutil.Process()

    def read(self, steps: int = 0) -> dict[str, float | None]:
        out: dict[str, float | None] = dict.fromkeys(READINGS)
        if not {"mem_active_gb", "mem_cache_gb"} <= self.fake.keys():
            import mlx.core as mx

            out["mem_active_gb"] = mx.get_active_memory() / GB
            out["mem_cache_gb"] = mx.get_cache_memory() / GB
        try:
            out["rss_gb"] = self.proc.memory_info().rss / GB
        except Exception:  # psutil.Error: the process is going away
            pass
        out["swap_gb"] = process_swap_gb(self.proc.pid)
        if self.nvml is not None:
            out.update(self.nvml.read())
        elif self.device.backend == "metal" and self.device.memory_bytes:
            # unified memory: what MLX holds of the GPU's working set is the device memory in use
            if out["mem_active_gb"] is not None:
                out["device_mem_used_gb"] = out["mem_active_gb"] + (out["mem_cache_gb"] or 0.0)
            out["device_mem_total_gb"] = self.device.memory_bytes / GB
        for key in READINGS:
            if key in self.fake:
                out[key] = float(self.fake[key]) + steps * float(
                    self.fake.get(key + "_per_step", 0)
                )
            elif key + "_per_step" in self.fake and out[key] is not None:
                out[key] += steps * float(self.fake[key + "_per_step"])
        return out


def host_readings() -> dict[str, float | None]:
    """For `ftctl doctor` (no MLX imported): the first NVIDIA GPU's readings through NVML, with the
    seam applied; {} when there is none."""
    over = fake()
    nvml = NVML.open(0)
    out: dict[str, float | None] = {}
    if nvml is not None:
        out = nvml.read()
        out["device"] = nvml.name()  # type: ignore[assignment]
    for key in (
        "device_mem_used_gb",
        "device_mem_total_gb",
        "device_util_pct",
        "device_temp_c",
        "device_power_w",
    ):
        if key in over:
            out[key] = float(over[key])
    if "device" in over:
        out["device"] = over["device"]  # type: ignore[assignment]
    return out


# niced: it runs beside a worker that is importing the same libraries, and must not slow it down
_PROBE = (
    "import json, os;"
    "hasattr(os, 'nice') and os.nice(10);"
    "from ftctl.adapters.telemetry import mlx_device;"
    "print(json.dumps(__import__('msgspec').to_builtins(mlx_device())))"
)


def _dist(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def mlx_wheels() -> list[str]:
    """The MLX backend wheels installed ('mlx-cuda-12 0.32.4', 'mlx-cpu 0.32.4', ...)."""
    names = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda", "mlx-cpu", "mlx-metal")
    return [f"{n} {v}" for n in names if (v := _dist(n))]


class Backend(msgspec.Struct, frozen=True):
    device: Device | None  # None: MLX cannot start with the worker's environment
    why: str
    nvidia_gpu: bool  # NVML sees an NVIDIA GPU on this machine (whatever MLX uses)


def probe_backend(env: dict[str, str] | None = None, timeout: float = 60.0) -> Backend:
    """Which device the training worker will use, and why: a short subprocess imports MLX with the
    worker's environment (the only way to know: a CUDA wheel without a driver falls back, or fails).
    The device is None when MLX cannot start there (``why`` says what it said)."""
    import subprocess

    gpu = NVML.open(0) is not None or "backend" in fake()

    full = {**os.environ, **(env or {})}
    try:
        p = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Backend(None, f"importing MLX took over {timeout:.0f} s", gpu)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        if sys.platform.startswith("linux") and not mlx_wheels():
            tail += (
                "; no MLX backend is installed: pip install 'ftctl[cpu]', or 'ftctl[cuda]' with an "
                "NVIDIA GPU (docs/hardware.md)"
            )
        return Backend(None, f"MLX cannot start: {tail}", gpu)
    dev = msgspec.convert(json.loads(p.stdout.strip().splitlines()[-1]), Device)
    return Backend(dev, backend_reason(dev, mlx_wheels(), gpu, sys.platform), gpu)


def backend_reason(dev: Device, wheels: list[str], nvidia_gpu: bool, platform: str) -> str:
    """One line on why the worker runs where it does, and what to do when a faster device is idle."""
    have = ", ".join(wheels) or "no MLX backend wheel recorded"
    if dev.backend == "cuda":
        return f"{have} installed and a CUDA device is visible: MLX's default device is the GPU"
    if dev.backend == "metal":
        return "macOS on Apple silicon: MLX's default device is the Metal GPU"
    if nvidia_gpu:
        cuda = [w for w in wheels if w.startswith("mlx-cuda")]
        if cuda:
            return (
                f"{have} installed and NVML sees an NVIDIA GPU, but MLX's default device is the CPU: "
                "check the driver (nvidia-smi) and that the CUDA libraries load (python -c "
                "'import mlx.core as mx; print(mx.cuda.is_available())')"
            )
        return (
            f"{have} installed: the CPU backend, although an NVIDIA GPU is here; to train on it: "
            'pip install "ftctl[cuda]" (MLX\'s CUDA wheels; docs/hardware.md)'
        )
    if platform == "darwin":
        return f"{have}: MLX's default device is the CPU (an Intel Mac has no Metal backend in MLX)"
    return f"{have} installed and no NVIDIA GPU seen: the CPU backend"
