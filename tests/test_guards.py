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


# --------------------------------------------------------------------------- the guards acting on a job
# A real daemon and worker; the worker's memory and temperature readings come from the telemetry seam
# (FTCTL_FAKE_TELEMETRY): a base value, plus so much per step this worker process has run.
#
# The guard decides on the report of step N in the daemon, and the worker stops at the first step
# boundary after the daemon's stop reaches it: N + 1 on a quiet machine, N + 2, N + 5 ... on a busy
# one (a demo step is a few tens of ms), which moved the planned restarts, let the memory pass the
# ceiling, or let the job finish before the second restart. So each test holds the worker at step
# N + 1 (FTCTL_HANG_AT: it stands still until the daemon's stop reaches it, then stops there) and
# the stops are where the readings put them, however slow the daemon is.


def _guarded_job(tmp_path, demo, env: dict, hold: tuple[int, ...], **guards):
    from helpers import ftctl, make_workspace

    home = make_workspace(
        tmp_path / "ws", demo.model_dir, steps_per_report=1, guards={**guards}
    )  # reporting each step changes nothing in training: the adapter must match the baseline's
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "job1")
    # the worker stands still at each step of ``hold`` (once) until the guard's stop reaches it
    held = ",".join(f"mid_step:{step}:{tmp_path / f'held-{step}'}" for step in hold)
    env = {**env, "FTCTL_HANG_AT": held}
    # exit 1 when the job did not complete (a guard paused it): the tests look at what was recorded
    ftctl(home, "start", "--until-idle", "--quiet", env=env, timeout=600, check=False)
    for step in hold:  # each hold was reached: the stop there was the guard's, not a race won
        assert (tmp_path / f"held-{step}").exists(), step
    return home


def _events(home, kind):
    from helpers import history

    return [e["data"] for e in history(home) if e["type"] == kind]


def test_memory_growth_restarts_the_worker_before_the_limit_bit_exact(tmp_path, demo, baseline):
    """100 MB more per step from 1.0 GB, a 3.0 GB ceiling, a 5-step horizon: each worker's 15th report
    (2.5 GB, 5 steps short) trips the guard and it stops with a checkpoint at the next step, 16 and
    32; the job finishes in a third worker with the uninterrupted run's adapter, no crash recorded,
    the restart budget unused."""
    import json

    from helpers import finished

    fake = {"rss_gb": 1.0, "rss_gb_per_step": 0.1, "swap_gb": 0.0}
    home = _guarded_job(
        tmp_path,
        demo,
        {"FTCTL_FAKE_TELEMETRY": json.dumps(fake)},
        hold=(16, 32),
        memory_limit_gb=3.0,
        memory_horizon_steps=5,
    )
    s = finished(home)
    assert s["adapter_sha256"] == baseline.sha1
    planned = _events(home, "restart_planned")
    assert [p["step"] for p in planned] == [16, 32], planned
    for p, tripped in zip(planned, (15, 31)):
        assert p["guard"] == "memory"
        assert (
            f"worker memory (RSS + swap) grew from 1.80 GB at step {tripped - 7} to 2.50 GB at step {tripped}"
            in p["evidence"]
        )
        assert "+100.0 MB/step" in p["evidence"] and "would reach the limit" in p["evidence"]
    assert _events(home, "crashed") == []
    started = _events(home, "training_started")
    assert [t.get("resume_step", 0) for t in started] == [0, planned[0]["step"], planned[1]["step"]]
    assert len({t["worker_pid"] for t in started}) == 3  # each continued in a fresh process
    # every report stayed below the ceiling: the guard acted before the limit, not at it
    from ftctl.events.journal import Journal
    from ftctl.events.types import Metrics

    # metric_rows: (id, ts, then Metrics' fields in order)
    at = 2 + Metrics.__struct_fields__.index("rss_gb")
    with Journal.open_readonly(home / "journal.db") as j:
        rss = [row[at] for row in j.metric_rows("0001")]
    assert rss and None not in rss and max(rss) < 3.0
    assert s["planned_restarts"] == 2 and s["crashes"] == []  # the restart budget is untouched
    _readings_are_shown(home, s)


def _readings_are_shown(home, s):
    """What the user sees of the device and its readings: status JOB, metrics --csv, plot, TensorBoard."""
    import csv
    import io

    from helpers import ftctl

    r = s["last_report"]
    cpu = r["device"].startswith("cpu")  # tests/test_gpu.py runs this on a GPU too
    assert r["device"].split()[0].split(":")[0] in ("cpu", "cuda", "metal")
    assert r["rss_gb"] > 1.0 and r["mem_active_gb"] is not None
    text = ftctl(home, "status", "0001").stdout
    assert "device" in text and "worker RSS" in text and "planned restarts" in text
    rows = list(csv.DictReader(io.StringIO(ftctl(home, "metrics", "0001", "--csv").stdout)))
    rows = [x for x in rows if x["loss"]]  # the training reports (not step 0's evaluation)
    assert len(rows) == 40 and rows[-1]["device"] == r["device"]
    assert all(float(x["rss_gb"]) < 3.0 for x in rows)
    assert (rows[0]["device_temp_c"] == "") == cpu  # the CPU reports no temperature
    out = home / "plot.png"
    ftctl(home, "plot", "0001", "-o", str(out))
    assert out.stat().st_size > 10_000
    ftctl(home, "export-tb", "0001")
    from test_view import _tb_points

    tb = _tb_points(home / "tensorboard" / "0001")
    assert len(tb["device/rss_gb"]) == 40 and ("device/device_temp_c" in tb) != cpu


