"""Bad input always gets a clear message and the right exit code, and loses nothing committed."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run

from ftctl.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def chat(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
    )


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_workspace_is_private(ws):
    assert (ws.stat().st_mode & 0o777) == 0o700
    for p in ws.rglob("*"):
        assert p.stat().st_mode & 0o077 == 0, p


def test_no_workspace(tmp_path, capsys):
    code, _, err = run(capsys, "status", "--home", tmp_path / "nowhere")
    assert code == 1 and "no ftctl workspace" in err and "ftctl init" in err


def test_init_refuses_existing(ws, capsys):
    # the workspace is checked first
    code, _, err = run(capsys, "init", "--model", "x", "--home", ws)
    assert code == 1 and "already holds an ftctl workspace" in err


@pytest.mark.parametrize(
    "content", [b"", b"\x00garbage" * 50, b"SQLite format 3\x00" + b"\x00" * 200]
)
def test_bad_journal_file(ws, capsys, content):
    (ws / "journal.db").write_bytes(content)
    before = sha(ws / "journal.db")
    code, _, err = run(capsys, "status", "--home", ws)
    assert code == 1 and "not an ftctl journal" in err and "Nothing was changed" in err
    assert sha(ws / "journal.db") == before


def test_submit_queues_and_records_sha_and_config(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(60)])
    code, out, err = run(capsys, "submit", data, "--home", ws, "--set", "lora_parameters.rank=16")
    assert code == 0 and "queued job 0001" in out
    assert "held out 4 of 60 examples" in err  # every 20th would be 3 < batch_size 4
    code, out, _ = run(capsys, "history", "--json", "--home", ws)
    ev = json.loads(out)[0]
    assert ev["type"] == "job_submitted" and ev["data"]["data_sha256"] == sha(data)
    assert ev["data"]["config"]["lora_parameters"]["rank"] == 16
    assert (ws / "jobs" / "0001" / "data" / "train.jsonl").exists()


def test_submit_rejects_bad_data_and_leaves_it_untouched(ws, tmp_path, capsys):
    lines = [chat(i) for i in range(40)] + [
        "{not json",
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
    ]
    data = write(tmp_path / "bad.jsonl", lines)
    before = sha(data)
    code, _, err = run(capsys, "submit", data, "--home", ws)
    assert code == 1
    assert "bad.jsonl:41" in err and "bad.jsonl:42" in err and "bad.jsonl:43" in err
    assert "rejected job 0001" in err and "left untouched" in err
    assert sha(data) == before
    _, out, _ = run(capsys, "status", "0001", "--json", "--home", ws)
    assert json.loads(out)["state"] == "rejected"
    assert not (ws / "jobs" / "0001").exists()


def test_submit_invalid_utf8_and_empty(ws, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, _, err = run(capsys, "submit", empty, "--home", ws)
    assert code == 1 and "empty" in err
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(
        ("\n".join(chat(i) for i in range(5)) + "\n").encode() + b'{"text": "caf\xe9"}\n'
    )
    code, _, err = run(capsys, "submit", bad, "--home", ws)
    assert code == 1 and "latin.jsonl:6" in err and "UTF-8" in err


def test_submit_missing_file(ws, capsys):
    code, _, err = run(capsys, "submit", "/nope/x.jsonl", "--home", ws)
    assert code == 1 and "does not exist" in err and "nothing was queued" in err


def test_bad_config_names_key(ws, tmp_path, capsys):
    cfg = yaml.safe_load((ws / "ftctl.yaml").read_text())
    cfg["lora_parameters"]["rank"] = 0
    (ws / "ftctl.yaml").write_text(yaml.safe_dump(cfg))
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    code, _, err = run(capsys, "submit", data, "--home", ws)
    assert code == 1 and "lora_parameters.rank" in err and ">= 1" in err or "between 1" in err
    code, _, err = run(capsys, "submit", data, "--home", ws, "--set", "learning_rat=1")
    assert code == 1


def test_bad_override_value(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    code, _, err = run(capsys, "submit", data, "--home", ws, "--set", "batch_size=zero")
    assert code == 1 and "batch_size" in err
    _, out, _ = run(capsys, "history", "--json", "--home", ws)
    assert json.loads(out) == []  # nothing recorded


def test_illegal_transitions_are_refused(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    run(capsys, "submit", data, "--home", ws)
    code, _, err = run(capsys, "resume", "1", "--home", ws)
    assert code == 1 and "job 0001 is 'queued'" in err and "resume" in err
    assert run(capsys, "pause", "1", "--home", ws)[0] == 0
    assert run(capsys, "resume", "1", "--home", ws)[0] == 0
    assert run(capsys, "cancel", "1", "--home", ws)[0] == 0
    code, _, err = run(capsys, "cancel", "1", "--home", ws)
    assert code == 1 and "'cancelled'" in err
    _, out, _ = run(capsys, "history", "--json", "--home", ws)
    assert [e["type"] for e in json.loads(out)] == [
        "job_submitted",
        "paused",
        "resumed",
        "cancelled",
    ]


def test_replay_shows_the_past(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    run(capsys, "submit", data, "--home", ws)
    run(capsys, "pause", "1", "--home", ws)
    _, out, _ = run(capsys, "replay", "1", "--to", "1", "--json", "--home", ws)
    assert json.loads(out)["state"] == "queued"
    _, out, _ = run(capsys, "replay", "1", "--to", "2", "--json", "--home", ws)
    assert json.loads(out)["state"] == "paused"
    code, _, err = run(capsys, "replay", "1", "--to", "99", "--home", ws)
    assert code == 1 and "outside the journal" in err


def test_unknown_job_and_bad_usage(ws, capsys):
    code, _, err = run(capsys, "status", "42", "--home", ws)
    assert code == 1 and "no job '42'" in err
    with pytest.raises(SystemExit) as e:
        main(["replay", "1", "--home", str(ws)])  # --to missing
    assert e.value.code == 1


def test_internal_error_exit_2_keeps_traceback(ws, capsys, monkeypatch):
    from ftctl.cli import jobs as jobs_cli

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(jobs_cli, "_ledger", boom)
    code, _, err = run(capsys, "status", "--home", ws)
    assert code == 2 and "internal error" in err and "simulated bug" in err
    assert "simulated bug" in (ws / "logs" / "internal-errors.log").read_text()


def test_recover_on_clean_workspace_is_a_noop(ws, capsys):
    code, out, _ = run(capsys, "recover", "--json", "--home", ws)
    assert code == 0 and json.loads(out)["repairs"] == []


def test_recover_removes_submit_debris(ws, capsys):
    (ws / "jobs" / "0007" / "data").mkdir(parents=True)
    code, out, _ = run(capsys, "recover", "--dry-run", "--json", "--home", ws)
    assert len(json.loads(out)["repairs"]) == 1 and (ws / "jobs" / "0007").exists()
    run(capsys, "recover", "--home", ws)
    assert not (ws / "jobs" / "0007").exists()
    _, out, _ = run(capsys, "recover", "--json", "--home", ws)
    assert json.loads(out)["repairs"] == []


def test_docs_cover_every_config_key_and_event():
    from ftctl.core.config import describe_keys
    from ftctl.events.types import EVENT_TYPES

    config_doc = (ROOT / "docs" / "config.md").read_text()
    for key in describe_keys():
        assert f"`{key}`" in config_doc, key
    events_doc = (ROOT / "docs" / "events.md").read_text()
    for t in EVENT_TYPES:
        assert f"`{t.kind()}`" in events_doc, t.kind()


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = ci.strip().splitlines()[-1]
    assert cmd in readme
    assert re.search(r"pytest", cmd)


def test_doctor_finds_problems_and_fix_repairs_them(ws, tmp_path, capsys):
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    assert code == 0 and json.loads(out)["ok"]
    # which BLAS workers run on
    (found,) = [f for f in json.loads(out)["findings"] if f["check"] == "blas"]
    assert found["message"].startswith("workers run on ")
    if sys.platform.startswith("linux") and "reference" in found["message"]:
        assert "pip install" in found["message"]  # and how to get a fast one
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    run(capsys, "submit", data, "--home", ws)
    cfg = yaml.safe_load((ws / "ftctl.yaml").read_text())
    cfg["learning_rate"] = 3e-4
    (ws / "ftctl.yaml").write_text(yaml.safe_dump(cfg))
    (ws / "jobs" / "0009").mkdir()
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    report = json.loads(out)
    bad = {f["check"]: f for f in report["findings"] if f["severity"] != "ok"}
    assert code == 1 and not report["ok"]
    assert "learning_rate" in bad["config drift"]["message"] and bad["config drift"]["fix"]
    assert "0009" in bad["checkpoints"]["message"] and "ftctl recover" in bad["checkpoints"]["fix"]
    code, out, _ = run(capsys, "doctor", "--fix", "--json", "--home", ws)
    report = json.loads(out)
    assert any("0009" in line for line in report["fixed"]) and not (ws / "jobs" / "0009").exists()
    # a choice for the user
    assert {f["check"] for f in report["findings"] if f["severity"] != "ok"} == {"config drift"}


def test_a_bad_set_override_is_blamed_on_the_override_not_the_file(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    code, _, err = run(capsys, "submit", data, "--home", ws, "--set", "learnig_rate=2e-4")
    assert code == 1
    assert (
        "--set learnig_rate=2e-4: unknown key 'learnig_rate' (did you mean 'learning_rate'?)" in err
    )
    assert "ftctl.yaml" not in err
    code, _, err = run(
        capsys, "submit", data, "--home", ws, "--set", "iters=5", "--set", "lora_parameters.rank=0"
    )
    assert code == 1 and err.startswith(
        "error: --set lora_parameters.rank=0: lora_parameters.rank = 0"
    )


def test_per_job_overrides_are_recorded_and_are_not_config_drift(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    code, _, _ = run(capsys, "submit", data, "--home", ws, "--set", "learning_rate=2e-4", "--fresh")
    assert code == 0
    _, out, _ = run(capsys, "history", "--json", "--home", ws)
    assert json.loads(out)[0]["data"]["overrides"] == ["learning_rate=2e-4", "warm_start=false"]
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    drift = [f for f in json.loads(out)["findings"] if f["check"] == "config drift"]
    assert code == 0 and drift[0]["severity"] == "ok", drift
    cfg = yaml.safe_load((ws / "ftctl.yaml").read_text())
    cfg["iters"] = 7  # a real edit of ftctl.yaml is still reported
    (ws / "ftctl.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    drift = [f for f in json.loads(out)["findings"] if f["check"] == "config drift"]
    assert (
        code == 1 and "iters" in drift[0]["message"] and "learning_rate:" not in drift[0]["message"]
    )


def test_the_same_data_and_config_twice_needs_again(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    assert run(capsys, "submit", data, "--home", ws)[0] == 0
    code, _, err = run(capsys, "submit", data, "--home", ws)
    assert code == 1 and "job 0001" in err and "--again" in err and "nothing was queued" in err
    # another config: another job
    assert run(capsys, "submit", data, "--home", ws, "--set", "iters=50")[0] == 0
    assert run(capsys, "submit", data, "--home", ws, "--again")[0] == 0
    _, out, _ = run(capsys, "history", "--json", "--home", ws)
    assert [e["data"]["job"] for e in json.loads(out)] == ["0001", "0002", "0003"]


def test_a_duplicate_in_the_inbox_is_moved_to_rejected_not_retried(ws, tmp_path, capsys):
    from ftctl.adapters.workspace import Workspace
    from ftctl.control.daemon import Daemon
    from ftctl.control.ledger import Ledger
    from ftctl.control.reporter import Reporter

    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    assert run(capsys, "submit", data, "--home", ws)[0] == 0
    (ws / "inbox" / "d.jsonl").write_bytes(data.read_bytes())
    daemon = Daemon(Workspace(ws), until_idle=True, report=Reporter())
    daemon.ledger = Ledger(daemon.ws.open_journal())
    daemon.scan_inbox()
    assert (
        not (ws / "inbox" / "d.jsonl").exists() and (ws / "inbox" / "rejected" / "d.jsonl").exists()
    )
    assert "job 0001" in (ws / "logs" / "daemon.log").read_text()
    assert list(daemon.ledger.state.jobs) == ["0001"]
    # the same name rejected again never replaces the file rejected first (the user's, not ftctl's)
    (ws / "inbox" / "rejected" / "d.jsonl").write_bytes(b"the user's notes")
    (ws / "inbox" / "d.jsonl").write_bytes(data.read_bytes())
    daemon.scan_inbox()
    rejected = ws / "inbox" / "rejected"
    assert sorted(f.name for f in rejected.iterdir()) == ["d.jsonl", "d~2.jsonl"]
    assert (rejected / "d.jsonl").read_bytes() == b"the user's notes"
    assert (rejected / "d~2.jsonl").read_bytes() == data.read_bytes()


def test_config_show_prints_yaml_values_not_python_reprs(ws, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    cfg = yaml.safe_load((ws / "ftctl.yaml").read_text())
    cfg["lora_parameters"]["keys"] = ["self_attn.q_proj", "self_attn.v_proj"]
    cfg["warm_start"] = False
    (ws / "ftctl.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run(capsys, "config", "show", "--home", ws)
    rows = {
        cells[0]: cells[1]
        for line in out.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 3
    }
    assert code == 0
    assert (
        rows["fine_tune_type"] == "lora"
        and rows["lr_schedule"] == "null"
        and rows["warm_start"] == "false"
    )
    assert rows["lora_parameters.keys"] == "[self_attn.q_proj, self_attn.v_proj]"
    assert "'" not in out and "None" not in out and "False" not in out


LONG_LOG = "/home/someone/with/a/rather/long/workspace/path/.ftctl/logs/job-0001.log"
EVIDENCE = (
    f"exit code 1; last step seen 3; log {LONG_LOG}\n"
    'Traceback (most recent call last):\n  File "worker.py", line 9, in main\n    load()\n'
    "ValueError: Missing 9 parameters\n"
)


def _crash(ws, *crashes):
    """Record a job's worker starting and dying, once per (exit_code, signal, evidence)."""
    import time

    from ftctl.control.ledger import Ledger
    from ftctl.core.state import job_stream
    from ftctl.events import types as ev

    ledger = Ledger.open(ws / "journal.db")
    try:
        for i, (code, sig, evidence) in enumerate(crashes):
            ledger.commit(
                job_stream("0001"),
                ev.TrainingStarted(
                    job="0001",
                    attempt=i + 1,
                    worker_pid=1,
                    worker_started_at=time.time(),
                    base_model="m",
                ),
            )
            ledger.commit(
                job_stream("0001"),
                ev.Crashed(
                    job="0001",
                    category="exception",
                    step=None if i else 3,
                    exit_code=code,
                    signal=sig,
                    evidence=evidence,
                ),
            )
            ledger.commit(
                job_stream("0001"), ev.Requeued(job="0001", reason="test", not_before=0.0)
            )
    finally:
        ledger.close()


