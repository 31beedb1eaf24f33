"""`ftctl lora`: mlx_lm.lora's command line and config, read from the installed mlx-lm at test time,
and runs of it next to mlx_lm.lora's own on the demo model."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from helpers import history, survivors

from ftctl.core.config import MLX_LM_FILE_ONLY, ConfigError

ITERS = 12
# what both tools get from the -c file: small enough for CI, with dropout, warmup + cosine, checkpoints
CFG = {
    "batch_size": 2,
    "num_layers": -1,
    "max_seq_length": 96,
    "learning_rate": 5e-4,
    "steps_per_report": 4,
    "steps_per_eval": 6,
    "val_batches": 2,
    "save_every": 4,
    "seed": 5,
    "optimizer": "adamw",
    "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1},
    "lr_schedule": {"name": "cosine_decay", "warmup": 2, "arguments": [5e-4, 10, 1e-5]},
}
# ftctl's own keys beside them (mlx-lm ignores keys it does not know)
OWN = {
    "restart": {"max_restarts": 3, "window_s": 300.0, "backoff_s": 0.05, "backoff_max_s": 0.2},
    "timeouts": {"hang_s": 120.0, "eval_hang_s": 240.0, "stop_s": 60.0},
    "min_free_disk_gb": 0.01,
}


def _mlx_parser() -> argparse.ArgumentParser:
    from mlx_lm.lora import build_parser

    return build_parser()


def _ours() -> argparse.ArgumentParser:
    from ftctl.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["lora"]


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in p._actions if a.option_strings and a.dest != "help"}


def test_every_flag_of_the_installed_mlx_lm_parser_is_a_flag_of_ftctl_lora():
    """Read from mlx-lm at test time: a flag an mlx-lm upgrade adds fails here, not for a user."""
    from mlx_lm.utils import _parse_size

    from ftctl.cli.lora import size

    ours = _options(_ours())
    for opt, a in _options(_mlx_parser()).items():
        assert opt in ours, f"ftctl lora has no {opt} (mlx_lm.lora has)"
        b = ours[opt]
        assert b.option_strings == a.option_strings and b.dest == a.dest, opt
        assert type(b) is type(a), f"{opt}: {type(b).__name__}, mlx-lm {type(a).__name__}"
        assert b.choices == a.choices, opt
        if a.type is _parse_size:
            for text in ("0", "123", "500M", "1GB", "1.5G"):
                assert size(text) == _parse_size(text), text
        else:
            assert (b.type or str) == (a.type or str), opt  # no type: a string
        assert b.default is None  # given or not: the flag over the -c file over the defaults


# A value for every flag of the installed mlx-lm's parser (its dest: the config key), valid for both
# tools and none of them mlx-lm's default, so each one shows it went where it belongs.
FLAG_VALUES = {
    "model": "MODEL",
    "train": True,
    "data": "DATA",
    "fine_tune_type": "dora",
    "optimizer": "sgd",
    "mask_prompt": True,
    "num_layers": 1,
    "batch_size": 3,
    "iters": 33,
    "val_batches": -1,
    "learning_rate": 3e-4,
    "steps_per_report": 3,
    "steps_per_eval": 11,
    "grad_accumulation_steps": 1,
    "resume_adapter_file": "start.safetensors",
    "adapter_path": "out",
    "save_every": 11,
    "test": True,
    "test_batches": 7,
    "max_seq_length": 100,
    "grad_checkpoint": True,
    "clear_cache_threshold": 1_000_000,
    "report_to": "wandb",
    "project_name": "proj",
    "seed": 9,
    "trust_remote_code": True,
}


def _argv(values: dict) -> list[str]:
    out = []
    for opt, a in _options(_mlx_parser()).items():
        if a.dest not in values:
            continue
        v = values[a.dest]
        if isinstance(a, argparse._StoreTrueAction):
            out += [opt] if v else []
        else:
            out += [opt, str(v)]
    return out


def _mlx_lm_args(argv: list[str], config: Path | None) -> dict:
    """mlx_lm.lora's own reading of a command line (its main(), up to run()): the reference."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    args = vars(_mlx_parser().parse_args(argv + (["-c", str(config)] if config else [])))
    if config:
        for k, v in yaml.safe_load(config.read_text()).items():
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    return args


