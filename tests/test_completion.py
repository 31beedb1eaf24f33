"""`ftctl completion`: the bash script, sourced in a real bash with COMP_WORDS set, completes
subcommands, options, option values and job ids (read live by the hidden `ftctl _jobs`, which loads
no MLX); the zsh and fish scripts pass their shell's syntax check where that shell is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run

from ftctl.adapters.workspace import init_workspace
from ftctl.control.ledger import Ledger
from ftctl.control.submit import submit


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    from ftctl.cli.completion import SHELLS
    from ftctl.cli.main import build_parser

    d = tmp_path_factory.mktemp("completion")
    for shell, make in SHELLS.items():
        (d / shell).write_text(make(build_parser()))
    return d


@pytest.fixture(scope="module")
def jobs_home(tmp_path_factory, demo):
    """A workspace with two submitted jobs, and a bin/ftctl that runs this checkout's ftctl."""
    tmp = tmp_path_factory.mktemp("jobs")
    ws = init_workspace(tmp / "ws", str(demo.model_dir))
    data = demo.train
    ledger = Ledger(ws.open_journal())
    for name in ("a", "b"):
        submit(ws, ledger, data, name=name, again=True)
    ledger.close()
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "ftctl").write_text(f'#!/bin/sh\nexec {sys.executable} -m ftctl.cli "$@"\n')
    (bin_dir / "ftctl").chmod(0o755)
    return ws.home, bin_dir


def complete(script: Path, words: list[str], bin_dir: Path | None = None) -> list[str]:
    """What bash offers for the last word of ``words`` (the line typed so far)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = (
        f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
        "_ftctl; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin" if bin_dir else "/usr/bin:/bin",
        "HOME": "/nonexistent",
    }
    p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    return [w for w in p.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_values(scripts):
    b = scripts / "bash"
    assert {"submit", "status", "service", "completion", "doctor"} <= set(
        complete(b, ["ftctl", ""])
    )
    assert set(complete(b, ["ftctl", "st"])) == {"status", "start"}
    assert set(complete(b, ["ftctl", "service", ""])) == {"install", "uninstall", "status"}
    assert {"--print", "--system", "--platform", "--json", "--help"} <= set(
        complete(b, ["ftctl", "service", "install", "--"])
    )
    assert complete(b, ["ftctl", "service", "install", "--platform", ""]) == ["linux", "macos"]
    assert set(complete(b, ["ftctl", "status", "--state", "fa"])) == {"failed"}
    assert complete(b, ["ftctl", "completion", "f"]) == ["fish"]
    assert "_jobs" not in complete(b, ["ftctl", "_"])  # the helper stays hidden


def test_bash_completes_job_ids_live(scripts, jobs_home):
    home, bin_dir = jobs_home
    b = scripts / "bash"
    assert complete(b, ["ftctl", "status", "--home", str(home), ""], bin_dir) == ["0001", "0002"]
    assert complete(b, ["ftctl", "pause", "--home", str(home), "0002"], bin_dir) == ["0002"]
    assert complete(b, ["ftctl", "lineage", "set-head", "--home", str(home), "0"], bin_dir) == [
        "0001",
        "0002",
    ]
    # quietly nothing
    assert complete(b, ["ftctl", "status", "--home", str(home / "nowhere"), ""], bin_dir) == []
    # --home=DIR: bash splits it at '=' (COMP_WORDBREAKS), or it arrives whole
    assert complete(b, ["ftctl", "--home", "=", str(home), "pause", ""], bin_dir) == [
        "0001",
        "0002",
    ]
    assert complete(b, ["ftctl", "resume", f"--home={home}", ""], bin_dir) == ["0001", "0002"]
    # directories after --home=
    assert str(home) in complete(b, ["ftctl", "--home", "=", str(home)[:-1]], bin_dir)


def test_fish_completes_job_ids_after_home_in_both_spellings(scripts, jobs_home):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed here")
    home, bin_dir = jobs_home
    for line in (f"ftctl pause --home {home} ", f"ftctl pause --home={home} "):
        p = subprocess.run(
            ["fish", "-c", f"source {scripts / 'fish'}; complete -C '{line}'"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/nonexistent"},
        )
        assert {l.split("\t")[0] for l in p.stdout.splitlines()} >= {"0001", "0002"}, (
            line,
            p.stdout + p.stderr,
        )


def test_the_jobs_helper_is_quick_and_imports_no_mlx(jobs_home, capsys):
    home, _ = jobs_home
    code = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ftctl.cli", "_jobs", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert code.returncode == 0 and code.stdout.split() == ["0001", "0002"]
    assert not any(
        f" {m}" in code.stderr for m in ("mlx", "mlx_lm", "transformers", "psutil", "rich")
    )
    assert run(capsys, "_jobs", "--home", home / "nowhere") == (1, "", "")


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_parse(scripts, shell):
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed here")
    p = subprocess.run(
        [exe, "-n", str(scripts / shell)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr


def test_the_bash_script_parses(scripts):
    p = subprocess.run(
        ["bash", "-n", str(scripts / "bash")], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr


def test_zsh_and_fish_offer_the_service_subcommands(scripts):
    """Beyond syntax: the scripts complete, as bashcompinit (sh emulation) and fish's `complete -C` run them."""
    if shutil.which("zsh"):
        prog = (
            f"source {scripts / 'zsh'}; f() {{ emulate -L sh; COMP_WORDS=(ftctl service ''); COMP_CWORD=2; _ftctl; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"; }; f"
        )
        p = subprocess.run(
            ["zsh", "-c", prog],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert set(p.stdout.split()) == {"install", "uninstall", "status"}, p.stdout + p.stderr
    if shutil.which("fish"):
        p = subprocess.run(
            ["fish", "-c", f"source {scripts / 'fish'}; complete -C 'ftctl service '"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )
        assert {l.split("\t")[0] for l in p.stdout.splitlines()} == {
            "install",
            "uninstall",
            "status",
        }, p.stdout + p.stderr
    if not (shutil.which("zsh") or shutil.which("fish")):
        pytest.skip("neither zsh nor fish is installed here")