def test_crashes_shows_signal_exit_and_the_telling_evidence_line(ws, tmp_path, capsys, monkeypatch):
    from ftctl.cli import render

    monkeypatch.setenv("COLUMNS", "320")  # wide enough that no cell folds onto a second line
    monkeypatch.setattr(render, "_CONSOLES", {})  # a console made now, at that width
    run(capsys, "submit", write(tmp_path / "d.jsonl", [chat(i) for i in range(30)]), "--home", ws)
    _crash(ws, (1, None, EVIDENCE), (None, 9, "no exit status; the worker hung"))
    code, out, _ = run(capsys, "crashes", "--home", ws)
    rows = [
        [c.strip() for c in line.strip("│ ").split("│")]
        for line in out.splitlines()
        if "exception" in line
    ]
    assert code == 0 and len(rows) == 2, out
    first, second = rows
    # the job's crash number: what `reproduce --crash` takes
    assert first[3] == "1" and second[3] == "2"
    assert first[5:9] == ["3", "1", "-", "ValueError: Missing 9 parameters"]
    assert second[5:9] == ["-", "-", "SIGKILL", "no exit status; the worker hung"]
    assert "None" not in out
    # never replayed: the reproduced? column shows the command that replays each (it showed "-")
    assert first[-1] == "not replayed: ftctl reproduce 0001 --crash 1", first
    assert second[-1] == "not replayed: ftctl reproduce 0001 --crash 2", second


