"""The training-health detectors (core/health.py): pure functions of a curve, property-tested."""

from __future__ import annotations

from statistics import median

from hypothesis import given
from hypothesis import strategies as st

from ftctl.core import health as H

values = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
maybe = st.one_of(st.none(), values)
factors = st.floats(min_value=1.01, max_value=20)
windows = st.integers(1, 12)


def curve(vals):
    return [(10 * (i + 1), v) for i, v in enumerate(vals)]


# --------------------------------------------------------------------------- loss spikes


@given(st.lists(maybe, max_size=60), factors, windows)
def test_a_spike_is_exactly_a_loss_above_factor_times_the_median_before_it(vals, factor, window):
    pts = curve(vals)
    found = {f.step: f for f in H.loss_spikes(pts, factor, window)}
    known = [(s, v) for s, v in pts if v is not None]
    for i, (step, loss) in enumerate(known):
        before = [v for _, v in known[max(0, i - window) : i]]
        fires = len(before) >= min(H.MIN_HISTORY, window) and loss > factor * median(before)
        assert (step in found) == fires, (step, loss, before)
        if fires:
            f = found[step]
            assert f.baseline == median(before) and f.value == loss and f.kind == H.SPIKE
            assert list(f.compared) == [s for s, _ in known[max(0, i - window) : i]]
            assert f"step {step}" in f.text and f"{loss / f.baseline:.1f}x" in f.text


@given(st.lists(values, max_size=40), factors, windows, st.integers(-10, 10))
def test_spikes_do_not_depend_on_the_loss_scale(vals, factor, window, k):
    scale = 2.0**k  # exact in floating point: the comparisons are the same ones, scaled
    a = H.loss_spikes(curve(vals), factor, window)
    b = H.loss_spikes(curve([v * scale for v in vals]), factor, window)
    assert [f.step for f in a] == [f.step for f in b]


@given(st.lists(values, max_size=60).map(lambda v: sorted(v, reverse=True)), factors, windows)
def test_a_falling_loss_never_spikes(vals, factor, window):
    assert H.loss_spikes(curve(vals), factor, window) == []


def test_one_poisoned_report_is_one_spike():
    losses = [3.2, 3.0, 2.9, 2.8, 2.9, 2.7, 60.0, 2.6, 2.5, 2.6]
    [f] = H.loss_spikes(curve(losses), 3.0, 10)
    assert (f.step, f.value, f.baseline) == (70, 60.0, 2.9) and f.compared == (
        10,
        20,
        30,
        40,
        50,
        60,
    )
    assert f.text.startswith("loss spike at step 70: train loss 60 is 20.7x the median 2.9")
    assert H.loss_spikes(curve(losses[:3] + [60.0]), 3.0, 10)[0].step == 40
    assert H.loss_spikes(curve(losses[:2] + [60.0]), 3.0, 10) == []  # 2 reports: no median yet


# --------------------------------------------------------------------------- plateaus


@given(st.lists(maybe, max_size=60), st.integers(1, 8), st.sampled_from([0.0, 0.01, 0.5]))
def test_a_plateau_is_patience_evaluations_without_a_new_best(vals, patience, delta):
    pts = curve(vals)
    found = H.plateaus(pts, patience, delta)
    # the reference: walk the curve, counting evaluations since the best
    want, best, since, armed = [], None, 0, True
    for step, v in pts:
        if best is None:
            best = v
            continue
        if v is not None and v < best - delta:
            best, since, armed = v, 0, True
            continue
        since += 1
        if since == patience and armed:
            want.append(step)
    assert [f.step for f in found] == want
    for f in found:
        assert len(f.compared) == patience and f.compared[-1] == f.step and f.kind == H.PLATEAU


@given(st.lists(values, min_size=1, max_size=60, unique=True), st.integers(1, 8))
def test_a_loss_that_always_improves_never_plateaus(vals, patience):
    assert H.plateaus(curve(sorted(vals, reverse=True)), patience) == []


def test_a_plateau_fires_once_per_stretch():
    vals = [2.0, 1.5, 1.6, 1.55, 1.7, 1.6, 1.58, 1.4, 1.45, 1.5, 1.46]
    found = H.plateaus(curve(vals), 3)
    assert [f.step for f in found] == [50, 110]
    assert found[0].baseline == 1.5 and "the best is still 1.5 at step 20" in found[0].text


# --------------------------------------------------------------------------- throughput drops


@given(
    st.lists(maybe, max_size=60),
    factors,
    windows,
    st.integers(1, 4),
)
def test_a_drop_is_a_sustained_stretch_under_the_median_before_it(vals, factor, window, sustain):
    pts = curve(vals)
    found = H.throughput_drops(pts, factor, window, sustain)
    known = [(s, v) for s, v in pts if v is not None]
    idx = {s: i for i, (s, _) in enumerate(known)}
    last_end = -1
    for f in found:
        i = idx[f.step]
        first = i - sustain + 1
        before = [v for _, v in known[max(0, first - window) : first]]
        assert len(before) >= min(H.MIN_HISTORY, window) and f.baseline == median(before)
        assert all(v < f.baseline / factor for _, v in known[first : i + 1])
        assert first > last_end  # one finding per stretch: stretches never overlap
        last_end = i
        assert f.kind == H.SLOWDOWN


@given(st.lists(values, max_size=60), factors, windows, st.integers(1, 4))
def test_a_steady_or_rising_rate_never_drops(vals, factor, window, sustain):
    assert H.throughput_drops(curve(sorted(vals)), factor, window, sustain) == []


def test_one_slow_report_is_noise_three_are_a_drop():
    rates = [1500, 1480, 1520, 1510, 300, 1490, 1500, 700, 650, 600, 620, 1500]
    assert H.throughput_drops(curve(rates), 2.0, 10, 3)[0].step == 100
    [f] = H.throughput_drops(curve(rates), 2.0, 10, 3)
    assert f.baseline == 1500 and f.compared[0] == 10 and "700, 650, 600 tok/s" in f.text
    assert [f.step for f in H.throughput_drops(curve(rates), 2.0, 10, 1)] == [50, 80]
