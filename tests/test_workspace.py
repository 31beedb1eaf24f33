"""The workspace on disk: bad ftctl.yaml, bad --home, durable init, and the model-folder check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import run


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
    assert (
        code == 1
        and "at line 4, column 1" in err
        and "flow sequence that starts at line 2, column 16" in err
    )


# --------------------------------------------------------------------------- 2. a bad --home for init


def test_init_home_is_a_file(tmp_path, capsys, demo):
    home = tmp_path / "notes.txt"
    home.write_text("my notes\n")
    before = tree(tmp_path)
    code, _, err = run(capsys, "init", "--model", demo.model_dir, "--home", home)
    assert code == 1 and "internal error" not in err
    assert (
        f"{home} is a file, not a folder" in err
        and "Nothing was changed" in err
        and "--home" in err
    )
    assert tree(tmp_path) == before and home.read_text() == "my notes\n"


def test_init_home_under_a_file(tmp_path, capsys, demo):
    parent = tmp_path / "notes.txt"
    parent.write_text("my notes\n")
    before = tree(tmp_path)
    code, _, err = run(capsys, "init", "--model", demo.model_dir, "--home", parent / "sub" / "ws")
    assert code == 1 and "internal error" not in err
    assert (
        f"cannot create {parent / 'sub' / 'ws'}" in err
        and f"{parent} is a file, not a folder" in err
    )
    assert "Nothing was changed" in err and "--home" in err
    assert tree(tmp_path) == before


def test_init_home_under_proc(tmp_path, capsys, demo):
    code, _, err = run(capsys, "init", "--model", demo.model_dir, "--home", "/proc/ftctl-test-ws")
    assert code == 1 and "internal error" not in err
    assert (
        "cannot create /proc/ftctl-test-ws: " in err
        and "Nothing was changed" in err
        and "--home" in err
    )
    assert not Path("/proc/ftctl-test-ws").exists()


def test_init_failing_part_way_removes_only_the_folders_it_created(
    tmp_path, capsys, monkeypatch, demo
):
    from ftctl.adapters import workspace

    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "mine.txt").write_text("keep me\n")
    before = tree(tmp_path)
    real = workspace.write_private

    def full_disk(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(workspace, "write_private", full_disk)
    code, _, err = run(capsys, "init", "--model", demo.model_dir, "--home", keep / "a" / "b")
    assert code == 1 and "internal error" not in err
    assert "No space left on device" in err and "Nothing was changed" in err
    # a/ and a/b/ and the workspace folders are gone; mine.txt stays
    assert tree(tmp_path) == before

    # and into an existing folder: it stays, with its file, and keeps its mode
    keep.chmod(0o755)
    code, _, err = run(capsys, "init", "--model", demo.model_dir, "--home", keep)
    assert code == 1 and tree(tmp_path) == before and keep.stat().st_mode & 0o777 == 0o755
    monkeypatch.setattr(workspace, "write_private", real)
    assert run(capsys, "init", "--model", demo.model_dir, "--home", keep)[0] == 0
    assert (keep / "mine.txt").read_text() == "keep me\n"


# --------------------------------------------------------------------------- 3. init writes durably


@pytest.fixture
def synced(monkeypatch) -> set[Path]:
    """The paths os.fsync was called on, from now on; a synced temp file renamed over a path counts for it."""
    paths: set[Path] = set()
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        paths.add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def renamer(real):
        def rename(src, dst, *a, **kw):
            real(src, dst, *a, **kw)
            if Path(os.path.abspath(src)) in paths:
                paths.add(Path(os.path.abspath(dst)))

        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return paths


def test_init_demo_fsyncs_every_file_and_folder_it_creates(tmp_path, capsys, synced):
    home = tmp_path / "a" / "home"
    code, out, err = run(capsys, "init", "--demo", "--home", home)
    assert code == 0, err
    created = [home.parent, *home.parent.rglob("*")]
    assert {p for p in created if p.is_file()} >= {
        home / "ftctl.yaml",
        home / "journal.db",
        home / "demo" / "model" / "model.safetensors",
        home / "demo" / "model" / "tokenizer.json",
        home / "demo" / "data" / "train.jsonl",
    }
    not_synced = [str(p) for p in created if p not in synced]
    assert not not_synced
    assert tmp_path in synced  # the parent of the first folder init created
    assert not [p for p in created if ".tmp" in p.name]


def test_build_demo_and_init_workspace_fsync_everything(tmp_path, synced):
    from ftctl.adapters.demo import build_demo
    from ftctl.adapters.workspace import init_workspace

    paths = build_demo(tmp_path / "demo")
    init_workspace(tmp_path / "ws", str(paths.model_dir))
    created = list(tmp_path.rglob("*"))
    assert len(created) > 15
    assert [str(p) for p in created if p not in synced] == [] and tmp_path in synced


def test_init_demo_with_a_bad_home_is_a_user_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes\n")
    before = tree(tmp_path)
    code, _, err = run(capsys, "init", "--demo", "--home", tmp_path / "notes.txt" / "ws")
    assert code == 1 and "internal error" not in err
    assert (
        f"{tmp_path / 'notes.txt'} is a file, not a folder" in err and "Nothing was changed" in err
    )
    assert tree(tmp_path) == before


def test_demo_failing_part_way_removes_what_it_created(tmp_path, capsys, monkeypatch):
    from ftctl.adapters import demo

    def full_disk(model_dir, *a):
        (model_dir / "model.safetensors").write_bytes(b"\0" * 10)  # as if half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "_save_model", full_disk)
    code, _, err = run(capsys, "init", "--demo", "--home", tmp_path / "ws")
    assert code == 1 and "internal error" not in err
    assert (
        f"cannot create {tmp_path / 'ws' / 'demo'}: No space left on device" in err
        and "Nothing was changed" in err
    )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4. is a folder a loadable model?


@pytest.fixture
def model(demo, tmp_path) -> Path:
    """A copy of the demo model, to break."""
    return Path(shutil.copytree(demo.model_dir, tmp_path / "m"))


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])


def _shard_index(m: Path, shards: list[str]) -> None:
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}})
    )


BROKEN = {
    "config.json missing": (lambda m: (m / "config.json").unlink(), "{m} has no config.json"),
    "config.json empty": (
        lambda m: (m / "config.json").write_text(""),
        "config.json in {m} is empty or not valid JSON (Expecting value",
    ),
    "config.json bad": (
        lambda m: (m / "config.json").write_text('{"model_type": '),
        "config.json in {m} is empty or not valid JSON (",
    ),
    "config.json a list": (
        lambda m: (m / "config.json").write_text("[1]"),
        "config.json in {m} is not a JSON object",
    ),
    "no model_type": (
        lambda m: (m / "config.json").write_text('{"hidden_size": 64}'),
        'config.json in {m} has no "model_type"',
    ),
    "no weights": (
        lambda m: (m / "model.safetensors").unlink(),
        "{m} has no *.safetensors weights (convert a Hugging Face model with mlx_lm.convert)",
    ),
    "gguf only": (
        lambda m: (m / "model.safetensors").rename(m / "smol.Q4_1.gguf"),
        "{m} has no *.safetensors weights, only GGUF (smol.Q4_1.gguf), which mlx_lm.load cannot read",
    ),
    "adapters only": (
        lambda m: (m / "model.safetensors").rename(m / "adapters.safetensors"),
        "but none named model*.safetensors",
    ),
    "weights empty": (
        lambda m: (m / "model.safetensors").write_bytes(b""),
        "{m}/model.safetensors is empty",
    ),
    "weights truncated": (
        lambda m: _truncate(m / "model.safetensors"),
        "{m}/model.safetensors is truncated:",
    ),
    "weights garbage": (
        lambda m: (m / "model.safetensors").write_bytes(b"GGUF" + b"\0" * 100),
        "{m}/model.safetensors is truncated or not a safetensors file",
    ),
    "shard missing": (
        lambda m: _shard_index(m, ["model.safetensors", "model-00002-of-00002.safetensors"]),
        "{m} lacks 1 of the 2 weight shards model.safetensors.index.json lists: model-00002-of-00002.safetensors",
    ),
    "index bad": (
        lambda m: (m / "model.safetensors.index.json").write_text("{"),
        "model.safetensors.index.json in {m} is empty or not valid JSON",
    ),
    "no tokenizer": (
        lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        "{m} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)",
    ),
    "tokenizer empty": (
        lambda m: (m / "tokenizer.json").write_text(""),
        "tokenizer.json in {m} is empty",
    ),
}


def test_demo_model_is_a_model(demo):
    from ftctl.adapters.model import model_problem

    assert model_problem(demo.model_dir) is None
    assert model_problem(str(demo.model_dir)) is None


def test_sharded_model_with_every_shard_is_a_model(model):
    from ftctl.adapters.model import model_problem

    _shard_index(model, ["model.safetensors"])
    assert model_problem(model) is None


@pytest.mark.parametrize("case", BROKEN)
def test_broken_model_folder_names_the_problem(model, case):
    from ftctl.adapters.model import model_problem

    breaks, expected = BROKEN[case]
    breaks(model)
    reason = model_problem(model)
    assert reason is not None and "\n" not in reason
    assert expected.format(m=model) in reason, reason


def test_not_a_model_folder(tmp_path, demo):
    from ftctl.adapters.model import model_problem

    assert model_problem(tmp_path / "nope") == f"{tmp_path / 'nope'} does not exist"
    f = demo.model_dir / "model.safetensors"
    assert model_problem(f) == f"{f} is a file, not a model folder"
    assert model_problem(tmp_path).startswith(f"{tmp_path} has no config.json")
    (tmp_path / "smol.gguf").write_bytes(b"GGUF")
    assert "a GGUF file" in model_problem(tmp_path / "smol.gguf")


# --------------------------------------------------------------------------- a key given twice


def test_a_key_given_twice_is_refused_with_both_lines(ws, tmp_path, capsys):
    text = (ws / "ftctl.yaml").read_text()
    lines = text.splitlines()
    first = next(i for i, l in enumerate(lines, 1) if l.startswith("iters:"))
    (ws / "ftctl.yaml").write_text(text + "iters: 7\n")
    second = len(lines) + 1
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    for command in (["config", "show"], ["submit", str(data)]):
        code, _, err = run(capsys, *command, "--home", ws)
        assert code == 1 and "internal error" not in err, err
        assert f"ftctl.yaml: key 'iters' is given twice (lines {first} and {second})" in err
        assert "nothing was changed" in err and "keep one" in err
    code, out, _ = run(capsys, "history", "--json", "--home", ws)
    assert json.loads(out) == []


def test_a_nested_key_given_twice_is_refused(ws, capsys):
    (ws / "ftctl.yaml").write_text(
        "model: m\nlora_parameters:\n  rank: 8\n  scale: 10.0\n  rank: 16\n"
    )
    code, _, err = run(capsys, "config", "show", "--home", ws)
    assert code == 1 and "key 'rank' is given twice (lines 3 and 5)" in err


def test_init_submit_and_doctor_check_that_the_model_loads(tmp_path, capsys, ws, demo):
    """A model path that does not exist (or is a file, or a folder without weights) is refused at
    init and submit, with nothing created or queued, and doctor reports it."""
    empty = tmp_path / "empty-model"
    empty.mkdir()
    for bad in (tmp_path / "nope", empty, demo.train):
        code, _, err = run(capsys, "init", "--model", bad, "--home", tmp_path / "ws-bad")
        assert (
            code == 1 and "nothing was created" in err.lower() and "mlx-lm model folder" in err
        ), err
        assert not (tmp_path / "ws-bad").exists()
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(30)) + "\n")
    code, _, err = run(
        capsys, "submit", data, "--set", f"model={empty}", "--lineage", "other", "--home", ws
    )
    assert code == 1 and "the base model cannot load" in err and "nothing was queued" in err, err
    assert run(capsys, "history", "--json", "--home", ws)[1].strip() == "[]"
    assert run(capsys, "submit", data, "--home", ws)[0] == 0
    (ws / "ftctl.yaml").write_text(
        (ws / "ftctl.yaml").read_text().replace(str(demo.model_dir), str(empty))
    )
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    models = [f for f in json.loads(out)["findings"] if f["check"] == "model"]
    assert (
        code == 1 and models[0]["severity"] == "error" and "safetensors" in models[0]["message"]
    ), models
