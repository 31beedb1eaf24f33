"""Seeing the training: `ftctl metrics`/`plot`/`export-tb`, and `ftctl serve`'s page through its API
and in a real (headless Chromium) browser.

One workspace, trained once for the module: job 0001 finished; job 0002 warm-started from it and
SIGKILLed at its step 17 (checkpoint at 10, a report at 15 the resume supersedes), resumed and
finished; job 0003 training, its worker standing still after step 12 under a live daemon. The
last test SIGKILLs the daemon and looks for the dead-daemon banner.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    crash_env,
    daemon,
    ftctl,
    ftctl_json,
    make_workspace,
    run,
    status,
    stray_workers,
    wait_for,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# a path: the browser test saves its screenshot there too
SCREENSHOT = os.environ.get("FTCTL_SCREENSHOT")


@pytest.fixture(scope="module")
def three(tmp_path_factory, demo):
    tmp = tmp_path_factory.mktemp("view")
    home = make_workspace(
        tmp / "ws",
        demo.model_dir,
        save_every=10,
        metrics={"tensorboard": True},
        standby=False,
        timeouts={"hang_s": 900.0, "eval_hang_s": 900.0, "stop_s": 60.0},
        # tokens/s on a shared 2-core machine drop with the load, not the run: no throughput alert
        # (an alert marker the curves' markers would then show); test_alerts tests that watch
        alerts={"throughput_factor": None},
    )  # job 0003 hangs on purpose
    for name in ("first", "second", "third"):
        ftctl(
            home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", name, "--again"
        )
    marker = tmp / "hang-marker"
    env = {**crash_env(tmp, "mid_step:57"), "FTCTL_HANG_AT": f"mid_step:92:{marker}"}
    # the page beside the daemon, too
    d = daemon(home, "--serve", "--port", str(_free_port()), env=env)
    d.port = int(d.args[d.args.index("--port") + 1])
    try:
        wait_for(
            lambda: (
                marker.exists()
                and status(home, "0003")["state"] == "training"
                and (status(home, "0003")["last_report"] or {}).get("step") == 10
            ),
            timeout=400,
            every=0.5,
        )
        yield home, d
    finally:
        if d.poll() is None:
            d.kill()
        d.wait()
        ftctl(home, "recover", check=False)  # stops the orphan (hung) worker
        for pid in stray_workers(home):
            os.kill(pid, signal.SIGKILL)


def _metrics(home, *args):
    return ftctl_json(home, "metrics", *args)


# --------------------------------------------------------------------------- metrics, plot, TensorBoard


def test_metrics_effective_curve_and_superseded_points(three, capsys):
    home, _ = three
    m = _metrics(home, "2", "--all")
    pts = m["points"]
    gone = [p for p in pts if p["superseded"]]
    assert [(p["attempt"], p["step"], p["global_step"]) for p in gone] == [(1, 15, 55)]
    live = [p for p in pts if not p["superseded"]]
    steps = [p["global_step"] for p in live]
    # lineage-aware, no step twice
    assert steps == sorted(set(steps)) and steps[0] == 40 and steps[-1] == 80
    assert {p["attempt"] for p in live if p["step"] > 10} == {2} and {
        p["attempt"] for p in live if p["step"] <= 10
    } == {1}
    assert [p for p in live if p["step"] == 15][0]["attempt"] == 2
    assert m["jobs"][0]["counts"] == {
        "points": len(pts),
        "effective": len(live),
        "superseded": 1,
        "train": sum(p["loss"] is not None for p in live),
        "val": sum(p["val_loss"] is not None for p in live),
    }
    assert {k["kind"] for k in m["jobs"][0]["markers"]} == {
        "checkpoint",
        "crash",
        "resume",
        "completed",
    }
    # without --all the superseded point is not there; --since and --lineage select
    assert [p["global_step"] for p in _metrics(home, "2")["points"]] == steps
    assert all(p["global_step"] > 60 for p in _metrics(home, "2", "--since", "60")["points"])
    lineage = _metrics(home, "--lineage", "main")["points"]
    assert [p["job"] for p in lineage][:1] == ["0001"] and {p["job"] for p in lineage} == {
        "0001",
        "0002",
        "0003",
    }
    code, out, _ = run(capsys, "metrics", "1", "2", "--csv", "--home", home)
    assert code == 0 and out.splitlines()[0].startswith(
        "job,attempt,global_step,step,loss,val_loss"
    )
    code, out, _ = run(capsys, "metrics", "2", "--all", "--home", home)
    assert code == 0 and out.count("superseded (rewound by a resume)") == 1
    code, _, err = run(capsys, "metrics", "99", "--home", home)
    assert code == 1 and "no job '99'" in err
    code, _, err = run(capsys, "metrics", "--lineage", "nope", "--home", home)
    assert code == 1 and "lineage 'nope' has no jobs" in err


def test_plot_png_and_svg(three, tmp_path, capsys):
    home, _ = three
    code, out, _ = run(
        capsys, "plot", "--lineage", "main", "-o", tmp_path / "l.png", "--home", home
    )
    assert code == 0 and (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, _ = run(capsys, "plot", "2", "-o", tmp_path / "l.svg", "--home", home)
    assert code == 0 and b"<svg" in (tmp_path / "l.svg").read_bytes()[:500]
    code, _, err = run(capsys, "plot", "2", "-o", tmp_path / "l.jpg", "--home", home)
    assert code == 1 and ".png or .svg" in err


def _drawn(monkeypatch):
    """The figure `ftctl plot` saves, kept for the test to look at."""
    from matplotlib.figure import Figure

    figs, save = [], Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return save(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figs


def test_plot_colours_markers_by_job_and_titles_what_it_draws(three, tmp_path, capsys, monkeypatch):
    """Two jobs: whose crash? Each checkpoint, crash and resume mark is in its job's colour; the crash
    is at the crash's step (0002's step 17 = global 57), not its checkpoint's; val loss is dots, not
    a straight line across the train curve; the title says what is drawn, not the workspace path."""
    home, _ = three
    figs = _drawn(monkeypatch)
    code, _, _ = run(capsys, "plot", "1", "2", "-o", tmp_path / "two.png", "--home", home)
    assert code == 0 and len(figs) == 1
    ax = figs[0].axes[0]
    colour = {
        l.get_label().split()[1]: l.get_color()
        for l in ax.lines
        if l.get_label().endswith(": train")
    }
    assert set(colour) == {"0001", "0002"} and colour["0001"] != colour["0002"]
    want = {
        (k["kind"], k["global_step"], job)
        for job in ("0001", "0002")
        for k in _metrics(home, job)["jobs"][0]["markers"]
        if k["kind"] in ("checkpoint", "crash", "resume")
    }
    marks = {"|": "checkpoint", "x": "crash", "^": "resume"}
    drawn = {
        (marks[l.get_marker()], int(l.get_xdata()[0]), job)
        for l in ax.lines
        if l.get_marker() in marks and not l.get_label().startswith("job")
        for job, c in colour.items()
        if l.get_color() == c
    }
    assert drawn == want
    assert ("crash", 57, "0002") in drawn and ("resume", 50, "0002") in drawn
    for l in ax.lines:
        if l.get_label().endswith(": val"):
            assert l.get_linestyle() == "None" and l.get_marker() == "o"
    assert [
        a.get_ylabel() for a in figs[0].axes if a.get_ylabel() in ("reward", "pairs ranked right")
    ] == []
    heading = figs[0].texts[0].get_text()
    assert "job 0001 first (completed)" in heading and "job 0002 second (completed)" in heading
    assert ax.get_title(loc="left").startswith(f"workspace {home}")


def test_plot_of_a_job_with_no_points_is_a_user_error_and_writes_nothing(ws, tmp_path, capsys):
    import warnings

    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            )
            for i in range(40)
        )
        + "\n"
    )
    assert run(capsys, "submit", data, "--home", ws)[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" was printed
        code, _, err = run(capsys, "plot", "1", "-o", tmp_path / "empty.png", "--home", ws)
    assert code == 1 and "nothing to plot: no loss was recorded yet for job 0001 (queued)" in err
    assert "no file was written" in err and not (tmp_path / "empty.png").exists()


def test_a_crash_recorded_at_its_checkpoint_is_marked_at_the_last_step_reported(
    ws, tmp_path, capsys
):
    """A dead daemon's crash carried its checkpoint's step (20) while the attempt had reported 23:
    the marker (plot, page) is at 23, the last step the journal saw that attempt run."""
    import time as _time

    from ftctl.control.ledger import Ledger
    from ftctl.control.metrics import series
    from ftctl.core.state import job_stream
    from ftctl.events import types as ev

    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            )
            for i in range(40)
        )
        + "\n"
    )
    assert run(capsys, "submit", data, "--home", ws, "--set", "iters=60")[0] == 0
    ledger = Ledger.open(ws / "journal.db")
    try:
        start = dict(job="0001", worker_pid=1, worker_started_at=_time.time(), base_model="/m")
        ledger.commit(job_stream("0001"), ev.TrainingStarted(attempt=1, **start))
        record = ev.CheckpointRecord(
            step=20,
            global_step=20,
            path="/nowhere/step-00000020",
            manifest_sha256="0" * 64,
            bytes=1,
        )
        ledger.commit(
            job_stream("0001"),
            ev.CheckpointStarted(job="0001", step=20, global_step=20),
            ev.CheckpointCommitted(job="0001", checkpoint=record),
        )
        for step in (20, 23):
            ledger.journal.record_metric(
                "0001",
                ev.Metrics(
                    step=step,
                    global_step=step,
                    loss=2.0,
                    lr=1e-4,
                    tokens_per_s=1.0,
                    peak_mem_gb=0.1,
                    trained_tokens=step,
                ),
            )
        ledger.commit(
            job_stream("0001"),
            ev.Crashed(job="0001", category="daemon_died", step=20, suggestion="x"),
            ev.Requeued(job="0001", reason="r"),
            ev.TrainingStarted(attempt=2, resume_step=20, resume_checkpoint=record.path, **start),
        )
        ledger.journal.record_metric(
            "0001",
            ev.Metrics(
                step=25,
                global_step=25,
                loss=2.0,
                lr=1e-4,
                tokens_per_s=1.0,
                peak_mem_gb=0.1,
                trained_tokens=25,
            ),
        )
        s = series(ledger.journal, ledger.state.jobs["0001"])
    finally:
        ledger.close()
    crash = [m for m in s.markers if m.kind == "crash"]
    assert [(m.step, m.global_step) for m in crash] == [(23, 23)]
    assert "after step 23 (the last step reported before it)" in crash[0].text


def test_plot_without_matplotlib_names_the_extra(three, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "plot", "2", "-o", tmp_path / "x.png", "--home", three[0])
    assert code == 1 and "pip install 'ftctl[plot]'" in err


def _tb_points(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of a run folder: its event files in name order, each point kept unless
    a later SessionLog START (tensorboardX's purge_step) at a step <= it purges it."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    tags: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            e = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                tags = {t: [p for p in pts if p[0] < e.step] for t, pts in tags.items()}
            for v in e.summary.value:
                tags.setdefault(v.tag, []).append((e.step, v.simple_value))
    return tags


def test_tensorboard_live_files_have_no_duplicate_or_rewound_steps(three):
    home, _ = three
    tb = _tb_points(home / "tensorboard" / "0002")
    effective = [p for p in _metrics(home, "2")["points"]]
    for tag, key in (("loss/train", "loss"), ("loss/val", "val_loss")):
        steps = [s for s, _ in tb[tag]]
        assert steps == sorted(set(steps)), (tag, steps)
        assert steps == [p["global_step"] for p in effective if p[key] is not None], tag
    # one per attempt
    assert len(list((home / "tensorboard" / "0002").glob("events.out.tfevents.*"))) == 2


def test_export_tb_writes_the_effective_curves(three, tmp_path, capsys):
    home, _ = three
    code, out, _ = run(capsys, "export-tb", "1", "2", "-o", tmp_path / "tb", "--home", home)
    assert code == 0 and "tensorboard --logdir" in out
    tb = _tb_points(tmp_path / "tb" / "0002")
    assert [s for s, _ in tb["loss/train"]] == [
        p["global_step"] for p in _metrics(home, "2")["points"] if p["loss"] is not None
    ]
    # again: replaced, not doubled
    code, _, _ = run(capsys, "export-tb", "2", "-o", tmp_path / "tb", "--home", home)
    assert code == 0 and len(list((tmp_path / "tb" / "0002").iterdir())) == 1
    (tmp_path / "mine" / "0002").mkdir(parents=True)
    (tmp_path / "mine" / "0002" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "export-tb", "2", "-o", tmp_path / "mine", "--home", home)
    assert code == 1 and "left alone" in err and (tmp_path / "mine" / "0002" / "notes.txt").exists()


# --------------------------------------------------------------------------- the page's API


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *args: str):
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FTCTL_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ftctl.cli",
                "serve",
                "--port",
                str(self.port),
                *args,
                "--home",
                str(home),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        wait_for(self._up, timeout=30, every=0.1)

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        # the path as given: no client-side normalising
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def json(self, path: str):
        code, body = self.get(path)
        assert code == 200, (path, code, body[:300])
        return json.loads(body)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(three):
    s = Server(three[0])
    yield s
    s.stop()


def test_api_status_metrics_replay(three, server):
    home, _ = three
    st = server.json("/api/status")
    assert st["daemon"]["running"] and not st["daemon"]["died"]
    assert st["daemon"]["summary"] == status(home)["daemon"]["summary"]
    assert [(j["job"], j["state"]) for j in st["jobs"]] == [
        ("0001", "completed"),
        ("0002", "completed"),
        ("0003", "training"),
    ]
    assert [(c["job"], c["category"], c["step"]) for c in st["crashes"]] == [("0002", "killed", 17)]
    assert st["crashes"][0]["fix"] and "SIGKILL" in st["crashes"][0]["evidence_full"]
    assert st["history"][-1]["seq"] == st["seq"]
    for job in ("0001", "0002", "0003"):
        for flag in ("", "--all"):
            want = _metrics(home, job, *([flag] if flag else []))
            got = server.json(f"/api/jobs/{job}/metrics" + ("?all=1" if flag else ""))
            assert got["counts"] == want["jobs"][0]["counts"]
            assert got["columns"]["global_step"] == [p["global_step"] for p in want["points"]]
            assert got["columns"]["loss"] == [p["loss"] for p in want["points"]]
    last = server.json("/api/jobs/0002/metrics")["last_id"]
    later = server.json(f"/api/jobs/0002/metrics?after_id={last - 2}")
    assert len(later["columns"]["global_step"]) == 2  # the increment: rows after the given one
    seq = [e for e in server.json("/api/jobs/0002")["events"] if e["type"] == "crashed"][0]["seq"]
    past = server.json(f"/api/jobs/0002/replay?to={seq}")
    assert past["state"] == "crashed" and past["step"] == 10 and past["at_seq"] == seq
    assert server.get("/api/jobs/0002/replay?to=nope")[0] == 400
    assert server.get("/api/jobs/9999/metrics")[0] == 404
    code, page = server.get("/job/0002")
    assert code == 200 and b"job.js" in page


def test_start_serve_runs_the_page_beside_the_daemon(three):
    home, d = three
    with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/api/status", timeout=10) as r:
        st = json.loads(r.read())
    assert (
        st["daemon"]["running"]
        and st["daemon"]["pid"] == d.pid
        and st["seq"] == status(home)["seq"]
    )


def test_api_sse_stream_says_when_the_journal_moves(three, server):
    r = urllib.request.urlopen(server.url("/api/events"), timeout=10)
    assert r.headers["content-type"].startswith("text/event-stream")
    first = json.loads(r.readline().decode().removeprefix("data: "))
    assert first["seq"] == server.json("/api/status")["seq"] and first["alive"] is True
    r.close()


def test_static_files_only_no_path_traversal(three, server):
    for path in (
        "/static/../journal.db",
        "/static/../../journal.db",
        "/static/%2e%2e/%2e%2e/journal.db",
        "/static/..%2f..%2fjournal.db",
        "/static/vendor/../../app.py",
        "/static/%2e%2e/app.py",
        "/static//etc/passwd",
        "/../journal.db",
    ):
        code, body = server.get(path)
        assert code == 404 and b"SQLite format" not in body and b"import" not in body, path
    code, body = server.get("/static/vendor/uPlot.iife.min.js")
    assert code == 200 and b"uPlot" in body


def test_token_and_bind_safety(three):
    home, _ = three
    s = Server(home, "--token", "s3cret")
    try:
        assert (
            s.get("/api/status")[0] == 401
            and s.get("/")[0] == 401
            and s.get("/static/style.css")[0] == 401
        )
        assert s.get("/api/status?token=wrong")[0] == 401
        assert s.get("/api/status?token=s3cret")[0] == 200
        assert s.get("/api/status", {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        s.stop()
    p = ftctl(
        home, "serve", "--host", "0.0.0.0", "--port", str(_free_port()), check=False, timeout=30
    )
    assert p.returncode == 1 and "without a token" in p.stderr


def test_a_foreign_host_header_is_refused(three, server):
    """DNS rebinding: a page elsewhere points its own name at 127.0.0.1 and reads the JSON. Only the
    names the server was bound for are answered (any port): the page, the API and the stream."""
    port = server.port
    for host in (
        "evil.example",
        f"evil.example:{port}",
        "127.0.0.1.evil.example",
        "localhost.evil",
    ):
        for path in ("/", "/api/status", "/api/events", "/api/jobs/0002", "/static/style.css"):
            code, body = server.get(path, {"Host": host})
            assert code == 400 and b"journal" not in body, (host, path, code)
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        "LOCALHOST",
        f"[::1]:{port}",
    ):
        assert server.get("/api/status", {"Host": host})[0] == 200, host
        assert server.get("/", {"Host": host})[0] == 200, host
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/api/events", headers={"Host": host})
        r = c.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: "), host  # the live stream
        c.close()


def test_serve_port_zero_takes_a_free_port_and_prints_it(three):
    p = subprocess.Popen(
        [sys.executable, "-m", "ftctl.cli", "serve", "--port", "0", "--home", str(three[0])],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m and int(m[1]) > 0, line
        port = int(m[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as r:
            assert r.status == 200
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_serve_never_writes_the_journal(three, tmp_path):
    """A copy of the workspace's journal, no daemon: every endpoint leaves its bytes as they were."""
    home, _ = three
    copy = tmp_path / "ws"
    copy.mkdir()
    import sqlite3

    src, dst = sqlite3.connect(home / "journal.db"), sqlite3.connect(copy / "journal.db")
    src.backup(dst)  # a consistent copy while the daemon writes
    src.close()
    dst.close()
    shutil.copy(home / "ftctl.yaml", copy / "ftctl.yaml")
    for d in ("jobs", "logs", "run", "inbox"):
        (copy / d).mkdir()
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.name.startswith("journal.db")}
    s = Server(copy)
    try:
        for path in (
            "/api/status",
            "/api/jobs/0002/metrics?all=1",
            "/api/jobs/0002",
            "/api/jobs/0002/replay?to=5",
        ):
            s.json(path)
    finally:
        s.stop()
    after = {
        p.name: p.read_bytes()
        for p in copy.iterdir()
        if p.name.startswith("journal.db") and p.name in before
    }
    assert after == before