def test_history_never_cuts_a_path_in_the_middle(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    run(capsys, "submit", write(tmp_path / "d.jsonl", [chat(i) for i in range(30)]), "--home", ws)
    _crash(
        ws,
        (1, None, EVIDENCE.replace("\nTraceback", "\nnothing to see\nTraceback")),
        (-9, 9, f"exit code -9 (signal SIGKILL); last step seen 3; log {LONG_LOG}"),
    )
    code, out, _ = run(capsys, "history", "--home", ws)
    assert code == 0 and "evidence=ValueError: Missing 9 parameters" in out
    assert f"log {LONG_LOG}" in out  # whole: the path can be opened


# --------------------------------------------------------------------------- the parser: help, typos, --version

# wt-9a owns the options of `status` and `history` (issue 9); their argument help is checked there.
# commands whose argument help is checked elsewhere (none now)
ARGUMENT_HELP_ELSEWHERE: set[str] = set()


def _commands(parser, path=""):
    import argparse

    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    for name, p in sub.choices.items() if sub else []:
        yield f"{path} {name}".strip(), p
        yield from _commands(p, f"{path} {name}".strip())


def test_every_command_has_a_description_an_example_and_help_for_every_argument():
    import argparse

    from ftctl.cli.main import build_parser

    commands = dict(_commands(build_parser()))
    assert {"init", "submit", "start", "pause", "config show", "doctor", "demo"} <= set(commands)
    docs = (ROOT / "docs" / "cli.md").read_text()
    for name, p in commands.items():
        assert p.description and len(p.description) > 20, name
        assert p.epilog and p.epilog.startswith("example:\n  ftctl " + name.split()[0]), name
        # the example keeps its lines
        assert p.formatter_class is argparse.RawDescriptionHelpFormatter, name
        assert f"`ftctl {name}" in docs, name
        if name in ARGUMENT_HELP_ELSEWHERE:
            continue
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS, (
                f"ftctl {name}: {a.option_strings or a.dest} has no help"
            )
            for opt in a.option_strings:  # docs/cli.md names every option of the command
                if opt not in ("-h", "--help", "--home"):
                    row = next(
                        l
                        for l in docs.splitlines()
                        if l.startswith(f"| `ftctl {name.split()[0]}")
                        or (name in ("pause", "resume", "cancel") and "`ftctl resume JOB`" in l)
                    )
                    assert opt in row, f"docs/cli.md does not mention ftctl {name} {opt}"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"ftctl \S+\n", capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["statsu"], "unknown command 'statsu' (did you mean 'status'?)"),
        (["config", "shw"], "ftctl config: unknown command 'shw' (did you mean 'show'?)"),
        (["config"], "ftctl config needs a command: show"),
        ([], "ftctl needs a command: init, submit"),
    ],
)
def test_a_typo_or_a_missing_command_gets_one_clear_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 1 and expected in err
    assert "usage:" not in err and "choose from" not in err and "invalid choice" not in err


