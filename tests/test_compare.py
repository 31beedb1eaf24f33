"""`ftctl compare`: jobs side by side from the journal — the differing config keys, the figures."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from helpers import run
from hypothesis import given, settings
from hypothesis import strategies as st
from test_view import needs_chromium

from ftctl.core import compare as C
from ftctl.events import types as T

# --------------------------------------------------------------------------- pure table logic


def test_only_the_keys_that_differ_are_differing_columns():
    a = {"learning_rate": 1e-4, "lora_parameters": {"rank": 8, "scale": 10.0}, "iters": 100}
    b = {"learning_rate": 2e-4, "lora_parameters": {"rank": 8, "scale": 10.0}, "iters": 100}
    c = {"learning_rate": 1e-4, "lora_parameters": {"rank": 16, "scale": 10.0}, "iters": 100}
    assert C.differing([C.flatten(x) for x in (a, b, c)]) == [
        "learning_rate",
        "lora_parameters.rank",
    ]
    assert C.differing([C.flatten(a)] * 3) == []
    # a key one job lacks, a list, an int against an equal float: all differences a user would see
    assert C.differing([{"k": 1}, {}]) == ["k"]
    assert C.differing([{"k": [1, 2]}, {"k": [1, 3]}]) == ["k"]
    assert C.differing([{"k": 1}, {"k": 1.0}]) == ["k"]


def test_figure_columns_without_any_value_are_left_out():
    figs = [{"job": "0001", "name": "a", "state": "queued", "best_val_loss": None}]
    cols, _, rows = C.table(figs, [{"x": 1}])
    assert cols == ["job", "name", "state"] and rows == [
        {"job": "0001", "name": "a", "state": "queued"}
    ]
    cols, diff, rows = C.table(figs, [{"x": 1}], all_keys=True)
    assert cols[-1] == "x" and diff == [] and rows[0]["x"] == 1


def test_sorting_puts_missing_values_last_both_ways():
    rows = [{"v": 2.0}, {"v": None}, {"v": 1.0}, {"v": 3}]
    assert [r["v"] for r in C.sort_rows(rows, "v")] == [1.0, 2.0, 3, None]
    assert [r["v"] for r in C.sort_rows(rows, "v", reverse=True)] == [3, 2.0, 1.0, None]
    assert [r["n"] for r in C.sort_rows([{"n": "b"}, {"n": "a"}], "n")] == ["a", "b"]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 64), st.integers(1, 9), st.integers(0, 2000))
def test_an_epoch_is_the_same_batches_by_epochs_or_by_iters(examples, batch, epochs, step):
    """core/config.py's one arithmetic: a job trained by epochs (iters resolved from the count) and
    one trained by iters on the same data cut the same epochs; epoch_of agrees with epochs_trained."""
    from ftctl.core.config import (
        Config,
        ConfigError,
        batches_per_epoch,
        epoch_of,
        epochs_trained,
        resolve_epochs,
    )

    by_iters = Config(model="m", batch_size=batch)
    try:
        by_epochs = resolve_epochs(Config(model="m", batch_size=batch, epochs=epochs), examples)
    except ConfigError:
        assert examples < batch and batches_per_epoch(by_iters, examples) is None
        return
    per = examples // batch
    assert batches_per_epoch(by_epochs) == batches_per_epoch(by_epochs, examples) == per
    assert batches_per_epoch(by_iters, examples) == per and batches_per_epoch(by_iters) is None
    assert epochs_trained(by_iters, step, examples) == epochs_trained(by_epochs, step) == step / per
    assert epochs_trained(by_epochs, by_epochs.iters) == epochs
    if 1 <= step <= by_epochs.iters:  # the epoch a step is in is the one its passes are inside
        assert epoch_of(by_epochs, step)[0] == math.ceil(epochs_trained(by_epochs, step))


# --------------------------------------------------------------------------- from the journal

RUNS = {  # job -> (--set overrides, evaluations (step, val loss), reports (step, loss, tok/s, GB))
    "0001": (
        ["learning_rate=1e-4", "lora_parameters.rank=8"],
        [(10, 2.5), (20, 2.1), (30, 2.2), (40, 2.3)],
        [(10, 2.6, 1000.0, 1.5), (20, 2.2, 1200.0, 1.7), (40, 2.0, 1100.0, 1.6)],
    ),
    "0002": (
        ["learning_rate=3e-4", "lora_parameters.rank=8"],
        [(10, 2.4), (20, 1.9), (30, 1.7), (40, 1.6)],
        [(10, 2.5, 900.0, 1.4), (40, 1.5, 950.0, 1.4)],
    ),
    "0003": (
        ["learning_rate=1e-4", "lora_parameters.rank=16", "--lineage", "wide"],
        [(10, 2.6), (20, None), (30, 2.0), (40, 2.05)],
        [
            (10, 2.7, 800.0, 2.0),
            (20, 2.3, 700.0, 2.5),
            (30, 2.1, 750.0, 2.2),
            (40, 2.0, 760.0, 2.1),
        ],
    ),
}


def _train(ledger, journal, job, evals, reports, crash: bool, planned: bool = False) -> None:
    """The events a daemon commits for a run, step by step (the journal API, as control/supervise.py
    does); with ``crash``, the worker dies after step 20 and a second attempt resumes there; with
    ``planned``, the memory guard restarts it at step 30 (a planned restart, not a crash)."""
    s = f"job:{job}"
    device = "cuda:0 NVIDIA RTX 4090" if planned else "cpu x86_64"
    start = dict(job=job, worker_started_at=1.0, base_model="m", env={"device": device})
    ledger.commit(s, T.TrainingStarted(attempt=1, worker_pid=1, **start))
    by_step = {step: r for step, *r in reports}
    vals = dict(evals)
    for step in sorted({*by_step, *vals}):
        if step in by_step:
            loss, tps, mem = by_step[step]
            journal.record_metric(
                job,
                T.Metrics(
                    step=step,
                    global_step=step,
                    loss=loss,
                    lr=1e-4,
                    tokens_per_s=tps,
                    peak_mem_gb=mem,
                    trained_tokens=step * 100,
                ),
            )
        if step in vals:
            ledger.commit(s, T.Evaluated(job=job, step=step, global_step=step, val_loss=vals[step]))
        if crash and step == 20:
            ledger.commit(s, T.Crashed(job=job, category="oom", step=step, signal=9))
            ledger.commit(s, T.Requeued(job=job, reason="crash"))
            resume = dict(resume_step=20, resume_checkpoint="ck/20")
            ledger.commit(s, T.TrainingStarted(attempt=2, worker_pid=2, **start, **resume))
        if planned and step == 30:
            ledger.commit(
                s, T.RestartPlanned(job=job, step=30, guard="memory", evidence="grew 100 MB/step")
            )
            resume = dict(resume_step=30, resume_checkpoint="ck/30")
            ledger.commit(s, T.TrainingStarted(attempt=2, worker_pid=3, **start, **resume))
    ledger.commit(
        s,
        T.Completed(
            job=job,
            step=40,
            global_step=40,
            adapter_path="a",
            adapter_sha256="e" * 64,
            checkpoint="c",
        ),
    )


@pytest.fixture
def three(ws, tmp_path, capsys):
    """Three submitted jobs (the real `ftctl submit`) differing in learning rate or rank, and the
    events of their runs; job 0003 crashed once and resumed."""
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.ledger import Ledger

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"example number {i} " * 3}) + "\n" for i in range(20))
    )
    for job, (sets, _, _) in RUNS.items():
        args = [a for s in sets if "=" in s for a in ("--set", s)] + [
            s for s in sets if "=" not in s
        ]
        code, _, err = run(
            capsys, "submit", data, "--again", "--name", f"run{job}", *args, "--home", ws
        )
        assert code == 0, err
    w = Workspace(ws)
    ledger = Ledger(w.open_journal())
    for job, (_, evals, reports) in RUNS.items():
        _train(
            ledger, ledger.journal, job, evals, reports, crash=job == "0003", planned=job == "0002"
        )
    ledger.close()
    return ws


def _journal_truth(home, job):
    """Best and final val loss, with their steps, read straight from the journal's evaluated events."""
    from ftctl.events.journal import Journal

    with Journal.open(home / "journal.db") as j:
        evals = [r.event for r in j.read(stream=f"job:{job}") if isinstance(r.event, T.Evaluated)]
    finite = [e for e in evals if e.val_loss is not None]
    best = min(finite, key=lambda e: e.val_loss)
    return best.val_loss, best.step, evals[-1].val_loss, evals[-1].step