def _ftctl_config(tmp_path: Path, argv: list[str]):
    from ftctl.adapters.workspace import Workspace
    from ftctl.cli.lora import _flags
    from ftctl.control import lora

    args = _ours().parse_args(argv)
    ws = Workspace(tmp_path / "no-workspace-yet")
    return lora.resolve(ws, _flags(args), Path(args.config) if args.config else None, [])[0]


def test_a_run_that_will_not_train_dismisses_its_early_worker_before_scoring(tmp_path, monkeypatch):
    """`ftctl lora -c FILE --test` starts a worker before it reads the file (the file might say train);
    once the config says it will not train, the worker goes before the test set is scored, not after:
    its imports would compete with the scoring."""
    from ftctl.adapters.workspace import Workspace
    from ftctl.cli import lora as cli_lora

    conf = tmp_path / "cfg.yaml"
    conf.write_text(yaml.safe_dump({"model": str(tmp_path), "data": str(tmp_path)}))
    said = []

    class Spare:
        def dismiss(self):
            said.append("dismissed")

    monkeypatch.setattr(cli_lora, "_test_only", lambda ws, cfg: said.append("scored") or 0)
    args = _ours().parse_args(["--test", "-c", str(conf)])
    assert cli_lora._lora(args, Workspace(tmp_path / "ws"), Spare()) == 0
    assert said == ["dismissed", "scored"]


def _compare(cfg, mlx: dict, skip=()) -> None:
    """Every key mlx-lm resolved means the same in ftctl's config."""
    for key, value in mlx.items():
        if key in ("config", *skip):
            continue
        ours = getattr(cfg, key)
        if key == "lora_parameters" or (key == "lr_schedule" and value is not None):
            ours = {k: getattr(ours, k) for k in value}
        assert ours == value, f"{key}: ftctl {ours!r}, mlx-lm {value!r}"


def test_every_key_and_every_flag_means_what_it_means_in_mlx_lm(tmp_path):
    """The done-when test of issue 20: a -c file with every key of the installed mlx-lm's
    CONFIG_DEFAULTS (and the file-only keys), and a command line with every flag of its parser, both
    read from mlx-lm now; ftctl lora resolves each key as mlx_lm.lora does: flags over the file over
    the defaults."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    parser_keys = {a.dest for a in _options(_mlx_parser()).values()} - {"config"}
    assert parser_keys <= set(FLAG_VALUES), f"no test value for {parser_keys - set(FLAG_VALUES)}"
    # 1. the file alone, every key at a value of its own (file-only keys included)
    filed = {k: v for k, v in FLAG_VALUES.items() if k in CONFIG_DEFAULTS}
    filed.update(
        {
            "iters": 44,
            "optimizer_config": {"sgd": {"momentum": 0.5}, "adam": {}},
            "lr_schedule": {"name": "linear_schedule", "warmup": 1, "arguments": [1e-4, 1e-5, 30]},
            "lora_parameters": {
                "rank": 6,
                "dropout": 0.05,
                "scale": 8.0,
                "keys": ["self_attn.q_proj"],
            },
            "prompt_feature": "question",
            "completion_feature": "answer",
            "text_feature": "body",
            "chat_feature": "conversation",
            "config": None,
        }
    )
    missing = (set(CONFIG_DEFAULTS) | set(MLX_LM_FILE_ONLY)) - set(filed) - {"hf_dataset"}
    assert not missing, f"the file lacks {missing}"
    conf = tmp_path / "every.yaml"
    conf.write_text(yaml.safe_dump(filed))
    cfg = _ftctl_config(tmp_path, ["-c", str(conf)])
    _compare(cfg, _mlx_lm_args([], conf), skip=("trust_remote_code", "clear_cache_threshold"))
    # mlx-lm 0.32's parser gives these two flags defaults (False, 0) that shadow the file; ftctl reads
    # the file, as the precedence says (docs/mlx-lm.md)
    assert cfg.trust_remote_code is True and cfg.clear_cache_threshold == 1_000_000
    for key in ("prompt_feature", "completion_feature", "text_feature", "chat_feature"):
        assert getattr(cfg, key) == filed[key]
    # 2. every flag over that file: the flags win, key by key
    flags = {**FLAG_VALUES, "iters": 55, "seed": 11, "optimizer": "adam", "num_layers": 2}
    argv = _argv(flags) + ["-c", str(conf)]
    cfg = _ftctl_config(tmp_path, argv)
    _compare(cfg, _mlx_lm_args(_argv(flags), conf))
    assert (cfg.iters, cfg.seed, cfg.optimizer, cfg.num_layers) == (55, 11, "adam", 2)
    # 3. nothing given: mlx_lm.lora's defaults (what ftctl lora falls back to), and a hf_dataset file
    hf = tmp_path / "hf.yaml"
    hf.write_text(yaml.safe_dump({"hf_dataset": {"path": "org/set", "prompt_feature": "q"}}))
    cfg = _ftctl_config(tmp_path, ["-c", str(hf)])
    _compare(cfg, {k: v for k, v in _mlx_lm_args([], None).items() if k != "data"})
    assert cfg.data is None and cfg.hf_dataset.prompt_feature == "q"


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("lora_parameters: {rank: 0}\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        _ftctl_config(tmp_path, ["--train", "-c", str(conf)])
    assert str(e.value).startswith(
        f"{conf}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"
    )
    with pytest.raises(ConfigError) as e:
        _ftctl_config(tmp_path, ["--train", "--batch-size", "0"])
    assert str(e.value).startswith("the command line: batch_size = 0 is out of range")
    conf.write_text("config: other.yaml\n")
    with pytest.raises(ConfigError, match="is not followed"):
        _ftctl_config(tmp_path, ["--train", "-c", str(conf)])
    conf.write_text(f"config: {conf}\n")  # a file naming itself, as mlx-lm's example does: fine
    _ftctl_config(tmp_path, ["--train", "-c", str(conf)])


# --------------------------------------------------------------------------- runs on the demo model


@pytest.fixture(scope="module")
def data(demo, tmp_path_factory) -> Path:
    """mlx-lm's data layout: train.jsonl, valid.jsonl and test.jsonl in one folder."""
    d = tmp_path_factory.mktemp("data")
    lines = demo.train.read_text().splitlines(keepends=True)
    (d / "train.jsonl").write_text("".join(lines[:60]))
    shutil.copy(demo.valid, d / "valid.jsonl")
    (d / "test.jsonl").write_text("".join(lines[60:72]))
    return d