def test_a_mistyped_option_names_the_command_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["submit", "d.jsonl", "--vaild", "v.jsonl"])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 1
    assert "ftctl submit: unknown option '--vaild' (did you mean '--valid'?)" in err
    assert "unrecognized arguments" not in err


# --------------------------------------------------------------------------- --json on every command that answers


def test_json_from_init_pause_resume_cancel_and_shutdown(tmp_path, capsys, demo):
    model = demo.model_dir
    home = tmp_path / "home"
    code, out, _ = run(capsys, "init", "--model", model, "--home", home, "--json")
    assert code == 0 and json.loads(out) == {
        "home": str(home),
        "config": str(home / "ftctl.yaml"),
        "model": str(model),
        "demo_data": None,
    }
    run(capsys, "submit", write(tmp_path / "d.jsonl", [chat(i) for i in range(30)]), "--home", home)
    for action, event in (("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")):
        code, out, _ = run(capsys, action, "1", "--home", home, "--json")
        assert code == 0 and json.loads(out) == {
            "job": "0001",
            "action": action,
            "event": event,
            "deferred": False,
            "daemon_alive": False,
        }
    code, out, _ = run(capsys, "shutdown", "--home", home, "--json")
    assert code == 0 and json.loads(out) == {"requested": False, "stopped": True}


