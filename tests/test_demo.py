"""`ftctl demo`: it never deletes or trains into a folder it did not make, and every sentence it
prints about the kill and the comparison was checked against the journals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import sha256_file


def demo(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FTCTL_")}
    full.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "ftctl.cli", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
    )


def test_demo_refuses_folders_it_did_not_make_and_bad_kill_steps(tmp_path, ws):
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    before = {p: sha256_file(p) for p in ws.rglob("*") if p.is_file()}
    for home in (notes, ws):  # a plain folder of the user's, a real workspace
        p = demo(tmp_path, "--reset", "--home", str(home))
        err = " ".join(p.stderr.split())
        assert (
            p.returncode == 1 and "did not make" in err and "nothing was changed" in err.lower()
        ), p.stderr
    assert (notes / "notes.txt").read_text() == "my notes"
    assert {p: sha256_file(p) for p in ws.rglob("*") if p.is_file()} == before
    p = demo(tmp_path, "--kill-at", "1000", "--home", str(tmp_path / "new"))
    assert p.returncode == 1 and "--kill-at 1000" in p.stderr and not (tmp_path / "new").exists()


def test_demo_ignores_ftctl_home_and_every_rerun_proves_its_claims(tmp_path, ws):
    """README users export FTCTL_HOME=their workspace: the demo must not touch it. A second run
    without --reset kills its own new job again and compares like with like."""
    before = {p: sha256_file(p) for p in ws.rglob("*") if p.is_file()}
    for run in (1, 2):
        p = demo(
            tmp_path,
            *(["--reset"] if run == 1 else []),
            "--kill-at",
            "13",
            env={"FTCTL_HOME": str(ws)},
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr
        out = " ".join(p.stdout.split())
        assert (
            "killed at step 13 and resumed" in out
            and "identical, from the same data and config" in out
        ), out[-1500:]
        # section 3 says what it did (it printed nothing under its heading)
        three = out.split("3. the same job, never interrupted")[1].split("4. the journal")[0]
        assert re.search(
            r"job 0001 in \S+/reference: job \d{4}'s recorded config and the same data", three
        ) and re.search(r"job 0001 completed at step 40 in [\d.]+ s with no crash", three), three
        # progress lines give memory in MB below a GB, not "peak 0.00 GB"
        assert re.search(r"peak \d+(\.\d)? MB", out) and "0.00 GB" not in out
    # and logs/daemon.log says the same (it wrote "peak 0.00 GB" for a 4.8 MB peak)
    log = (tmp_path / "ftctl-demo" / "logs" / "daemon.log").read_text()
    assert re.search(r"tok/s  peak \d+(\.\d)? MB", log) and "0.00 GB" not in log, log[-1500:]
    assert (tmp_path / "ftctl-demo" / ".ftctl-demo").is_file()
    assert {p: sha256_file(p) for p in ws.rglob("*") if p.is_file()} == before


def test_the_demo_folder_is_ignored_by_git():
    """The README runs `ftctl demo` in the repository: ./ftctl-demo must not show up as untracked."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: nothing to ask git")
    p = subprocess.run(
        ["git", "check-ignore", "-q", "ftctl-demo/journal.db"], cwd=root, capture_output=True
    )
    assert p.returncode == 0, ".gitignore does not cover ftctl-demo/"
