"""The tree is formatted and linted by ruff (its settings: pyproject.toml's [tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    exe = Path(sys.executable).with_name("ruff")
    found = str(exe) if exe.exists() else shutil.which("ruff")
    if not found:
        pytest.fail("ruff is not installed: `pip install -e '.[dev]'` brings it")
    return found


@pytest.mark.parametrize(
    "args", [["format", "--check", "--diff"], ["check", "--no-fix"]], ids=["format", "lint"]
)
def test_the_tree_passes_ruff(args):
    out = subprocess.run([_ruff(), *args, "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, (
        f"`ruff {' '.join(args)} .` failed — run `ruff format . && ruff check --fix .`:\n"
        f"{out.stdout[-4000:]}{out.stderr[-2000:]}"
    )