def _submitted(home, job) -> tuple[T.JobSubmitted, int]:
    """The job's job_submitted event, and the lines of the training data it keeps (jobs/<id>/data/)."""
    from ftctl.events.journal import Journal

    with Journal.open(home / "journal.db") as j:
        sub = next(r.event for r in j.read(stream=f"job:{job}"))
    assert isinstance(sub, T.JobSubmitted)
    lines = (home / "jobs" / job / "data" / "train.jsonl").read_text().splitlines()
    return sub, len([x for x in lines if x.strip()])


def test_three_jobs_differing_in_learning_rate_and_rank(three, capsys):
    code, out, err = run(capsys, "compare", "1", "2", "3", "--json", "--home", three)
    assert code == 0, err
    got = json.loads(out)
    assert got["differing"] == ["learning_rate", "lora_parameters.rank"]
    cfg_cols = [c for c in got["columns"] if c not in C.FIGURES]
    assert cfg_cols == ["learning_rate", "lora_parameters.rank"]
    rows = {r["job"]: r for r in got["rows"]}
    assert [rows[j]["learning_rate"] for j in RUNS] == [1e-4, 3e-4, 1e-4]
    assert [rows[j]["lora_parameters.rank"] for j in RUNS] == [8, 8, 16]
    for job, (_, _, reports) in RUNS.items():
        best, best_step, final, final_step = _journal_truth(three, job)
        r = rows[job]
        assert (r["best_val_loss"], r["best_val_step"]) == (best, best_step), job
        assert (r["final_val_loss"], r["final_val_step"]) == (final, final_step), job
        assert r["final_loss"] == reports[-1][1] and r["steps"] == 40
        assert r["peak_mem_gb"] == max(m for *_, m in reports)
        assert r["tokens_per_s"] == pytest.approx(
            sum(t for _, _, t, _ in reports) / len(reports), abs=0.05
        )
        assert (
            r["state"] == "completed" and r["data_file"].endswith("d.jsonl") and r["examples"] == 20
        )
    assert (rows["0003"]["crashes"], rows["0003"]["resumes"]) == (1, 1)
    assert (rows["0001"]["crashes"], rows["0001"]["resumes"]) == (0, 0)
    # the memory guard's restart of 0002 is a resume, not a crash; and it trained on another device
    assert [rows[j]["planned_restarts"] for j in RUNS] == [0, 1, 0]
    assert (rows["0002"]["crashes"], rows["0002"]["resumes"]) == (0, 1)
    assert [rows[j]["device"] for j in RUNS] == [
        "cpu x86_64",
        "cuda:0 NVIDIA RTX 4090",
        "cpu x86_64",
    ]
    assert "test_loss" not in got["columns"]  # no job was tested: no empty column
    # trained by iters, a job still passes over its data: 40 steps / (its training examples // batch)
    for job in RUNS:
        sub, held_in = _submitted(three, job)
        assert sub.train_examples == held_in < sub.examples == 20  # some were held out to validate
        per_epoch = held_in // sub.config["batch_size"]
        assert rows[job]["epochs_trained"] == round(40 / per_epoch, 2), job
    # none stopped early, and no result was recorded with a validation loss: no such columns
    assert "stopped_early" not in got["columns"] and "result_val_loss" not in got["columns"]
    assert [rows[j]["result_step"] for j in RUNS] == [40, 40, 40]