def test_a_refusal_with_json_is_a_json_error_on_stdout(tmp_path, capsys, demo):
    home = tmp_path / "home"
    run(capsys, "init", "--model", demo.model_dir, "--home", home)
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    assert run(capsys, "submit", data, "--home", home, "--json")[0] == 0
    # the same job twice: refused
    code, out, err = run(capsys, "submit", data, "--home", home, "--json")
    answer = json.loads(out)
    assert code == 1 and answer["exit"] == 1 and "--again" in answer["error"] and "error:" in err
    code, out, _ = run(capsys, "pause", "42", "--home", home, "--json")
    assert code == 1 and json.loads(out)["exit"] == 1


def test_start_json_prints_one_summary_of_the_run(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(30)])
    # more free disk than any machine has: the daemon pauses the job before it starts
    run(capsys, "submit", data, "--set", "min_free_disk_gb=1e9", "--home", ws)
    code, out, err = run(capsys, "start", "--until-idle", "--home", ws, "--json")
    summary = json.loads(out)  # stdout is the summary alone: the progress went to stderr
    # --until-idle: not all completed
    assert code == 1 and "daemon started" in err and "job 0001 paused" in err
    assert summary == {
        "stopped": "queue empty (--until-idle)",
        "completed": [],
        "failed": [],
        "paused": ["0001"],
    }