def _lora(cwd: Path, home: Path, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FTCTL_")}
    full.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "ftctl.cli", "lora", *args, "--home", str(home)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
    )


def _config(tmp_path: Path, **more) -> Path:
    conf = tmp_path / "cfg.yaml"
    conf.write_text(yaml.safe_dump({**CFG, **OWN, **more}))
    return conf


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapters.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(demo, data, tmp_path_factory):
    """`ftctl lora` run once, from a fresh start (the workspace made on first use), uninterrupted."""
    tmp = tmp_path_factory.mktemp("plain")
    argv = ["--model", str(demo.model_dir), "--train", "--test", "--data", str(data)]
    argv += ["--iters", str(ITERS), "-c", str(_config(tmp))]
    p = _lora(tmp, tmp / "ws", *argv)
    assert p.returncode == 0, p.stderr + p.stdout
    return types.SimpleNamespace(
        cwd=tmp, home=tmp / "ws", argv=argv, out=p, sha=_sha(tmp / "adapters")
    )


def test_ftctl_lora_and_mlx_lm_lora_both_finish_and_both_adapters_load(
    demo, data, uninterrupted, tmp_path
):
    """The same arguments to both tools; each writes adapters/ where it runs, in mlx-lm's layout."""
    import mlx_lm

    p = uninterrupted.out
    assert "Saved final weights to" in p.stdout and "job 0001 completed" in p.stdout, p.stdout
    # the worker that trained was started first thing, before the workspace existed: its imports
    # overlapped the config, the workspace's creation, the submission and the daemon's start
    # (control/standby.py early)
    log = (uninterrupted.home / "logs" / "daemon.log").read_text()
    assert log.index("standby worker started") < log.index("daemon started"), log
    # the spare's routine news is the log's, not the user's
    assert "standby worker started" not in p.stdout + p.stderr
    spare = re.search(r"standby worker started \(pid (\d+), before its workspace existed", log)
    trained = re.search(
        r"job 0001 \(\w+\): training, attempt 1, worker pid (\d+) \(the standby\)", log
    )
    assert spare and trained and spare[1] == trained[1], log
    assert "Test loss" in p.stdout and "base + adapter of job 0001" in p.stdout  # like `ftctl eval`
    j = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ftctl.cli",
                "status",
                "0001",
                "--json",
                "--home",
                str(uninterrupted.home),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert j["exported_to"] == str(uninterrupted.cwd / "adapters") and j["lineage"] == "lora-0001"
    assert (
        j["last_eval"]["data_path"].endswith("data/test.jsonl")
        and j["last_eval"]["adapter_loss"] > 0
    )
    assert j["last_eval"]["examples"] == 12
    assert (
        json.loads((uninterrupted.cwd / "adapters" / "adapter_config.json").read_text())[
            "num_layers"
        ]
        == -1
    )
    mine = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", *uninterrupted.argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert "Test loss" in mine.stdout
    for where in (uninterrupted.cwd, tmp_path):
        model, tok = mlx_lm.load(str(demo.model_dir), adapter_path=str(where / "adapters"))
        text = mlx_lm.generate(model, tok, prompt="What is 2 plus 3?", max_tokens=2)
        assert isinstance(text, str)