def test_all_keys_sorting_csv_and_the_terminal_table(three, capsys):
    _, out, _ = run(capsys, "compare", "--last", "3", "--all", "--json", "--home", three)
    got = json.loads(out)
    assert {"iters", "batch_size", "lora_parameters.scale"} <= set(got["columns"])
    assert got["differing"] == ["learning_rate", "lora_parameters.rank"]
    _, out, _ = run(
        capsys, "compare", "1", "2", "3", "--sort", "best_val_loss", "--csv", "--home", three
    )
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["job"] for r in table] == ["0002", "0003", "0001"]  # 1.6 < 2.0 < 2.1
    assert table[0]["learning_rate"] == "0.0003"
    _, out, _ = run(
        capsys,
        "compare",
        "--lineage",
        "main",
        "--sort",
        "final_loss",
        "--reverse",
        "--json",
        "--home",
        three,
    )
    got = json.loads(out)
    assert [r["job"] for r in got["rows"]] == ["0001", "0002"]  # 2.0, then 1.5
    assert got["differing"] == ["learning_rate"]  # the wider rank is in lineage "wide"
    code, out, _ = run(capsys, "compare", "1", "2", "3", "--home", three)
    assert code == 0 and "learning_rate" in out and "lora_parameters.rank" in out and "0003" in out