def test_consolidate_json_with_a_daemon_running_is_a_request(ws, tmp_path, capsys):
    from ftctl.adapters import process

    # the lineage
    run(capsys, "submit", write(tmp_path / "d.jsonl", [chat(i) for i in range(30)]), "--home", ws)
    lock = process.acquire_lock(ws / "run" / "daemon.lock")  # stands for a running daemon
    try:
        code, out, _ = run(capsys, "consolidate", "--home", ws, "--json")
    finally:
        process.release_lock(lock)
    assert code == 0 and json.loads(out) == {
        "lineage": "main",
        "requested": True,
        "path": None,
        "weights_sha256": None,
    }


def test_history_follow_json_is_one_compact_object_per_line(ws, tmp_path, capsys, monkeypatch):
    from ftctl.cli import main as m

    run(capsys, "submit", write(tmp_path / "d.jsonl", [chat(i) for i in range(30)]), "--home", ws)
    run(capsys, "pause", "1", "--home", ws)

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(m.time, "sleep", interrupt)
    code, out, _ = run(capsys, "history", "--follow", "--json", "--home", ws)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert [json.loads(l)["type"] for l in lines] == ["job_submitted", "paused"]
    assert all(l == json.dumps(json.loads(l), separators=(",", ":")) for l in lines)


# --------------------------------------------------------------------------- the command table, the error base


def test_the_command_table_is_the_one_registry():
    """Every entry resolves to its handler and argument declaration; every handler of a cli module is
    in the table; no parser is registered anywhere else."""
    import importlib
    import inspect

    from ftctl.cli.table import COMMANDS, Command

    handlers = set()
    for name, c in COMMANDS.items():
        if not isinstance(c, Command):
            assert any(n.startswith(name + " ") for n in COMMANDS), name  # a group has children
            continue
        m = importlib.import_module(f"ftctl.cli.{c.module}")
        assert callable(getattr(m, f"cmd_{c.handler}")) and callable(
            getattr(m, f"add_{c.args or c.handler}")
        ), name
        handlers.add((c.module, c.handler))
    for f in (ROOT / "cli").glob("*.py"):
        text = f.read_text()
        defined = {(f.stem, h) for h in re.findall(r"^def cmd_(\w+)\(", text, re.M)}
        assert defined <= handlers, defined - handlers
        if f.name != "args.py":
            assert "add_parser(" not in text and "add_subparsers(" not in text, f
    assert inspect.getsource(importlib.import_module("ftctl.cli.main")).count("add_argument") == 0


