"""The guards' pure decisions (core/guards.py): memory trend, temperature, doctor's thresholds."""

from hypothesis import given
from hypothesis import strategies as st

from ftctl.core import guards as G

HOST = [G.Gauge("worker memory (RSS + swap)", 2.0)]


def series(base, per_step, steps, key="rss_gb"):
    return [(s, {key: base + per_step * s, "swap_gb": 0.0}) for s in steps]


def test_growth_towards_the_limit_trips_before_it():
    # 0.1 GB a step from 1.0 GB: 2.0 GB at step 10; a horizon of 5 steps trips at step 5
    seen = [s for s in range(1, 11) if G.memory_trend(series(1.0, 0.1, range(1, s + 1)), HOST, 5)]
    assert seen[0] == 5
    t = G.memory_trend(series(1.0, 0.1, range(1, 6)), HOST, 5)
    assert t.gauge.startswith("worker") and abs(t.gb_per_step - 0.1) < 1e-9
    assert abs(t.steps_left - 5) < 1e-6 and t.last_gb < t.limit_gb
    assert "+100.0 MB/step" in t.evidence() and "about 5 steps" in t.evidence()


def test_flat_memory_never_trips_and_off_means_off():
    assert G.memory_trend(series(1.9, 0.0, range(1, 30)), HOST, 100) is None
    assert G.memory_trend(series(1.0, 0.1, range(1, 30)), HOST, 0) is None


def test_the_first_report_and_too_few_points_decide_nothing():
    # start-up's jump (the first report) is not a trend
    jump = [(1, {"rss_gb": 0.2}), (2, {"rss_gb": 1.0}), (3, {"rss_gb": 1.0}), (4, {"rss_gb": 1.0})]
    assert G.memory_trend(jump, HOST, 1000) is None
    assert G.memory_trend(series(1.0, 0.1, range(1, 4)), HOST, 1000) is None


def test_over_the_limit_trips_whatever_the_slope():
    t = G.memory_trend(series(2.5, 0.0, range(1, 6)), HOST, 1)
    assert t is not None and t.steps_left == 0 and "has reached the limit" in t.evidence()


def test_swap_counts_with_rss_and_cuda_watches_mlx_memory():
    s = [(i, {"rss_gb": 1.0, "swap_gb": 0.2 * i}) for i in range(1, 8)]
    assert G.memory_trend(s, HOST, 10) is not None
    gs = G.gauges("cuda", 64.0, 80.0, 95.0, None)
    assert [g.name for g in gs] == [
        "worker memory (RSS + swap)",
        "MLX device memory (active + cache)",
    ]
    assert abs(gs[1].limit_gb - 76.0) < 1e-9 and abs(gs[0].limit_gb - 60.8) < 1e-9
    dev = [(i, {"rss_gb": 1.0, "mem_active_gb": 60 + i, "mem_cache_gb": 5.0}) for i in range(1, 8)]
    assert G.memory_trend(dev, gs, 10).gauge.startswith("MLX device")
    # on the CPU and on a Mac MLX's memory is in RSS: one gauge
    assert len(G.gauges("cpu", 24.0, None, 95.0, None)) == 1
    assert G.gauges("metal", 24.0, 24.0, 95.0, 10.0)[0].limit_gb == 10.0


@given(
    base=st.floats(0.1, 1.5),
    per_step=st.floats(0.001, 0.5),
    horizon=st.integers(1, 50),
)
def test_linear_growth_trips_no_later_than_the_horizon_before_the_limit(base, per_step, horizon):
    """Exact linear growth: the guard trips at the first report whose projection is within the
    horizon, never after the limit is crossed, never more than one step early."""
    for last in range(MIN := G.MIN_SAMPLES + 1, 400):
        t = G.memory_trend(series(base, per_step, range(1, last + 1)), HOST, horizon)
        value = base + per_step * last
        if t is not None:
            true_left = (2.0 - value) / per_step
            assert true_left <= horizon + 1e-6
            break
        assert value < 2.0  # never silent over the limit
    assert last >= MIN


def test_temperature_and_doctor_thresholds():
    assert G.too_hot({"device_temp_c": 84.0}, 85) is None
    assert G.too_hot({"device_temp_c": None}, 85) is None
    assert "91 °C" in G.too_hot({"device_temp_c": 91.0}, 85)
    r = {"device_temp_c": 90.0, "device_mem_used_gb": 23.5, "device_mem_total_gb": 24.0}
    problems = G.device_problems(r, 85, 95)
    assert len(problems) == 2 and "98 % full" in problems[1]
    assert (
        G.device_problems({"device_mem_used_gb": 10.0, "device_mem_total_gb": 24.0}, 85, 95) == []
    )