@pytest.fixture
def by_epochs(ws, tmp_path, capsys):
    """Two jobs trained by ``epochs = 3`` on 40 training examples in batches of 4 (10 batches an epoch,
    iters 30): 0001 (``result: last``) trains to the end and publishes its last checkpoint; 0002 (early
    stopping, ``result: best``) stops early at step 25 and publishes its best, step 10. Submitted by the real
    `ftctl submit`; their runs' events committed as the daemon commits them."""
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.ledger import Ledger

    def jsonl(name: str, n: int) -> Path:
        f = tmp_path / name
        f.write_text("".join(json.dumps({"text": f"{name} {i} " * 3}) + "\n" for i in range(n)))
        return f

    train, valid = jsonl("train.jsonl", 40), jsonl("valid.jsonl", 8)
    base = ["--valid", valid, "--again", "--set", "epochs=3", "--set", "batch_size=4"]
    for extra in (["--set", "result=last"], ["--set", "early_stopping={patience: 3}"]):
        code, _, err = run(capsys, "submit", train, *base, *extra, "--home", ws)
        assert code == 0, err
    ledger = Ledger(Workspace(ws).open_journal())
    for job, last, losses in (
        ("0001", 30, [2.0, 1.8, 1.7]),
        ("0002", 25, [2.0, 1.8, 1.85, 1.9, 1.95]),
    ):
        s = f"job:{job}"
        ledger.commit(
            s,
            T.TrainingStarted(
                job=job, attempt=1, worker_pid=1, worker_started_at=1.0, base_model="m"
            ),
        )
        every = last // len(losses)
        for i, loss in enumerate(losses, 1):
            step = i * every
            m = T.Metrics(
                step=step,
                global_step=step,
                loss=loss + 0.1,
                lr=1e-4,
                tokens_per_s=900.0,
                peak_mem_gb=1.2,
                trained_tokens=step * 50,
            )
            ledger.journal.record_metric(job, m)
            ledger.commit(s, T.Evaluated(job=job, step=step, global_step=step, val_loss=loss))
        done = dict(job=job, step=last, global_step=last, adapter_path="a", adapter_sha256="e" * 64)
        if job == "0001":
            ledger.commit(
                s,
                T.Completed(
                    **done, checkpoint="c30", result="last", result_step=30, result_val_loss=1.7
                ),
            )
        else:
            why = "early stopping at step 25: the validation loss has not improved in 3 evaluations"
            ledger.commit(
                s,
                T.EarlyStopped(
                    job=job, step=25, global_step=25, reason=why, best_step=5, best_val_loss=1.8
                ),
            )
            ledger.commit(
                s,
                T.Completed(
                    **done, checkpoint="c10", result="best", result_step=10, result_val_loss=1.8
                ),
            )
    ledger.close()
    return ws