# --------------------------------------------------------------------------- a real browser


def _chromium(url: str, *extra: str) -> str:
    """Headless Chromium with 5 s of virtual time: the page must settle although its live stream stays
    open (a stream opened by the page itself kept such a run from ever finishing)."""
    p = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _attrs(dom: str, job: str) -> dict[str, str]:
    m = re.search(rf'<div class="chart" data-job="{job}"([^>]*)>', dom)
    assert m, f"no chart for job {job}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m[1]))


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: "
    "`apt-get install chromium`; .ci/run tries it): the browser test cannot run",
)


@needs_chromium
def test_browser_page_draws_what_the_journal_has(three, server, tmp_path):
    home, _ = three
    dom = _chromium(server.url("/"), "--window-size=1400,1400", "--dump-dom")
    # the banner's colour says what its text says: alive and keeping the machine awake is green,
    # alive but NOT keeping it awake (no systemd-inhibit here, say) is a warning
    power = status(home)["daemon"]["power"]
    banner = "alive" if not power or power.get("held") else "alive-warn"
    assert 'data-ready="1"' in dom and f'data-daemon="{banner}"' in dom, banner
    if banner == "alive-warn":
        assert "NOT keeping the machine awake" in dom
    for job in ("0001", "0002", "0003"):
        counts = _metrics(home, job)["jobs"][0]["counts"]
        a = _attrs(dom, job)
        assert (int(a["train"]), int(a["val"]), int(a["points"])) == (
            counts["train"],
            counts["val"],
            counts["effective"],
        ), job
    # the charts use the page's width: two to a row at 1400 px, each well over a third of it
    widths = [int(_attrs(dom, job)["width"]) for job in ("0001", "0002", "0003")]
    assert all(w > 560 for w in widths) and widths[0] + widths[1] > 1200, widths
    assert "killed" in dom and "SIGKILL" in dom  # the crash timeline
    assert "not replayed: </span><code>ftctl reproduce 0002 --crash 1</code>" in dom
    assert "lineage main: head job 0002" in dom
    page = _chromium(server.url("/job/0002#seq-5"), "--dump-dom")
    a = _attrs(page, "0002")
    counts = _metrics(home, "2", "--all")["jobs"][0]["counts"]
    assert int(a["superseded"]) == counts["superseded"] == 1 and int(a["train"]) == counts["train"]
    assert 'data-replay="5"' in page and "state right after event 5" in page
    assert 'class="chart pairs"' not in page  # an SFT job: the loss chart only
    assert 'class="state-panel"' in page and "<pre" in page  # a readable panel, the JSON folded
    # the job training: its heading names the journal's seq (it said "?" until a pulse came) and its
    # global step starts at its warm start's base
    now = _chromium(server.url("/job/0003"), "--dump-dom")
    seq = int(re.search(r"state now \(journal seq (\d+)\)", now)[1])
    assert seq <= status(home)["seq"] and "journal seq ?" not in now
    gstep = status(home, "0003")["live_global_step"]
    assert f"<th>global step</th><td>{gstep} (continues" in now and gstep >= 80
    shot = tmp_path / "page.png"
    _chromium(server.url("/"), "--window-size=1400,1500", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOT:
        shutil.copy(shot, SCREENSHOT)


@needs_chromium
def test_browser_shows_the_dead_daemon_banner(three, server):
    home, d = three
    d.send_signal(signal.SIGKILL)
    d.wait()
    wait_for(lambda: status(home)["daemon"]["died"], timeout=30)
    dom = _chromium(server.url("/"), "--dump-dom")
    assert (
        'data-daemon="dead"' in dom
        and "DAEMON DEAD" in dom
        and "died without recording its stop" in dom
    )
    assert "(daemon dead)" in dom  # job 0003's row: training says the journal, nobody supervises it


# --------------------------------------------------------------------------- preference training's figures


def _pair_points(home: Path) -> list[dict]:
    return _metrics(home, "1")["points"]


def test_a_dpo_jobs_pair_figures_are_plotted_exported_and_served(
    dpo_baseline, tmp_path, capsys, monkeypatch
):
    """The uninterrupted DPO job (conftest.py): `ftctl plot` draws the rewards and margin in one panel
    and the accuracy in another, each report's window as lines and the validation pairs as dots, with
    the journal's numbers; `ftctl export-tb` writes them under preference/<figure>/train and /val; the
    page's metrics carry every column of them."""
    from ftctl.events.types import PAIR_FIELDS

    home = dpo_baseline.home
    points = _pair_points(home)
    evals = [p for p in points if p["val_accuracy"] is not None]
    assert [p["step"] for p in evals] == [0, 10, 20, 30, 40]
    assert all(p[f"val_{k}"] is not None for p in evals for k in PAIR_FIELDS)

    def curve(key):
        return [(p["global_step"], p[key]) for p in points if p[key] is not None]

    figs = _drawn(monkeypatch)
    code, _, err = run(capsys, "plot", "1", "-o", tmp_path / "dpo.png", "--home", home)
    assert code == 0 and len(figs) == 1, err
    panels = {a.get_ylabel(): a for a in figs[0].axes}
    assert {"loss", "reward", "pairs ranked right"} <= set(panels), list(panels)
    drawn = {
        l.get_label(): list(zip(l.get_xdata(), l.get_ydata()))
        for name in ("reward", "pairs ranked right")
        for l in panels[name].lines
        if l.get_label().startswith("job ")
    }
    for key, label in (
        ("chosen_reward", "chosen reward"),
        ("rejected_reward", "rejected reward"),
        ("reward_margin", "reward margin"),
        ("accuracy", "accuracy"),
    ):
        assert drawn[f"job 0001: {label}"] == curve(key), key
        assert drawn[f"job 0001: val {label}"] == curve(f"val_{key}"), key
    val_dots = [l for l in panels["reward"].lines if l.get_label().startswith("job 0001: val")]
    assert val_dots and all(l.get_linestyle() == "None" for l in val_dots)

    code, _, _ = run(capsys, "export-tb", "1", "-o", tmp_path / "tb", "--home", home)
    tb = _tb_points(tmp_path / "tb" / "0001")
    for k in PAIR_FIELDS:
        for where, key in (("train", k), ("val", f"val_{k}")):
            got = tb[f"preference/{k}/{where}"]
            assert [s for s, _ in got] == [s for s, _ in curve(key)], (k, where)
            assert [v for _, v in got] == pytest.approx([v for _, v in curve(key)], rel=1e-6)

    s = Server(home)
    try:
        cols = s.json("/api/jobs/0001/metrics")["columns"]
    finally:
        s.stop()
    for k in (*PAIR_FIELDS, *(f"val_{k}" for k in PAIR_FIELDS)):
        assert cols[k] == [p[k] for p in points], k


@needs_chromium
def test_the_job_page_charts_a_dpo_jobs_pair_figures(dpo_baseline):
    """Beside the loss chart, a second chart (class "chart pairs") draws the rewards, margin and
    accuracy: as many report and evaluation points as the journal has, the newest accuracies its."""
    home = dpo_baseline.home
    points = _pair_points(home)
    s = Server(home)
    try:
        page = _chromium(s.url("/job/0001"), "--window-size=1400,1200", "--dump-dom")
    finally:
        s.stop()
    m = re.search(r'<div class="chart pairs" data-job="0001"([^>]*)>', page)
    assert m, "no pair chart"
    a = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m[1]))
    reports = [p for p in points if p["accuracy"] is not None]
    evals = [p for p in points if p["val_accuracy"] is not None]
    assert (int(a["pairs"]), int(a["val-pairs"])) == (len(reports), len(evals)) == (8, 5)
    assert float(a["last-accuracy"]) == pytest.approx(reports[-1]["accuracy"])
    assert float(a["last-val-accuracy"]) == pytest.approx(evals[-1]["val_accuracy"])
    assert "preference pairs · 8 reports / 5 evaluations" in page
    assert _attrs(page, "0001")["train"] == "8"  # and the loss chart as before
