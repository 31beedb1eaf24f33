"""Data-parallel jobs (config `distributed`): 2 ranks on loopback with MLX's ring backend, started by
mlx.launch and supervised by the daemon. Real processes, the tiny demo model, few steps."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    RUNS,
    crash_env,
    daemon,
    finished,
    ftctl,
    ftctl_json,
    history,
    kinds,
    make_workspace,
    running,
    stray_workers,
    training_data,
    wait_for,
)

from ftctl.events.types import PAIR_FIELDS

TWO = {"hosts": ["127.0.0.1"], "processes_per_host": 2}
# small: 12 steps, checkpoints every 4, dropout off (so one process on the same global batch can be compared)
SMALL = {
    "iters": 12,
    "save_every": 4,
    "steps_per_report": 2,
    "steps_per_eval": 12,
    "val_batches": 1,
    "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": None},
    "lr_schedule": {
        "name": "cosine_decay",
        "warmup": 2,
        "warmup_init": 1e-5,
        "arguments": [5e-4, 10, 1e-5],
    },
}


def _train(home: Path, demo, env: dict | None = None, **cfg) -> dict:
    make_workspace(home, demo.model_dir, **{**SMALL, **cfg})
    train, valid = training_data(demo, cfg)  # preference pairs for dpo
    ftctl(home, "submit", str(train), "--valid", str(valid))
    ftctl(home, "start", "--until-idle", "--quiet", env=env, timeout=600)
    return finished(home)


def _points(home: Path) -> list[dict]:
    from ftctl.adapters.workspace import Workspace

    with Workspace(home).open_journal() as j:
        return j.recent_metrics("0001", limit=1000)


def _evaluated(home: Path) -> list[dict]:
    return [e["data"] for e in history(home) if e["type"] == "evaluated"]


def _two_ranks(tmp_path_factory, demo, run: str) -> dict:
    """An uninterrupted 2-rank job of helpers.RUNS[run]: its status."""
    return _train(tmp_path_factory.mktemp(f"dist-{run}") / "ws", demo, distributed=TWO, **RUNS[run])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, demo) -> dict:
    return _two_ranks(tmp_path_factory, demo, "lora")


@pytest.fixture(scope="module")
def two_ranks_full(tmp_path_factory, demo) -> dict:
    return _two_ranks(tmp_path_factory, demo, "full")


@pytest.fixture(scope="module")
def two_ranks_dpo(tmp_path_factory, demo) -> dict:
    """DPO on the demo's pairs: a rank's share of a batch is whole pairs, its loss a mean per pair."""
    return _two_ranks(tmp_path_factory, demo, "dpo")


UNINTERRUPTED = {"lora": "two_ranks", "full": "two_ranks_full", "dpo": "two_ranks_dpo"}


def _close(a: float | None, b: float | None) -> bool:
    """Equal up to float summation order (1e-3 relative; near 0, 1e-5 absolute)."""
    if a is None or b is None:
        return a is b
    return abs(a - b) <= max(1e-3 * abs(b), 1e-5)


@pytest.mark.parametrize("run", ["lora", "dpo"])
def test_two_ranks_complete_and_match_one_process_on_the_same_global_batch(
    request, tmp_path, demo, run
):
    two_ranks = request.getfixturevalue(UNINTERRUPTED[run])
    home = Path(two_ranks["adapter_path"]).parents[2]
    started = [e["data"] for e in history(home) if e["type"] == "training_started"]
    assert [(s["world_size"], s["hosts"], s["backend"]) for s in started] == [
        (2, ["127.0.0.1", "127.0.0.1"], "ring")
    ]
    reported = [e["data"] for e in history(home) if e["type"] == "ranks_reported"]
    assert reported and all(
        len(r["tokens_per_s"]) == 2 and all(t and t > 0 for t in r["tokens_per_s"])
        for r in reported
    )
    assert two_ranks["world_size"] == 2 and len(two_ranks["rank_tokens_per_s"]) == 2
    # `ftctl metrics` carries each rank's tokens/s on the points the daemon journalled them for
    points = ftctl_json(home, "metrics", "1")["points"]
    per_rank = {p["step"]: p["rank_tokens_per_s"] for p in points if p["rank_tokens_per_s"]}
    assert per_rank == {r["step"]: r["tokens_per_s"] for r in reported}, (per_rank, reported)
    csv_rows = ftctl(home, "metrics", "1", "--csv").stdout.splitlines()
    assert "rank_tokens_per_s" in csv_rows[0].split(",") and any(";" in row for row in csv_rows[1:])
    assert " tok/s" in ftctl(home, "metrics", "1").stdout.split("ranks ", 1)[1]
    # one process, the same config without `distributed`: the same global batches, so the same losses
    # (up to float summation order) — the shards are complementary, not duplicated. DPO: each rank's
    # loss is a mean over its pairs, so the pair figures of every report and of the validation pairs
    # match too (rank 1 holds no validation batch here: one batch of 2 pairs)
    one = _train(tmp_path / "one", demo, **RUNS[run])
    fields = ("loss", *PAIR_FIELDS) if run == "dpo" else ("loss",)
    two_p, one_p = _points(home), _points(tmp_path / "one")
    assert [p["step"] for p in two_p] == [p["step"] for p in one_p] == list(range(2, 13, 2))
    for a, b in zip(two_p, one_p):
        assert all(_close(a[k], b[k]) for k in fields), (two_p, one_p)
    two_e, one_e = _evaluated(home), _evaluated(tmp_path / "one")
    assert [e["step"] for e in two_e] == [e["step"] for e in one_e] == [0, 12]
    for a, b in zip(two_e, one_e):
        assert _close(a["val_loss"], b["val_loss"]), (two_e, one_e)
        if run == "dpo":
            assert all(_close(a["preference"][k], b["preference"][k]) for k in PAIR_FIELDS)
        else:
            assert a.get("preference") is None
    if run == "dpo":  # and it learns: the chosen answer pulls ahead
        assert two_e[-1]["preference"]["reward_margin"] > 0
    assert two_ranks["adapter_sha256"] != one["adapter_sha256"]  # a different run, not a copy


@pytest.mark.parametrize("run", list(RUNS))
def test_sigkill_of_rank_1_kills_the_group_and_resumes_bit_exact(request, tmp_path, demo, run):
    two_ranks = request.getfixturevalue(UNINTERRUPTED[run])
    home, at = (
        tmp_path / "ws",
        random.randint(1, SMALL["iters"]),
    )  # any step: the resume must be bit-exact from all
    env = crash_env(tmp_path, f"mid_step@1:{at}")
    s = _train(home, demo, env=env, distributed=TWO, **RUNS[run])
    crashes = ftctl_json(home, "crashes")
    assert len(crashes) == 1, at
    c = crashes[0]
    assert (c["rank"], c["category"], c["step"]) == (1, "killed", at), c
    assert c["host"] == os.uname().nodename
    torn = re.search(r"torn down (\d+) ms after", c["evidence"])
    assert torn and int(torn.group(1)) < 1000, c["evidence"]
    assert kinds(home, "0001").count("training_started") == 2 and stray_workers(home) == []
    # bit-exact with the uninterrupted 2-rank run
    assert s["adapter_sha256"] == two_ranks["adapter_sha256"]
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.dashboard import Viewer

    viewer = Viewer(Workspace(home))  # the status page's crash timeline names the rank too
    try:
        (crash,) = viewer.crashes()
        job = viewer.job("0001")
    finally:
        viewer.close()
    assert (crash.event.rank, crash.event.host) == (1, os.uname().nodename)
    assert job.world_size == 2 and len(job.rank_tokens_per_s) == 2


def _rank_pids(home: Path) -> dict[int, int]:
    """rank -> pid of the workspace's live ranks (mlx.launch, whose command line names the worker too, excluded)."""
    out = {}
    for pid in stray_workers(home):
        try:
            rank = psutil.Process(pid).environ().get("MLX_RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            out[int(rank)] = pid
    return out


def test_a_stopped_rank_is_caught_by_the_watchdog_and_no_rank_outlives_a_killed_daemon(
    tmp_path, demo
):
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        **{**SMALL, "iters": 400, "save_every": 20},
        distributed=TWO,
        timeouts={"hang_s": 6.0, "eval_hang_s": 120.0, "stop_s": 60.0},
    )
    ftctl(home, "submit", str(demo.train))
    d = daemon(home)
    try:
        first = wait_for(
            lambda: (
                (p := _rank_pids(home)).keys() == {0, 1} and "ranks_reported" in kinds(home) and p
            )
        )
        os.kill(first[1], signal.SIGSTOP)
        c = wait_for(lambda: ftctl_json(home, "crashes"), timeout=60)[0]
        assert (c["category"], c["rank"]) == ("hang", 1), c
        assert "stopped by a signal" in c["evidence"]
        wait_for(lambda: not any(map(running, first.values())), timeout=5)
        # restarted from its last checkpoint; then the daemon is SIGKILLed: no rank may be left
        again = wait_for(
            lambda: (
                (p := _rank_pids(home)).keys() == {0, 1}
                and set(p.values()).isdisjoint(first.values())
                and p
            ),
            timeout=120,
        )
        time.sleep(1.0)
        d.kill()
        d.wait()
        # a rank on its way out has already lost its command line (so it is no stray worker) but is not a
        # zombie yet: wait for both, within the same bound
        wait_for(
            lambda: stray_workers(home) == [] and not any(map(running, again.values())),
            timeout=5,
            every=0.05,
        )
    finally:
        if d.poll() is None:
            d.kill()
        for pid in stray_workers(home):
            os.kill(pid, signal.SIGKILL)