def test_epochs_the_published_result_and_an_early_stop_are_columns(by_epochs, capsys):
    from ftctl.events.journal import Journal

    code, out, err = run(capsys, "compare", "1", "2", "--json", "--home", by_epochs)
    assert code == 0, err
    got = json.loads(out)
    rows = {r["job"]: r for r in got["rows"]}
    with Journal.open(by_epochs / "journal.db") as j:
        events = {job: [r.event for r in j.read(stream=f"job:{job}")] for job in rows}
    for job, evs in events.items():
        sub, lines = _submitted(by_epochs, job)
        assert sub.train_examples == lines == 40 and sub.config["iters"] == 30  # 3 x 40 // 4
        done = next(e for e in evs if isinstance(e, T.Completed))
        r = rows[job]
        # the passes it made: its last step over the batches of an epoch (iters // epochs)
        assert r["steps"] == done.step and r["epochs_trained"] == done.step / (30 // 3)
        assert (r["result_step"], r["result_val_loss"]) == (done.result_step, done.result_val_loss)
        early = [e.step for e in evs if isinstance(e, T.EarlyStopped)]
        assert r["stopped_early"] == (early[0] if early else None)
    assert [rows[j]["epochs_trained"] for j in ("0001", "0002")] == [3.0, 2.5]
    assert [rows[j]["stopped_early"] for j in ("0001", "0002")] == [None, 25]
    assert [rows[j]["result_step"] for j in ("0001", "0002")] == [30, 10]
    # the figures sit beside the steps and the validation losses; what differs are their configs
    cols = got["columns"]
    assert cols.index("epochs_trained") == cols.index("steps") + 1
    assert cols.index("final_val_step") < cols.index("result_step") < cols.index("stopped_early")
    assert set(got["differing"]) == {
        "result",
        "early_stopping",
        "early_stopping.patience",
        "early_stopping.min_delta",
    }
    # they sort as numbers (a job that did not stop early last either way), and read in a terminal
    _, out, _ = run(
        capsys, "compare", "1", "2", "--sort", "epochs_trained", "--csv", "--home", by_epochs
    )
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(r["job"], r["epochs_trained"]) for r in table] == [("0002", "2.5"), ("0001", "3.0")]
    _, out, _ = run(
        capsys,
        "compare",
        "1",
        "2",
        "--sort",
        "stopped_early",
        "--reverse",
        "--json",
        "--home",
        by_epochs,
    )
    assert [r["job"] for r in json.loads(out)["rows"]] == ["0002", "0001"]
    code, out, _ = run(capsys, "compare", "1", "2", "--home", by_epochs)
    assert code == 0 and "epochs_trained" in out and "stopped_early" in out


def test_wrong_input_is_a_clear_refusal(three, capsys):
    code, _, err = run(capsys, "compare", "1", "--sort", "nope", "--home", three)
    assert code == 1 and "no column 'nope'" in err and "best_val_loss" in err
    code, _, err = run(capsys, "compare", "1", "--last", "2", "--home", three)
    assert code == 1 and "one of them" in err
    code, _, err = run(capsys, "compare", "9", "--home", three)
    assert code == 1 and "no job '9'" in err
    code, _, err = run(capsys, "compare", "--home", three)
    assert code == 1 and "at least one job" in err


# --------------------------------------------------------------------------- the page


def _effective_counts(home, job):
    """(train points, val points) of the job's effective curve, as `ftctl metrics` counts them."""
    from helpers import ftctl_json

    c = ftctl_json(home, "metrics", job, "--json")["jobs"][0]["counts"]
    return c["train"], c["val"]


def _js(x: float) -> str:
    """A number as JavaScript's String() writes it (10, not 10.0)."""
    return str(int(x)) if x == int(x) else repr(x)


def _box(dom: str, chart_id: str) -> dict[str, str]:
    m = re.search(
        rf'<div class="chart"([^>]*)id="{chart_id}"|<div class="chart" id="{chart_id}"([^>]*)>', dom
    )
    assert m, f"no chart {chart_id}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m[0]))


def test_api_compare_is_the_cli_table(three, capsys):
    from test_view import Server

    _, out, _ = run(capsys, "compare", "1", "2", "3", "--json", "--home", three)
    s = Server(three)
    try:
        got = s.json("/api/compare?jobs=1,2,3")
        assert {k: v for k, v in got.items() if k != "rows"} == {
            k: v for k, v in json.loads(out).items() if k != "rows"
        }
        assert [r["job"] for r in s.json("/api/compare")["rows"]] == ["0001", "0002", "0003"]
        assert [r["job"] for r in s.json("/api/compare?lineage=wide")["rows"]] == ["0003"]
        code, body = s.get("/api/compare?jobs=9")
        assert code == 404 and b"no job '9'" in body
    finally:
        s.stop()


