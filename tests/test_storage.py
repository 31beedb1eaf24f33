"""A read-only file system, a permission denied, a full disk and a damaged journal are four causes with
four remedies: every command names the real one, and "restore from a backup" (advice that would overwrite
a good journal) is given only when the journal's own checks say it is damaged. Real mounts where the
machine allows them (root: a bind mount remounted read-only, a tiny tmpfs, another uid), else a seam."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import ftctl, make_workspace

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def submitted(tmp_path, demo):
    home = make_workspace(tmp_path / "ws", demo.model_dir)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    return home


@pytest.fixture
def read_only(submitted, tmp_path, monkeypatch):
    """The workspace on a read-only file system: a bind mount remounted read-only where this machine
    lets us mount; else the seam (statvfs says ST_RDONLY, in this process only)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if ROOT and _mount("--bind", str(submitted), str(mnt)):
        if _mount("-o", "remount,ro,bind", str(mnt)):
            yield mnt, True
            subprocess.run(["umount", str(mnt)], check=False)
            return
        subprocess.run(["umount", str(mnt)], check=False)
    from ftctl.events import journal

    real = os.statvfs

    class Vfs:
        def __init__(self, v):
            self.f_flag, self.f_bavail, self.f_frsize = (
                v.f_flag | os.ST_RDONLY,
                v.f_bavail,
                v.f_frsize,
            )

    monkeypatch.setattr(
        journal.os,
        "statvfs",
        lambda p: Vfs(real(p)) if str(p).startswith(str(submitted)) else real(p),
    )
    yield submitted, False


WRITERS = [
    ["submit", "TRAIN", "--again"],
    ["start", "--until-idle"],
    ["recover"],
    ["recover", "--dry-run"],
    ["pause", "1"],
    ["retry", "1", "--set", "iters=5"],
    ["consolidate"],
    ["doctor", "--fix"],
]
READERS = [["status"], ["status", "--json"], ["history"], ["crashes"], ["doctor"], ["status", "1"]]


def _run(home, args, real: bool, capsys, demo):
    args = [str(demo.train) if a == "TRAIN" else a for a in args]
    if real:
        p = ftctl(home, *args, check=False, timeout=120)
        return p.returncode, p.stdout + p.stderr
    from helpers import run

    code, out, err = run(capsys, *args, "--home", home)
    return code, out + err


def test_every_command_on_a_read_only_workspace_says_read_only_and_nothing_says_damaged(
    read_only, capsys, demo
):
    home, real = read_only
    for args in WRITERS:
        if not real and args[0] == "start":
            continue  # the seam does not reach the lock file's open (a real mount does)
        code, text = _run(home, args, real, capsys, demo)
        flat = " ".join(text.split())
        assert code == 1, (args, text)
        assert "read-only file system (EROFS)" in flat and "nothing is damaged" in flat, (
            args,
            text,
        )
        assert "damaged (" not in flat and "backup" not in flat and "internal error" not in flat, (
            args
        )
    for args in READERS:  # a query reads the journal as it is on disk, and says why it cannot write
        code, text = _run(home, args, real, capsys, demo)
        flat = " ".join(text.split())
        assert "refuses writes (read-only)" in flat or "read-only file system" in flat, (args, text)
        assert "damaged (" not in flat and "backup" not in flat, (args, text)
        if args[0] != "doctor":  # doctor exits 1: its storage finding is an error
            assert code == 0, (args, text)
    code, text = _run(home, ["status", "--json"], real, capsys, demo)
    body = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert [j["state"] for j in body["jobs"]] == ["queued"]
    if real:  # the page, too, serves it read-only, saying so
        p = subprocess.Popen(
            [sys.executable, "-m", "ftctl.cli", "serve", "--port", "0", "--home", str(home)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            said = ""
            deadline = time.time() + 60
            while "serving" not in said and time.time() < deadline and p.poll() is None:
                said += p.stderr.readline()
            assert "refuses writes (read-only)" in said and "serving" in said, said
        finally:
            p.kill()
            p.wait()


@pytest.mark.skipif(
    not ROOT or not shutil.which("setpriv"), reason="needs root to act as another uid"
)
def test_a_workspace_of_another_user_says_permission_denied(submitted):
    env = {**os.environ, "COLUMNS": "200"}
    for args in (
        ["status"],
        ["submit", "x.jsonl"],
        ["start", "--until-idle"],
        ["doctor"],
        ["recover"],
    ):
        p = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
             "ftctl.cli", *args, "--home", str(submitted)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        flat = " ".join((p.stdout + p.stderr).split())
        assert p.returncode == 1 and "permission denied" in flat and "(EACCES)" in flat, (
            args,
            flat,
        )
        assert "run as uid 65534" in flat or "runs as uid 65534" in flat, flat
        assert "damaged (" not in flat and "backup" not in flat, flat


@pytest.mark.skipif(not ROOT, reason="needs root to mount a small tmpfs")
def test_a_full_disk_says_no_space_left_and_the_journal_keeps_what_it_committed(tmp_path, demo):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=800k", "tmpfs", str(disk)):
        pytest.skip("this machine does not let us mount a tmpfs")
    try:
        home = make_workspace(disk / "ws", demo.model_dir)
        small = tmp_path / "small.jsonl"
        small.write_text("".join(demo.train.read_text().splitlines(keepends=True)[:40]))
        ftctl(home, "submit", str(small), "--valid", str(demo.valid))
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        for args in (["pause", "1"], ["submit", str(small), "--again"]):
            p = ftctl(home, *args, check=False)
            flat = " ".join((p.stdout + p.stderr).split())
            assert p.returncode == 1 and "no space left" in flat and "(ENOSPC" in flat, (args, flat)
            assert "damaged (" not in flat and "backup" not in flat and "internal" not in flat
        p = ftctl(home, "status", "1", "--json", check=False)
        assert p.returncode == 0 and json.loads(p.stdout)["state"] == "queued"  # nothing lost
        assert "refuses writes (disk full)" in " ".join(p.stderr.split())
        filler.unlink()
        ftctl(home, "pause", "1")  # space again: the command works
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_storages_errors_are_classified_and_none_is_damage(submitted):
    """(A damaged journal — its header, SQLite's "malformed" — is tests/test_journal.py's.)"""
    from ftctl.events.journal import DiskFull, NoPermission, ReadOnly, storage_problem

    j = submitted / "journal.db"
    assert isinstance(storage_problem(j, OSError(errno.EROFS, "x")), ReadOnly)
    assert isinstance(storage_problem(j, OSError(errno.EACCES, "x", str(j))), NoPermission)
    assert isinstance(storage_problem(j, OSError(errno.ENOSPC, "x")), DiskFull)
    assert storage_problem(j, OSError(errno.EIO, "x")) is None