def test_a_read_only_query_imports_only_its_own_command(ws):
    """`ftctl status` loads its cli module and the control modules it calls: no other command's, no
    daemon, no MLX, no psutil (docs/architecture.md, Start-up)."""
    import subprocess
    import sys

    code = (
        "import sys; from ftctl.cli.main import main; rc = main(['status', '--home', sys.argv[1]]);"
        "print('\\n'.join(sorted(m for m in sys.modules)), file=sys.stderr)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(ws)], capture_output=True, text=True, timeout=60
    )
    loaded = set(p.stderr.split())
    assert p.returncode == 0 and "ftctl.cli.jobs" in loaded, p.stderr[-2000:]
    for never in (
        "ftctl.cli.daemon",
        "ftctl.cli.setup",
        "ftctl.cli.views",
        "ftctl.cli.crashes",
        "ftctl.control.daemon",
        "ftctl.control.submit",
        "mlx",
        "psutil",
    ):
        assert never not in loaded, never


def test_every_user_error_has_the_one_base_and_is_said_in_its_parts(ws, capsys):
    """The CLI catches events.errors.UserError (no list of class names): every error a user can act
    on derives from it, and is printed as what happened, what was kept, what to do (--json: the parts)."""
    import importlib

    from ftctl.events.errors import UserError

    for module, name in (
        ("ftctl.control.consolidation", "ConsolidationRefused"),
        ("ftctl.control.daemon", "DaemonError"),
        ("ftctl.control.demo", "DemoRefused"),
        ("ftctl.control.recover", "DaemonRunning"),
        ("ftctl.adapters.workspace", "WorkspaceError"),
        ("ftctl.core.config", "ConfigError"),
        ("ftctl.core.machine", "IllegalTransition"),
        ("ftctl.events.journal", "JournalError"),
        ("ftctl.control.submit", "SubmitError"),
        ("ftctl.core.state", "ReplayError"),
        ("ftctl.control.service", "ServiceError"),
        ("ftctl.control.reproduce", "ReproduceRefused"),
        ("ftctl.control.models", "ModelRefused"),
        ("ftctl.control.evaluate", "EvalRefused"),
        ("ftctl.control.lora", "LoraRefused"),
    ):
        assert issubclass(getattr(importlib.import_module(module), name), UserError), name
    main_src = (ROOT / "cli" / "main.py").read_text()
    assert "except UserError" in main_src and "Refused" not in main_src
    code, out, err = run(capsys, "replay", "1", "--to", "5", "--json", "--home", ws)
    assert code == 1 and "error:" in err
    body = json.loads(out)
    assert body["exit"] == 1 and set(body) >= {"error", "what", "kept", "do"}, body
    code, _, err = run(capsys, "pause", "1", "--home", ws)  # no job 1 in an empty workspace
    assert code == 1 and "error: no job '1'" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "--port", "99999"], "argument --port: '99999' is not a TCP port"),
        (["serve", "--port", "-1"], "argument --port: '-1' is not a TCP port"),
        (["start", "--serve", "--port", "65536"], "argument --port: '65536' is not a TCP port"),
        (["shutdown", "--wait", "nan"], "argument --wait: 'nan' is not a number of seconds"),
        (["shutdown", "--wait", "-5"], "argument --wait: '-5' is not a number of seconds"),
        (["shutdown", "--wait", "inf"], "argument --wait: 'inf' is not a number of seconds"),
        (["history", "-n", "-3"], "'-3' is not a number of events"),
        (["replay", "1", "--to", "x"], "argument --to: invalid int value"),
        (["reproduce", "1", "--crash", "1.5"], "argument --crash: invalid int value"),
        (["metrics", "1", "--since", "x"], "argument --since: invalid int value"),
        (["demo", "--kill-at", "x"], "argument --kill-at: invalid int value"),
    ],
)
def test_every_numeric_option_out_of_range_is_a_user_error(ws, capsys, argv, expected):
    """`ftctl serve --port 99999` was an internal error (OverflowError from bind, exit 2): every
    numeric option is checked by the parser, a bad value is one clear line and exit 1."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--home", str(ws)])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 1 and expected in err, err
    assert "internal error" not in err and not (ws / "logs" / "internal-errors.log").exists()


@pytest.mark.parametrize(
    "argv",
    [["reproduce", "1", "--crash", "99999999999999999999999"], ["replay", "1", "--to", "-1"]],
)
def test_huge_or_negative_numbers_that_parse_are_refused_by_the_command(ws, tmp_path, capsys, argv):
    run(capsys, "submit", write(tmp_path / "d.jsonl", [chat(i) for i in range(40)]), "--home", ws)
    code, _, err = run(capsys, *argv, "--home", ws)
    assert code == 1 and "internal error" not in err, err


def test_examples_longer_than_max_seq_length_are_counted_and_recorded(
    ws, tmp_path, capsys, monkeypatch
):
    """A long line was cut to max_seq_length without a word: submit counts the examples cut (with
    the model's own tokenizer) and by how much, and the job records the warning."""
    from ftctl.adapters import batches

    calls = []
    count = batches.token_lengths
    monkeypatch.setattr(
        batches, "token_lengths", lambda *a, **k: calls.append(len(a[1])) or count(*a, **k)
    )
    short = write(tmp_path / "short.jsonl", [chat(i) for i in range(40)])
    code, _, err = run(capsys, "submit", short, "--set", "max_seq_length=160", "--home", ws)
    assert code == 0 and "max_seq_length" not in err and calls == []  # no tokenizer for short lines
    lines = [chat(i) for i in range(40)]
    lines[4] = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "q " + "seven " * 3000},
                {"role": "assistant", "content": "a"},
            ]
        }
    )
    long = write(tmp_path / "long.jsonl", lines)
    code, out, err = run(capsys, "submit", long, "--set", "max_seq_length=160", "--home", ws)
    assert code == 0 and calls == [1]  # only the line long enough to reach the limit
    m = re.search(
        r"long\.jsonl: 1 of 40 examples are longer than max_seq_length = 160 tokens and are cut to "
        r"it \(lines 5; the longest, line 5, has ([\d,]+) tokens; ([\d,]+) tokens in all are never "
        r"trained on or scored\): raise max_seq_length",
        err,
    )
    assert m, err
    most, cut = (int(x.replace(",", "")) for x in m.groups())
    assert most > 3000 and cut == most - 160
    job = json.loads(run(capsys, "status", "2", "--json", "--home", ws)[1])
    assert any("are longer than max_seq_length = 160 tokens" in w for w in job["warnings"])