@needs_chromium
def test_the_compare_view_overlays_one_series_per_selected_run_and_the_url_restores_it(
    three, tmp_path
):
    from test_view import SCREENSHOT, Server, _chromium

    s = Server(three)
    try:
        dom = _chromium(s.url("/compare?jobs=1,3"), "--window-size=1400,1600", "--dump-dom")
        assert 'data-ready="1"' in dom and 'data-selection="0001,0003"' in dom
        loss = _box(dom, "loss-chart")
        # one train series and one val series per selected run, nothing of the others
        assert (loss["jobs"], loss["runs"], loss["series"]) == ("0001,0003", "2", "4")
        want = " ".join(
            f"{j}:{'/'.join(map(str, _effective_counts(three, j)))}" for j in ("0001", "0003")
        )
        assert loss["counts"] == want  # the points drawn are the journal's effective curves
        for chart in ("tps-chart", "mem-chart"):  # the system metrics of the same runs below
            assert _box(dom, chart)["jobs"] == "0001,0003"
        # the runs table: every job a row, the two selected marked, the key they differ in highlighted
        assert re.findall(r'<tr data-job="(\d+)"( class="selected")?', dom) == [
            ("0001", ' class="selected"'),
            ("0002", ""),
            ("0003", ' class="selected"'),
        ]
        assert 'data-differs="lora_parameters.rank"' in dom  # both have learning rate 1e-4
        assert '<th class="cfg diff" data-col="lora_parameters.rank"' in dom
        # another link, another view: a lineage's runs, every one selected, by tokens seen, sorted
        dom = _chromium(s.url("/compare?lineage=main&x=tokens&sort=best_val_loss"), "--dump-dom")
        loss = _box(dom, "loss-chart")
        assert (loss["jobs"], loss["runs"], loss["series"]) == ("0001,0002", "2", "4")
        assert 'data-differs="learning_rate"' in dom and 'data-sorted="asc"' in dom
        assert re.findall(r'<tr data-job="(\d+)"', dom) == ["0002", "0001"]  # 1.6 before 2.1
        # aligned by epoch: x = step / the batches of an epoch of each job's training data
        dom = _chromium(s.url("/compare?jobs=1,3&x=epoch"), "--dump-dom")
        assert 'data-x="epoch"' in dom and 'data-selection="0001,0003"' in dom
        loss, want = _box(dom, "loss-chart"), []
        for job in ("0001", "0003"):
            sub, lines = _submitted(three, job)
            per_epoch = lines // sub.config["batch_size"]
            want.append(f"{job}:{_js(10 / per_epoch)}..{_js(40 / per_epoch)}")  # steps 10..40
        assert (loss["runs"], loss["series"], loss["xs"]) == ("2", "4", " ".join(want))
        assert _box(dom, "tps-chart")["xs"] == loss["xs"]
        # the job page links to its lineage's comparison
        job = _chromium(s.url("/job/0003"), "--dump-dom")
        assert 'href="../compare?lineage=wide"' in job
        shot = tmp_path / "compare.png"
        _chromium(
            s.url("/compare?jobs=1,2,3&x=epoch"), "--window-size=1400,1300", f"--screenshot={shot}"
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT:
            shutil.copy(shot, Path(SCREENSHOT).with_name("compare-view.png"))
    finally:
        s.stop()


def test_a_sweep_of_many_jobs_is_a_plain_grid_that_keeps_every_value_whole():
    """More than GRID_ROWS jobs: one line per job, columns padded, never folded or cropped — rich's
    Table laid out all 200 x 22 cells of bench/compare.py's sweep in ~2 s of the command's 3 s —, the
    values exactly as the table shows them (markup-like text such as `[self_attn.q_proj]` unescaped),
    numbers right-aligned under their header."""
    import io

    from rich.console import Console

    from ftctl.cli import render
    from ftctl.control.compare import Comparison

    n = render.GRID_ROWS + 1
    rows = [
        {
            "job": f"{i:04d}",
            "name": "sweep",
            "state": "completed",
            "best_val_loss": 1.0 + i / 1000,
            "learning_rate": 1e-4 * (i + 1),
            "lora_parameters.keys": ["self_attn.q_proj"],
        }
        for i in range(n)
    ]
    cols = ["job", "name", "state", "best_val_loss", "learning_rate", "lora_parameters.keys"]
    c = Comparison(columns=cols, differing=["learning_rate"], rows=rows)
    buf = io.StringIO()
    Console(file=buf, width=40, color_system=None).print(
        render.compare_table(c, 40), crop=False, soft_wrap=True
    )
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith(f"{n} job(s); differing keys: learning_rate")
    head, body = lines[1], lines[2:]
    assert len(body) == n and all(len(line) > 40 for line in body)  # whole lines, wider than 40
    assert body[0].split() == ["0000", "sweep", "completed", "1", "0.0001", '["self_attn.q_proj"]']
    assert head.index("best_val_loss") + len("best_val_loss") == body[0].index(" 1 ") + 2
    few = Comparison(columns=cols, differing=["learning_rate"], rows=rows[:3])
    assert type(render.compare_table(few, 40)).__name__ == "Table"  # a few jobs: rich's, as before