def test_a_world_size_change_is_refused_without_reshard(tmp_path, demo):
    from ftctl.control.supervise import world_size_refusal
    from ftctl.core.state import JobState
    from ftctl.events.types import CheckpointRecord

    j = JobState(
        job="0001",
        world_size=2,
        checkpoints=[
            CheckpointRecord(step=4, global_step=4, path="c", manifest_sha256="x", bytes=1)
        ],
    )
    why = world_size_refusal(j, 4)
    assert (
        "trained on 2 rank(s)" in why
        and "ftctl retry 0001 --reshard" in why
        and "not bit-exact" in why
    )
    assert world_size_refusal(j, 2) is None
    j.reshard = True
    assert world_size_refusal(j, 4) is None


def test_submit_refuses_a_distributed_config_that_cannot_run(tmp_path, demo):
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        distributed={"hosts": ["127.0.0.1"], "processes_per_host": 2},
    )
    p = ftctl(home, "submit", str(demo.train), "--set", "batch_size=3", check=False)
    assert p.returncode == 1 and "batch_size = 3" in p.stderr and "world size 2" in p.stderr, (
        p.stderr
    )
    assert "Traceback" not in p.stderr
    (tmp_path / "hosts.json").write_text("{not json")
    home2 = make_workspace(
        tmp_path / "ws2", demo.model_dir, distributed={"hostfile": str(tmp_path / "hosts.json")}
    )
    p = ftctl(home2, "submit", str(demo.train), check=False)
    assert (
        p.returncode == 1 and "hostfile" in p.stderr and "nothing was queued" in p.stderr.lower()
    ), p.stderr
    home3 = make_workspace(
        tmp_path / "ws3", demo.model_dir, distributed={"hosts": ["mac-a", "mac-b"]}
    )
    p = ftctl(home3, "submit", str(demo.train), check=False)
    assert p.returncode == 1 and "not an IP address" in p.stderr, p.stderr