def test_a_worker_killed_mid_run_and_a_ctrl_c_both_end_bit_exact(
    demo, data, uninterrupted, tmp_path
):
    """The same command: its worker SIGKILLed at step 5 (the daemon restarts it from its checkpoint),
    then Ctrl-C at the job's next checkpoint (exit 130, 'run the same command again'), then the same
    command again: it resumes the same job and ends with the uninterrupted run's adapter, bit for bit.
    `train: true` is in the -c file here instead of --train (as in mlx-lm's example configs)."""
    argv = [a for a in uninterrupted.argv if a != "--train"]
    argv[argv.index("-c") + 1] = str(_config(tmp_path, train=True))
    home = tmp_path / "ws"
    marker = tmp_path / "killed"
    p = subprocess.Popen(
        [sys.executable, "-m", "ftctl.cli", "lora", *argv, "--home", str(home)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("FTCTL_")},
            "FTCTL_CRASH_AT": f"mid_step:5:{marker}",
        },
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:  # Ctrl-C once the restart checkpointed
        if any(
            e["data"]["checkpoint"]["step"] >= 8 for e in _polled(home, "checkpoint_committed.v2")
        ):
            p.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    out, err = p.communicate(timeout=240)
    assert marker.exists(), err  # the kill happened
    if p.returncode == 130:  # stopped before the end: resumed by the same command
        assert "run the same command again to resume it" in err, err
        again = _lora(tmp_path, home, *argv)
        assert (
            again.returncode == 0 and "resumed: an earlier run of this command" in again.stdout
        ), again.stderr
    else:  # the run ended before the Ctrl-C landed (a slow machine): still the same bytes
        assert p.returncode == 0, err
    crashed = _events(home, "crashed")
    assert len(crashed) == 1 and crashed[0]["data"]["category"] == "killed"
    assert _sha(tmp_path / "adapters") == uninterrupted.sha
    assert len(_events(home, "job_submitted")) == 1  # one job, resumed: never queued twice
    assert survivors(home) == []
    # its first worker was started before the -c file was read and the workspace existed
    log = (home / "logs" / "daemon.log").read_text()
    spare = re.search(r"standby worker started \(pid (\d+), before its workspace existed", log)
    trained = re.search(r"job 0001 \(\w+\): training, attempt 1, worker pid (\d+)", log)
    assert spare and trained and spare[1] == trained[1], log


def _polled(home: Path, kind: str) -> list[dict]:
    """_events while the run may still be creating its workspace (a journal not there yet: none)."""
    try:
        return _events(home, kind)
    except AssertionError:
        return []


def _events(home: Path, kind: str) -> list[dict]:
    if not (home / "journal.db").exists():
        return []
    return [e for e in history(home) if e["type"] == kind]


def test_the_same_command_after_completion_is_the_result_not_a_second_run(uninterrupted):
    p = _lora(uninterrupted.cwd, uninterrupted.home, *uninterrupted.argv)
    assert p.returncode == 0 and "already trained this" in p.stdout, p.stderr
    assert len(_events(uninterrupted.home, "job_submitted")) == 1


