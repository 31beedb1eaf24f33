"""Consolidation: fuse the adapter into a new base without ever losing either."""

from __future__ import annotations

import json
import signal
from datetime import datetime
from pathlib import Path

import pytest
from helpers import crash_env, daemon, ftctl, history, make_workspace, sha256_file, status

SMALL = {"iters": 10, "save_every": 5, "steps_per_eval": 5}


def _trained(tmp_path, demo, name="ws", jobs=1, **overrides):
    home = make_workspace(tmp_path / name, demo.model_dir, **{**SMALL, **overrides})
    for i in range(jobs):
        ftctl(
            home,
            "submit",
            str(demo.train),
            "--valid",
            str(demo.valid),
            "--name",
            f"j{i + 1}",
            "--again",
        )
    ftctl(home, "start", "--until-idle", "--quiet")
    return home


def _lineage(home):
    return status(home)["lineages"][0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo):
    return _trained(tmp_path_factory.mktemp("trained"), demo)


def test_fused_model_equals_base_plus_adapter_and_loads(trained, demo, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    from ftctl.adapters import fuse

    s = status(trained, "0001")
    fused = fuse.fuse(demo.model_dir, s["adapter_path"], tmp_path, 1)
    assert fused.path == tmp_path / "v0001" and fused.max_abs_diff < 1e-3
    assert fuse.verify_model_dir(fused.path) == fused.weights_sha256
    a, _ = load(str(demo.model_dir), adapter_path=s["adapter_path"])
    b, _ = load(str(fused.path))
    x = mx.array([[3, 7, 11, 19, 23]])
    assert mx.allclose(a(x), b(x), atol=1e-4).item()
    assert not list(tmp_path.glob(".tmp*"))
    (fused.path / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(fuse.ModelCorrupt, match="does not match"):
        fuse.verify_model_dir(fused.path)


def test_locked_config_refused_unlocked_applies_and_no_consolidation_under_a_job(trained, demo):
    home = trained
    for bad in (
        "lora_parameters.rank=8",
        "num_layers=1",
        "fine_tune_type=dora",
        "lora_parameters.keys=[self_attn.q_proj]",
    ):
        p = ftctl(home, "submit", str(demo.train), "--set", bad, check=False)
        assert p.returncode == 1, bad
        err = " ".join(p.stderr.split())
        assert (
            "not consolidated yet (job 0001" in err
            and "nothing was queued" in err
            and "ftctl consolidate" in err
        )
        assert "--lineage NAME" in err
    p = ftctl(home, "submit", str(demo.train), "--set", "model=/elsewhere", check=False)
    assert p.returncode == 1 and "new lineage" in p.stderr
    ftctl(home, "submit", str(demo.train), "--set", "learning_rate=1e-4")  # not locked
    # explicit new lineage
    ftctl(home, "submit", str(demo.train), "--set", "lora_parameters.rank=8", "--lineage", "other")
    assert [j["state"] for j in status(home)["jobs"]] == ["completed", "queued", "queued"]
    p = ftctl(home, "consolidate", check=False)
    assert p.returncode == 1 and "not finished: 0002 (queued)" in " ".join(p.stderr.split())
    assert _lineage(home)["base_version"] == 0 and not list((home / "models").iterdir())


def _killed_consolidation(home, tmp_path, point: str, version: int) -> None:
    adapter = status(home)["lineages"][0]["head_job"]
    sha = status(home, adapter)["adapter_sha256"]
    p = ftctl(home, "consolidate", env=crash_env(tmp_path, f"{point}:{version}"), check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    # abort, promote or finish retiring
    assert json.loads(ftctl(home, "recover", "--json").stdout)["repairs"]
    assert _lineage(home)["state"] == "idle"
    # never neither
    assert sha256_file(f"{status(home, adapter)['adapter_path']}/adapters.safetensors") == sha
    assert not list((home / "models").glob(".tmp*"))
    assert json.loads(ftctl(home, "recover", "--dry-run", "--json").stdout)["repairs"] == []


def test_kill_matrix_over_consolidation(tmp_path, demo):
    """Kill `ftctl consolidate` at each point, recover: exactly one of the two good end states."""
    from ftctl.adapters.fuse import verify_model_dir

    home = _trained(tmp_path, demo, consolidation={"schedule": None, "keep_models": 1})
    for point in (
        "consolidate_mid_fuse",
        "consolidate_mid_write",
    ):  # before the commit: old base + adapter
        _killed_consolidation(home, tmp_path, point, 1)
        lin = _lineage(home)
        assert lin["base_version"] == 0 and lin["head_job"] == "0001", point
        assert not (home / "models" / "v0001").exists() and status(home, "0001")["checkpoints"]
    # whole model, no event: promoted
    _killed_consolidation(home, tmp_path, "consolidate_after_rename", 1)
    assert _lineage(home)["base_version"] == 1
    verify_model_dir(home / "models" / "v0001")
    assert status(home, "0001")["checkpoints"] == []  # retired only after base_promoted
    # a fresh adapter on the new base (the locked key may change now), then die after the commit
    ftctl(
        home,
        "submit",
        str(demo.train),
        "--valid",
        str(demo.valid),
        "--set",
        "lora_parameters.rank=8",
    )
    ftctl(home, "start", "--until-idle", "--quiet")
    started = [
        e["data"]
        for e in history(home)
        if e["type"] == "training_started" and e["data"]["job"] == "0002"
    ]
    assert (
        started[0]["base_model"] == "models/v0001"  # recorded relative to the workspace
        and started[0].get("warm_start_from") is None
    )
    _killed_consolidation(home, tmp_path, "consolidate_after_event", 2)
    lin = _lineage(home)
    assert lin["base_version"] == 2 and lin["head_job"] is None
    verify_model_dir(home / "models" / "v0002")
    assert status(home, "0002")["checkpoints"] == []
    # fused-model retention (keep_models=1) runs after the next promotion: v1 and v2 go, as events
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    ftctl(home, "start", "--until-idle", "--quiet")
    out = " ".join(ftctl(home, "consolidate").stdout.split())
    assert (
        "job 0003: prune 2 checkpoint(s) (consolidated into base v3; its final adapter stays" in out
    ), out
    removed = [e["data"]["version"] for e in history(home) if e["type"] == "model_removed"]
    assert removed == [1, 2] and sorted(p.name for p in (home / "models").iterdir()) == ["v0003"]


def test_scheduled_consolidation_waits_for_idle(tmp_path, demo):
    home = _trained(tmp_path, demo, jobs=2, consolidation={"schedule": "00:00", "keep_models": 2})
    evs = history(home)
    seq = {(e["type"], e["data"].get("job")): e["seq"] for e in evs}
    started = seq[("consolidation_started", None)]
    assert started > seq[("completed", "0002")]  # never under a job, and it ran once idle
    assert _lineage(home)["base_version"] == 1
    # once a day: a new start the same day does not consolidate again
    ftctl(home, "start", "--until-idle", "--quiet")
    assert [e["type"] for e in history(home)].count("consolidation_started") == 1


def test_due_once_a_day():
    from ftctl.control.consolidation import due

    now = datetime(2026, 11, 23, 3, 30)
    assert due("03:00", "", now) and not due("04:00", "", now) and not due(None, "", now)
    last = (
        datetime(2026, 11, 23, 3, 5).astimezone().astimezone(tz=__import__("datetime").timezone.utc)
    )
    stamp = last.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert not due("03:00", stamp, now)
    assert due("03:00", stamp, datetime(2026, 11, 24, 3, 1))


def test_a_job_resumed_after_a_newer_one_completed_becomes_a_branch_and_set_head_chooses(
    tmp_path, demo
):
    """0002 and 0003 both warm-start from 0001's adapter; 0002 is paused mid-run, 0003 completes
    and becomes the head; 0002 resumed and completed must not silently replace 0003 (whose
    training would leave the lineage): it is recorded as a branch, visibly, until the user
    chooses it with `ftctl lineage set-head`."""
    from helpers import wait_for

    home = _trained(tmp_path, demo)  # job 0001: the head
    for name in ("j2", "j3"):
        ftctl(
            home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", name, "--again"
        )
    marker = tmp_path / "marker-hang-13"  # global step 13: job 0002's third step (it starts at 10)
    d = daemon(home, "--until-idle", env={"FTCTL_HANG_AT": f"mid_step:13:{marker}"})
    try:
        wait_for(lambda: marker.exists() or d.poll() is not None, timeout=180, every=0.02)
        assert marker.exists(), d.communicate()
        ftctl(home, "pause", "0002")
        assert d.wait(timeout=180) == 1  # --until-idle: 0003 completed, 0002 is paused
    finally:
        if d.poll() is None:
            d.kill()
    assert _lineage(home)["head_job"] == "0003"
    ftctl(home, "resume", "0002")
    ftctl(home, "start", "--until-idle", "--quiet")
    lin = _lineage(home)
    assert lin["head_job"] == "0003" and lin["branches"] == ["0002"], lin
    j2 = status(home, "0002")
    assert (
        j2["state"] == "completed"
        and "a branch" in j2["reason"]
        and "ftctl lineage set-head 0002" in j2["reason"]
    )
    started = [
        e["data"]
        for e in history(home)
        if e["type"] == "training_started" and e["data"]["job"] == "0002"
    ]
    # every attempt continued from 0001's adapter
    assert {s["parent_job"] for s in started} == {"0001"}

    out = ftctl(home, "lineage", "set-head", "0002").stdout
    assert "job 0002 is now the head of lineage main (was job 0003, now a branch)" in " ".join(
        out.split()
    )
    lin = _lineage(home)
    assert (
        lin["head_job"] == "0002"
        and lin["branches"] == ["0003"]
        and status(home, "0002")["reason"] is None
    )
    p = ftctl(home, "lineage", "set-head", "0002", check=False)
    assert p.returncode == 1 and "already the head" in p.stderr
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "j4", "--again")
    ftctl(home, "start", "--until-idle", "--quiet")
    (s4,) = [
        e["data"]
        for e in history(home)
        if e["type"] == "training_started" and e["data"]["job"] == "0004"
    ]
    assert s4["parent_job"] == "0002" and s4["warm_start_from"].startswith("jobs/0002/")
    assert _lineage(home)["head_job"] == "0004"


def test_a_full_fine_tune_is_evaluated_reproduced_warm_started_and_promoted_as_it_is(
    tmp_path, demo, capsys
):
    """fine_tune_type: full through the lineage: job 1 (killed at step 7, resumed) publishes its
    trained layers in mlx-lm's layout; `ftctl reproduce --until-crash` replays it past the crash
    to its end and writes the same full checkpoint bit for bit; `ftctl eval` scores base + trained
    layers; job 2 warm-starts from the checkpoint job 1 published; consolidation promotes base +
    job 2's weights (nothing to fuse: every trained tensor is in models/v0001 bit for bit, the
    logits are base + adapter's exactly), and the lineage's next jobs train it."""
    import mlx.core as mx
    from helpers import run, tensor_sha256s
    from mlx_lm import load

    home = make_workspace(tmp_path / "ws", demo.model_dir, fine_tune_type="full", **SMALL)
    for name in ("j1", "j2"):
        ftctl(
            home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", name, "--again"
        )
    ftctl(home, "start", "--until-idle", "--quiet", env=crash_env(tmp_path, "mid_step:7"))
    j1, j2 = status(home, "0001"), status(home, "0002")
    cfg = json.loads((tmp_path / "ws/jobs/0001/adapters/adapter_config.json").read_text())
    assert (cfg["fine_tune_type"], cfg["lora_parameters"]) == ("full", None)
    assert j1["crashes"] and j1["state"] == j2["state"] == "completed"
    code, out, err = run(capsys, "reproduce", "1", "--until-crash", "--home", home)
    assert code == 0 and "NOT REPRODUCED" in out, err
    e = [e["data"] for e in history(home) if e["type"] == "crash_reproduced"][-1]
    assert 10 in e["bit_exact"] and not e.get("mismatch")  # its full checkpoint 10 = the job's
    code, out, err = run(capsys, "eval", "1", "--home", home)
    assert code == 0 and "base + trained layers (full fine-tune) of job 0001" in out, err
    ev1 = [e["data"] for e in history(home) if e["type"] == "adapter_evaluated"][-1]
    assert ev1["adapter_loss"] < ev1["base_loss"]
    start2 = [
        e["data"]
        for e in history(home)
        if e["type"] == "training_started" and e["data"]["job"] == "0002"
    ][0]
    # the journal records it relative to the workspace, status shows it absolute
    assert home / start2["warm_start_from"] == Path(j1["result_checkpoint"])
    assert start2["parent_job"] == "0001"
    out = " ".join(ftctl(home, "consolidate").stdout.split())
    assert "promoting job 0002's full fine-tune" in out and "nothing to fuse" in out, out
    model_dir = home / "models" / "v0001"
    weights = tensor_sha256s(model_dir / "model.safetensors")
    trained = tensor_sha256s(j2["adapter_path"])
    assert trained and all(weights[k] == h for k, h in trained.items())
    a, _ = load(str(demo.model_dir), adapter_path=j2["adapter_path"])
    b, _ = load(str(model_dir))
    x = mx.array([[3, 7, 11, 19, 23]])
    assert mx.array_equal(a(x), b(x)).item()
    assert _lineage(home)["base_model"] == str(model_dir)  # what the lineage's next job trains


def test_consolidation_keeps_a_cancelled_jobs_checkpoints_and_every_prune_message_is_true(
    tmp_path, demo
):
    """The issue's case: a job cancelled mid-run has no final adapter, so its checkpoints are all
    that is left of its training: consolidation keeps them (and says so); it prunes a completed job's
    checkpoints only after checking that its final adapter is where the message says, intact."""
    from helpers import wait_for

    home = _trained(tmp_path, demo)  # job 0001: completed, the head
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "j2", "--again")
    marker = tmp_path / "marker-hang-17"  # global step 17: job 0002's step 7, past its checkpoint 5
    d = daemon(home, env={"FTCTL_HANG_AT": f"mid_step:17:{marker}"})
    try:
        wait_for(lambda: marker.exists() or d.poll() is not None, timeout=180, every=0.02)
        assert marker.exists(), d.communicate()
        out = " ".join(ftctl(home, "cancel", "0002").stdout.split())
        wait_for(lambda: status(home, "0002")["state"] == "cancelled", timeout=120)
        ftctl(home, "shutdown", "--wait", "60")
    finally:
        if d.poll() is None:
            d.kill()
    j2 = status(home, "0002")
    kept = [c["path"] for c in j2["checkpoints"]]
    assert kept and all(Path(c).is_dir() for c in kept), j2
    out = " ".join(ftctl(home, "consolidate").stdout.split())
    assert (
        "job 0001: prune 2 checkpoint(s) (consolidated into base v1; its final adapter stays in "
        "jobs/0001/adapters/ (sha256 checked))" in out
    ), out
    assert (home / "jobs/0001/adapters/adapters.safetensors").is_file()
    assert "job 0002 (cancelled): its 1 checkpoint(s) are kept" in out, out
    assert "0002: prune" not in out
    assert [c["path"] for c in status(home, "0002")["checkpoints"]] == kept
    assert not any(
        e["type"] == "checkpoint_pruned" and e["data"]["job"] == "0002" for e in history(home)
    )
    ftctl(home, "doctor", "--fix", check=False)  # its own retention (keep_last 3) keeps it too
    assert all(Path(p).is_dir() for p in kept)


def test_a_fresh_job_completing_after_a_newer_head_is_a_branch_not_the_head(tmp_path, demo):
    """The issue's case: 0001 paused mid-run; 0002 started fresh and paused too; 0001 resumed and
    completed: the head. 0002 completed later: it did not continue from 0001 and started before 0001
    was the head, so it must not silently replace it — it is recorded a branch (its completion says
    so), `status` shows the head and the branch, and 0003 warm-starts from the head, 0001."""
    from helpers import wait_for

    home = make_workspace(tmp_path / "ws", demo.model_dir, **SMALL)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "j1")
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "j2", "--fresh")
    m1, m2 = tmp_path / "hang-1", tmp_path / "hang-2"  # each job stands still after its step 3
    d = daemon(home, "--until-idle", env={"FTCTL_HANG_AT": f"mid_step:3:{m1},mid_step:3:{m2}"})
    try:
        for marker, job in ((m1, "0001"), (m2, "0002")):
            wait_for(lambda m=marker: m.exists() or d.poll() is not None, timeout=180, every=0.02)
            assert marker.exists(), d.communicate()
            ftctl(home, "pause", job)
        assert d.wait(timeout=180) == 1  # --until-idle: both paused
    finally:
        if d.poll() is None:
            d.kill()
    assert [status(home, j)["state"] for j in ("0001", "0002")] == ["paused", "paused"]
    ftctl(home, "resume", "0001")
    ftctl(home, "resume", "0002")
    ftctl(home, "start", "--until-idle", "--quiet")  # 0001 completes first, then 0002
    lin = _lineage(home)
    assert lin["head_job"] == "0001" and lin["branches"] == ["0002"], lin
    (done,) = [
        e["data"] for e in history(home) if e["type"] == "completed" and e["data"]["job"] == "0002"
    ]
    assert done["branch"].startswith("a branch: it started fresh") and "0001" in done["branch"]
    j2 = status(home, "0002")
    assert j2["state"] == "completed" and "ftctl lineage set-head 0002" in j2["reason"]
    text = " ".join(ftctl(home, "status").stdout.split())
    assert "lineage main (original base): head job 0001; branches: 0002" in text, text
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "j3", "--again")
    ftctl(home, "start", "--until-idle", "--quiet")
    (s3,) = [
        e["data"]
        for e in history(home)
        if e["type"] == "training_started" and e["data"]["job"] == "0003"
    ]
    assert s3["parent_job"] == "0001" and s3["warm_start_from"].startswith("jobs/0001/")
    assert _lineage(home)["head_job"] == "0003"  # it continued from the head: the next head


def test_branch_reason_is_decided_from_what_the_job_continued(tmp_path):
    """Pure: who becomes the head when a job completes."""
    from ftctl.core.state import JobState, LineageState, branch_reason

    lin = LineageState(name="main", head_job="0004", head_seq=50)
    assert branch_reason(JobState(job="0005", parent_job="0004", started_seq=60), lin) == ""
    assert "warm-started from job 0003" in branch_reason(
        JobState(job="0005", parent_job="0003", started_seq=60), lin
    )
    # fresh: the head it knew when it started (a chosen restart), or one that came later (a branch)
    assert branch_reason(JobState(job="0005", started_seq=60), lin) == ""
    assert "started fresh" in branch_reason(JobState(job="0005", started_seq=40), lin)
    assert branch_reason(JobState(job="0005", started_seq=40), LineageState(name="main")) == ""