def test_rank_shards_are_complementary_and_seeds_distinct():
    from ftctl.adapters.batches import TrainBatches
    from ftctl.adapters.trainer import step_seed

    items = [([1] * (3 + i % 7), 0) for i in range(40)]
    b = TrainBatches(items, 4, 64, seed=5)
    for n in range(12):
        whole = b.indices(n)
        shards = [whole[r::2] for r in range(2)]
        assert sorted(shards[0] + shards[1]) == sorted(whole) and not set(shards[0]) & set(
            shards[1]
        )
    assert step_seed(5, 3) == step_seed(5, 3, 0) != step_seed(5, 3, 1) != step_seed(5, 3, 2)


def test_reshard_after_the_hosts_changed(tmp_path, demo):
    """2 ranks checkpoint and fail; the hostfile now lists one host: refused (world_size) until
    `retry --reshard`, which resumes the 2-rank checkpoint on 1 rank and records the change."""
    import json

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    home = make_workspace(
        tmp_path / "ws",
        demo.model_dir,
        **SMALL,
        distributed={"hostfile": str(hosts)},
        restart={"max_restarts": 0, "window_s": 300.0, "backoff_s": 0.05, "backoff_max_s": 0.2},
    )
    ftctl(home, "submit", str(demo.train))
    p = ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env=crash_env(tmp_path, "mid_step@1:6"),
        check=False,
        timeout=600,
    )
    assert p.returncode == 1 and ftctl_json(home, "status", "0001")["state"] == "failed"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    ftctl(home, "retry", "0001")
    p = ftctl(home, "start", "--until-idle", check=False, timeout=600)
    s = ftctl_json(home, "status", "0001")
    assert (
        s["state"] == "failed"
        and "trained on 2 rank(s)" in s["reason"]
        and "--reshard" in s["reason"]
    ), s
    assert kinds(home, "0001").count("training_started") == 1  # nothing was started
    out = ftctl(home, "retry", "0001", "--reshard").stdout
    assert "not bit-exact" in out
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)
    s = finished(home)
    last = [e["data"] for e in history(home) if e["type"] == "training_started"][-1]
    assert (last.get("world_size", 1), last["resharded_from"], last["resume_step"]) == (1, 2, 4)
    assert s["resharded"] == ["2 -> 1 ranks at step 4"]
    assert "trained on 2 rank(s)" in p.stderr
    assert [e["data"].get("category") for e in history(home) if e["type"] == "failed"][
        -1
    ] == "world_size"