def test_test_without_train_scores_the_adapter_and_records_it_on_its_job(uninterrupted, data, demo):
    argv = [
        "--model",
        str(demo.model_dir),
        "--test",
        "--data",
        str(data),
        "-c",
        str(uninterrupted.cwd / "cfg.yaml"),
    ]
    p = _lora(uninterrupted.cwd, uninterrupted.home, *argv)
    assert p.returncode == 0, p.stderr
    assert "Test loss" in p.stdout and "recorded as event" in p.stdout
    evaluated = _events(uninterrupted.home, "adapter_evaluated")
    assert (
        len(evaluated) == 2
        and evaluated[0]["data"]["adapter_loss"] == evaluated[1]["data"]["adapter_loss"]
    )


def test_wrong_input_is_refused_before_anything_is_queued(demo, data, tmp_path):
    base = [
        "--model",
        str(demo.model_dir),
        "--train",
        "--data",
        str(data),
        "--max-seq-length",
        "96",
    ]
    p = _lora(tmp_path, tmp_path / "ws", *base, "--num-layers", "16")
    assert p.returncode == 1 and "num_layers = 16, but the model has 2 layers" in p.stderr, p.stderr
    p = _lora(tmp_path, tmp_path / "ws", *base, "--num-layers", "2", "--data", str(tmp_path))
    assert p.returncode == 1 and "without train.jsonl" in p.stderr, p.stderr
    p = _lora(tmp_path, tmp_path / "ws", "--model", str(demo.model_dir), "--data", str(data))
    assert p.returncode == 1 and "needs --train or --test" in p.stderr
    p = _lora(tmp_path, tmp_path / "ws", *base, "--num-lyers", "2")
    assert p.returncode == 1 and "did you mean '--num-layers'" in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("blas_threads: -1\n")
    p = _lora(tmp_path, tmp_path / "ws-bad", *base, "--num-layers", "2", "-c", str(bad))
    assert p.returncode == 1 and p.stderr.splitlines() == [
        f"error: {bad}: blas_threads = -1 is out of range: must be an integer >= 0",
        f"  kept: nothing was queued or written (no workspace was created at {tmp_path / 'ws-bad'})",
        f"  next: correct blas_threads in {bad} and run the command again",
    ], p.stderr
    assert not (tmp_path / "ws-bad").exists()
    p = _lora(tmp_path, tmp_path / "ws", *base, "--batch-size", "200", "--num-layers", "2")
    assert p.returncode == 1 and "fewer than batch_size = 200" in p.stderr, p.stderr
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapters.safetensors").write_bytes(b"mlx-lm's")
    p = _lora(tmp_path, tmp_path / "ws", *base, "--num-layers", "2")
    assert p.returncode == 1 and "ftctl never replaces what it did not write" in p.stderr
    assert (tmp_path / "adapters" / "adapters.safetensors").read_bytes() == b"mlx-lm's"
    p = _lora(
        tmp_path,
        tmp_path / "ws",
        *base,
        "--num-layers",
        "2",
        "--report-to",
        "wandb",
        "--adapter-path",
        "x",
    )
    if p.returncode == 1:  # wandb is not installed here: refused, naming the package
        assert "report_to: wandb needs the wandb package" in p.stderr
    assert not _events(tmp_path / "ws", "job_submitted")
    from helpers import stray_workers

    assert stray_workers(tmp_path / "ws") == []  # a spare started for a refused run is dismissed


def test_under_a_running_daemon_the_job_is_followed_to_the_same_bytes(
    demo, data, uninterrupted, tmp_path
):
    """A daemon already runs on the workspace: `ftctl lora` submits, follows that daemon's training of
    the job from the journal, and ends with the uninterrupted run's adapter."""
    from helpers import daemon, ftctl

    home = tmp_path / "ws"
    ftctl(home, "init", "--model", str(demo.model_dir))
    d = daemon(home)
    try:
        argv = list(uninterrupted.argv)
        argv[argv.index("-c") + 1] = str(_config(tmp_path))
        p = _lora(tmp_path, home, *argv)
        assert p.returncode == 0 and "following job 0001" in p.stdout, p.stderr + p.stdout
        assert _sha(tmp_path / "adapters") == uninterrupted.sha
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=60)
