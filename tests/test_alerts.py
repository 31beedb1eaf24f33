"""Training-health alerts end to end: a loss spike injected through the data seam (FTCTL_POISON with
FTCTL_POISON_SCALE: the batch holding one example has its loss, and so its gradients, scaled) is
found by the daemon's watch in the journal's metrics, recorded with its evidence, marked on the
curve, sent to a real http.server target, and with ``alerts.on_spike: pause`` pauses the job
through the normal pause path: resumed, it ends with the same adapter bytes as a run that was
never paused."""

from __future__ import annotations

import pytest
from helpers import ftctl, ftctl_json, history, make_workspace, status
from test_notify import Server
from test_reproduce import _marker

SPIKE_STEP = 12
HANG_STEP = 16  # the paused run stands still here, if the alert's pause has not reached it before
SCALE = "40"
ALERTS = {"spike_factor": 3.0, "spike_window": 10, "plateau_evals": None, "throughput_factor": None}


def _run(tmp_path_factory, demo, name: str, on_spike: str, env: dict, check: bool = True):
    server = Server()
    home = make_workspace(
        tmp_path_factory.mktemp(name) / "ws",
        demo.model_dir,
        iters=24,
        steps_per_report=1,
        alerts={**ALERTS, "on_spike": on_spike},
        notify=[{"url": server.url, "events": ["alert", "paused", "completed"], "retries": 0}],
    )
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    p = ftctl(home, "start", "--until-idle", "--quiet", env=env, timeout=600, check=check)
    return home, server, p


@pytest.fixture(scope="module")
def spiked(tmp_path_factory, demo):
    """Two runs with the same spike at step 12: one records it, one pauses on it (and is resumed)."""
    text, _ = _marker(demo, SPIKE_STEP)
    env = {"FTCTL_POISON": text, "FTCTL_POISON_SCALE": SCALE}
    seen, server_a, _ = _run(tmp_path_factory, demo, "record", "record", env)
    marker = tmp_path_factory.mktemp("hang") / "hung"
    paused, server_b, p = _run(
        tmp_path_factory,
        demo,
        "pause",
        "pause",
        {**env, "FTCTL_HANG_AT": f"mid_step:{HANG_STEP}:{marker}"},
        check=False,
    )
    assert (
        p.returncode == 1 and "paused by the loss-spike alert" in p.stderr
    )  # it says why it stopped
    at_pause = status(paused, "0001")
    ftctl(paused, "resume", "1")
    ftctl(paused, "start", "--until-idle", "--quiet", env=env, timeout=600)
    yield seen, server_a, paused, server_b, at_pause
    server_a.close()
    server_b.close()


def _alerts(home):
    return [e["data"] for e in history(home) if e["type"] == "training_alert"]


def test_a_spike_is_recorded_with_its_evidence_and_drawn(spiked):
    seen = spiked[0]
    (a,) = _alerts(seen)
    assert a["alert"] == "loss_spike" and a["step"] == SPIKE_STEP and a["action"] == "recorded"
    # the evidence is the journal's own numbers: the spiked report against the median before it
    pts = {p["step"]: p["loss"] for p in ftctl_json(seen, "metrics", "1", "--json")["points"]}
    before = sorted(pts[s] for s in a["compared"])
    assert a["value"] == pts[SPIKE_STEP] and a["value"] > 3 * a["baseline"]
    assert a["compared"] == list(range(SPIKE_STEP - 10, SPIKE_STEP))
    mid = len(before) // 2
    assert a["baseline"] == pytest.approx((before[mid - 1] + before[mid]) / 2)
    assert f"loss spike at step {SPIKE_STEP}" in a["text"]
    markers = ftctl_json(seen, "metrics", "1", "--json")["jobs"][0]["markers"]
    assert [m["step"] for m in markers if m["kind"] == "alert"] == [SPIKE_STEP]
    s = status(seen, "0001")
    assert s["state"] == "completed" and [x["kind"] for x in s["alerts"]] == ["loss_spike"]


def test_the_alert_reaches_a_real_http_target(spiked):
    _, server, _, server_b, _ = spiked
    got = [p for p in server.posts if p["event"] == "training_alert"]
    assert len(got) == 1 and got[0]["data"]["step"] == SPIKE_STEP
    assert got[0]["title"] == f"job 0001: loss spike at step {SPIKE_STEP}"
    assert "paused" not in [p["event"] for p in server.posts]  # on_spike: record only records
    events = [p["event"] for p in server_b.posts]
    assert events.index("training_alert") < events.index(
        "paused"
    )  # the pausing run: both, in order


def test_on_spike_pause_pauses_through_the_pause_path_and_loses_nothing(spiked):
    seen, _, paused, _, at_pause = spiked
    assert at_pause["state"] == "paused", at_pause
    # it stops where the pause reached it: at the latest at the step it is held at, as `ftctl pause`
    stopped = at_pause["step"]
    assert SPIKE_STEP <= stopped <= HANG_STEP
    assert (
        at_pause["reason"]
        == f"paused by the loss-spike alert at step {SPIKE_STEP} at step {stopped}"
    )
    assert [c["step"] for c in at_pause["checkpoints"]][-1] == stopped  # checkpointed there
    (a,) = _alerts(paused)  # the resumed attempt does not alert (or pause) again for the same spike
    assert a["action"] == "pause" and a["step"] == SPIKE_STEP
    kinds = [e["type"] for e in history(paused)]
    assert kinds.count("control_requested") == 1 and kinds.count("paused") == 1
    done, ref = status(paused, "0001"), status(seen, "0001")
    assert done["state"] == "completed" and done["crashes"] == []
    assert done["adapter_sha256"] == ref["adapter_sha256"]  # bit-exact with the run never paused


def test_a_spike_in_the_last_report_is_recorded_before_the_completion_and_pauses_nothing(
    tmp_path_factory, demo
):
    """The watch looks at the curve every 2 s and once more at the end: the last reports' findings are
    recorded before `completed` (not after it, as if the finished job were still watched), and a spike
    in the very last step is recorded, not acted on — with on_spike: pause there is nothing left to
    pause, and the job completes (exit 0)."""
    text, _ = _marker(demo, 24)
    env = {"FTCTL_POISON": text, "FTCTL_POISON_SCALE": SCALE}
    home, server, p = _run(tmp_path_factory, demo, "last", "pause", env)
    server.close()
    kinds = [e["type"] for e in history(home) if e["stream"] == "job:0001"]
    (a,) = _alerts(home)
    assert a["step"] == 24 and a["action"] == "recorded" and "pausing" not in a["text"]
    assert kinds[-1] == "completed" and kinds.index("training_alert") < kinds.index("completed")
    assert "paused" not in kinds and "control_requested" not in kinds