def test_a_validation_file_that_is_the_training_file_is_refused(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    copy = write(tmp_path / "copy.jsonl", [chat(i) for i in range(40)])  # another name, same bytes
    for valid in (data, copy):
        code, _, err = run(capsys, "submit", data, "--valid", valid, "--home", ws)
        assert code == 1 and "is the training file d.jsonl itself (the same sha256)" in err, err
        assert "Nothing was queued" in err and "leave --valid out" in err
    assert not json.loads(run(capsys, "status", "--json", "--home", ws)[1])["jobs"]


def test_a_validation_file_of_another_format_or_sharing_lines_is_warned_about(ws, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    text = write(tmp_path / "t.jsonl", [json.dumps({"text": f"q{i} a{i}"}) for i in range(10)])
    code, _, err = run(capsys, "submit", data, "--valid", text, "--home", ws)
    assert code == 0 and "validation file: it is 'text' data, the training file 'chat'" in err
    assert "one is plain text, the other goes through the model's chat template" in err
    shared = write(tmp_path / "s.jsonl", [chat(i) for i in range(35, 45)])
    code, _, err = run(capsys, "submit", data, "--valid", shared, "--again", "--home", ws)
    assert code == 0 and "validation file: 5 of its 10 lines are also in the training file" in err
    assert "'text' data" not in err  # same format: no format warning
    job = json.loads(run(capsys, "status", "2", "--json", "--home", ws)[1])
    assert any("5 of its 10 lines are also in the training file" in w for w in job["warnings"])