def test_a_hot_gpu_pauses_the_job_with_the_reason_and_resume_finishes_it(tmp_path, demo, baseline):
    import json

    from helpers import finished, ftctl, status

    fake = {"device_temp_c": 80.0, "device_temp_c_per_step": 1.0}  # over 85 °C at its 6th step
    home = _guarded_job(tmp_path, demo, {"FTCTL_FAKE_TELEMETRY": json.dumps(fake)}, hold=(7,))
    s = status(home, "0001")
    assert s["state"] == "paused", s
    assert [c["step"] for c in s["checkpoints"]][-1] == 7  # stopped at the step after the reading
    assert "temperature guard: the GPU is at 86 °C, above max_temperature_c = 85 °C" in s["reason"]
    assert "ftctl resume 0001" in s["reason"] and "guards.cooldown_s" in s["reason"]
    assert _events(home, "crashed") == [] and _events(home, "restart_planned") == []
    ftctl(home, "resume", "0001")
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)  # cooled down: no fake readings
    assert finished(home)["adapter_sha256"] == baseline.sha1


def test_a_cooldown_resumes_by_itself_after_the_wait(tmp_path, demo, baseline):
    import json

    from helpers import finished, history

    from ftctl.events.types import ts_epoch

    fake = {
        "device_temp_c": 80.0,
        "device_temp_c_per_step": 0.3,
    }  # over 85 °C at a worker's 17th step
    home = _guarded_job(
        tmp_path, demo, {"FTCTL_FAKE_TELEMETRY": json.dumps(fake)}, hold=(18, 36), cooldown_s=1.5
    )
    assert finished(home)["adapter_sha256"] == baseline.sha1
    h = history(home)
    planned = [e for e in h if e["type"] == "restart_planned"]
    assert [p["data"]["step"] for p in planned] == [18, 36]
    assert all(p["data"]["guard"] == "temperature" for p in planned)
    starts = [e for e in h if e["type"] == "training_started"]
    for p, nxt in zip(planned, starts[1:]):
        assert p["data"]["not_before"] >= ts_epoch(p["ts"]) + 1.4
        assert ts_epoch(nxt["ts"]) >= p["data"]["not_before"] - 0.05  # it waited the cool-down


def test_a_pause_asked_for_during_a_guards_stop_is_carried_out(ws, tmp_path):
    """The guard's trip asks the worker to stop once (Attempt.ask_stop, as the control pass does); a
    pause requested (by the user, or a loss-spike alert) before that stop has landed takes it over:
    no second stop is sent, and finish will record `paused`, not a planned restart that the next
    attempt's start would have cleared the request with."""
    import types

    from helpers import ftctl

    from ftctl.control import jobs
    from ftctl.control.guard import Guard
    from ftctl.control.ledger import Ledger
    from ftctl.control.supervise import Attempt, StopFlags
    from ftctl.core.config import Guards
    from ftctl.core.state import job_stream
    from ftctl.events import types as ev

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(40)))
    ftctl(ws, "submit", str(data))
    ledger = Ledger.open(ws / "journal.db")
    try:
        ledger.commit(
            job_stream("0001"),
            ev.TrainingStarted(
                job="0001", attempt=1, worker_pid=1, worker_started_at=1.0, base_model="/m"
            ),
        )
        said, sent = [], []
        a = Attempt.__new__(Attempt)  # only what the report and the control pass use
        a.job, a.stop_sent, a.stop_reason = "0001", None, None
        a.host = types.SimpleNamespace(
            stop=StopFlags(), ledger=ledger, say=lambda text, level="info": said.append(text)
        )
        a.w = types.SimpleNamespace(send=sent.append, kill_group=lambda: None)
        a.health = types.SimpleNamespace(check=lambda: [])
        a.guard = Guard(Guards(memory_limit_gb=3.0, memory_horizon_steps=5), "0001")
        trips = []
        for step in range(1, 17):
            m = ev.Metrics(
                step=step,
                global_step=step,
                loss=1.0,
                lr=1e-4,
                tokens_per_s=100.0,
                peak_mem_gb=0.1,
                trained_tokens=step,
                rss_gb=1.0 + 0.1 * step,
                swap_gb=0.0,
            )
            trip = a.guard.report(m)
            if trip is not None:
                trips.append(step)
                a.ask_stop("guard", trip.said(), "warn")
        assert trips == [15] and a.stop_reason == "guard" and len(sent) == 1
        assert "memory guard: worker memory (RSS + swap) grew" in said[-1]
        a.control()  # nothing asked: the guard's stop stands
        assert a.stop_reason == "guard" and len(sent) == 1
        user = Ledger.open(ws / "journal.db")  # the user's command, another connection
        jobs.request(user, "0001", "pause")
        user.close()
        a.control()
        assert a.stop_reason == "pause" and len(sent) == 1  # the stop in flight serves the pause
        event, _ = a.guard.outcome(16)  # what the guard alone would have recorded
        assert isinstance(event, ev.RestartPlanned) and event.step == 16
    finally:
        ledger.close()
