"""The guards' decisions, pure: from a worker's readings (adapters/telemetry.py), whether its memory
will reach the limit soon (checkpoint and continue in a fresh worker: a planned restart, not a crash),
whether the device runs too hot (pause, or cool down and resume), and what `ftctl doctor` flags.

A reading is a mapping of the report's fields (Metrics: ``rss_gb``, ``mem_active_gb``, ...; None =
not reported on this device).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

Reading = Mapping[str, float | None]
MIN_SAMPLES = 3  # a trend needs three points past the attempt's first report
WINDOW = 8  # the trend is fitted over the last this many reports


class Gauge(NamedTuple):
    """One kind of memory the guard watches, and its ceiling (GB)."""

    name: str
    limit_gb: float


class MemoryTrend(NamedTuple):
    gauge: str
    first_step: int
    first_gb: float
    last_step: int
    last_gb: float
    gb_per_step: float
    limit_gb: float
    steps_left: float  # 0: at or over the limit already
    samples: int

    def evidence(self) -> str:
        when = (
            "has reached the limit"
            if self.steps_left <= 0
            else f"would reach the limit in about {self.steps_left:.0f} steps"
        )
        return (
            f"{self.gauge} grew from {self.first_gb:.2f} GB at step {self.first_step} to "
            f"{self.last_gb:.2f} GB at step {self.last_step} ({self.gb_per_step * 1000:+.1f} MB/step "
            f"over {self.samples} reports); at this rate it {when} of {self.limit_gb:.2f} GB"
        )


def gauges(
    backend: str,
    host_total_gb: float,
    device_total_gb: float | None,
    pct: float,
    limit_gb: float | None,
) -> list[Gauge]:
    """What is watched on a backend. Host memory (RSS + swap) always; MLX's own memory (active + cache)
    against the GPU's memory on CUDA, where it is not in RSS (on CPU and on a Mac's unified memory it
    is, so the host gauge covers it). ``limit_gb`` None = ``pct`` % of the memory there is."""
    host = limit_gb if limit_gb is not None else host_total_gb * pct / 100
    out = [Gauge("worker memory (RSS + swap)", host)]
    if backend == "cuda" and device_total_gb:
        dev = (
            min(limit_gb, device_total_gb * pct / 100) if limit_gb else device_total_gb * pct / 100
        )
        out.append(Gauge("MLX device memory (active + cache)", dev))
    return out


def _value(gauge: Gauge, r: Reading) -> float | None:
    if gauge.name.startswith("worker"):
        rss = r.get("rss_gb")
        return None if rss is None else rss + (r.get("swap_gb") or 0.0)
    active = r.get("mem_active_gb")
    return None if active is None else active + (r.get("mem_cache_gb") or 0.0)


def memory_trend(
    samples: Sequence[tuple[int, Reading]], gauge_list: Sequence[Gauge], horizon_steps: int
) -> MemoryTrend | None:
    """The first gauge whose least-squares trend over the last WINDOW reports (after the attempt's
    first, which still holds start-up's growth) reaches its limit within ``horizon_steps`` steps, or
    that is over it already; None when all is well (or ``horizon_steps`` is 0: the guard is off).
    ``samples`` are one attempt's (step, reading) in step order."""
    if horizon_steps <= 0 or len(samples) < MIN_SAMPLES + 1:
        return None
    recent = list(samples[1:])[-WINDOW:]
    for g in gauge_list:
        pts = [(s, v) for s, r in recent if (v := _value(g, r)) is not None]
        if len(pts) < MIN_SAMPLES:
            continue
        n = len(pts)
        mx = sum(s for s, _ in pts) / n
        my = sum(v for _, v in pts) / n
        sxx = sum((s - mx) ** 2 for s, _ in pts)
        if sxx <= 0:
            continue
        slope = sum((s - mx) * (v - my) for s, v in pts) / sxx
        last_step, last = pts[-1]
        if last >= g.limit_gb:
            left = 0.0
        elif slope <= 0:
            continue
        else:
            # from the fitted line at the last step, not the last point: one noisy report decides nothing
            fitted = my + slope * (last_step - mx)
            left = max(0.0, (g.limit_gb - fitted) / slope)
            if left > horizon_steps:
                continue
        return MemoryTrend(
            g.name, pts[0][0], pts[0][1], last_step, last, slope, g.limit_gb, left, n
        )
    return None


def too_hot(r: Reading, max_temperature_c: float) -> str | None:
    """The evidence when the device's temperature is over the limit, else None (or not reported)."""
    t = r.get("device_temp_c")
    if t is None or t <= max_temperature_c:
        return None
    return f"the GPU is at {t:.0f} °C, above max_temperature_c = {max_temperature_c:g} °C"


def device_problems(r: Reading, max_temperature_c: float, max_memory_pct: float) -> list[str]:
    """What `ftctl doctor` flags in a device's readings (NVML's on CUDA)."""
    out = []
    hot = too_hot(r, max_temperature_c)
    if hot:
        out.append(hot)
    used, total = r.get("device_mem_used_gb"), r.get("device_mem_total_gb")
    if used is not None and total:
        pct = 100 * used / total
        if pct > max_memory_pct:
            out.append(
                f"GPU memory is {pct:.0f} % full ({used:.1f} of {total:.1f} GB), above "
                f"max_memory_pct = {max_memory_pct:g} %"
            )
    return out
