"""The workspace on disk: bad ftctl.yaml, bad --home, durable init, and the model-folder check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftctl.cli.main import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


@pytest.fixture
def ws(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    home = tmp_path / "home"
    assert run(capsys, "init", "--model", model, "--home", home)[0] == 0
    return home


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with file contents (None for folders); SQLite's -wal/-shm companions aside."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if not p.name.endswith(("-wal", "-shm"))
    }


# --------------------------------------------------------------------------- 1. ftctl.yaml syntax errors

BROKEN_YAML = "iters: 10\nlearning_rate: 1e-4\n  batch_size: 4\n"  # line 3: mapping values are not allowed here


@pytest.mark.parametrize("command", [["submit", "DATA"], ["config", "show"]])
def test_yaml_syntax_error_is_a_user_error(ws, tmp_path, capsys, command):
    (ws / "ftctl.yaml").write_text(BROKEN_YAML)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    before = tree(ws)
    code, _, err = run(capsys, *[str(data) if c == "DATA" else c for c in command], "--home", ws)
    assert code == 1, err
    assert "internal error" not in err
    assert str(ws / "ftctl.yaml") in err and "not valid YAML" in err
    assert "line 3" in err and "column" in err
    assert "Nothing was changed" in err and "fix" in err
    assert tree(ws) == before
    code, out, _ = run(capsys, "history", "--json", "--home", ws)
    assert code == 0 and json.loads(out) == []  # no event was committed


def test_yaml_not_a_mapping_is_a_user_error(ws, capsys):
    (ws / "ftctl.yaml").write_text("- just\n- a list\n")
    code, _, err = run(capsys, "config", "show", "--home", ws)
    assert code == 1 and "internal error" not in err
    assert "must be a mapping" in err and "a list" in err and "Nothing was changed" in err


def test_doctor_reports_yaml_syntax_error_as_a_finding(ws, capsys):
    (ws / "ftctl.yaml").write_text(BROKEN_YAML)
    code, out, err = run(capsys, "doctor", "--json", "--home", ws)
    assert code == 1, err
    assert "internal error" not in err
    config = [f for f in json.loads(out)["findings"] if f["check"] == "config"]
    assert len(config) == 1 and config[0]["severity"] == "error"
    assert "not valid YAML" in config[0]["message"] and "line 3" in config[0]["message"]


def test_yaml_error_names_where_an_unclosed_bracket_starts(ws, capsys):
    (ws / "ftctl.yaml").write_text("iters: 10\nlearning_rate: [1e-4,\nbatch_size: 4\n")
    code, _, err = run(capsys, "config", "show", "--home", ws)
    assert code == 1 and "at line 4, column 1" in err and "flow sequence that starts at line 2, column 16" in err
