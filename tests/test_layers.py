"""The architecture is a checked contract: a wrong import fails the suite, not a review."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    "ftctl.cli",
    "ftctl.control",
    "ftctl.recovery",
    "ftctl.adapters",
    "ftctl.core",
    "ftctl.events",
]


def test_import_contracts_are_kept():
    """import-linter checks pyproject's contracts: the layers, no import cycle between the modules of
    any package, no rich/argparse below cli, a pure core, SQL only in events/."""
    lint = Path(sys.executable).with_name("lint-imports")
    p = subprocess.run(
        [str(lint), "--no-logo", "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"Contracts: 5 kept, 0 broken", p.stdout), p.stdout


def test_the_layer_contract_names_every_package_in_order():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = cfg["tool"]["setuptools"]["packages"]
    layers = next(c for c in cfg["tool"]["importlinter"]["contracts"] if c["type"] == "layers")[
        "layers"
    ]
    # every layer is a package; other packages are subpackages of a layer (ftctl.cli.web)
    assert layers == LAYERS and sorted(p for p in packages if p.count(".") == 1) == sorted(LAYERS)
    assert all(p.rsplit(".", 1)[0] in LAYERS for p in packages if p.count(".") > 1), packages
    assert sorted(cfg["tool"]["importlinter"]["root_packages"]) == sorted(LAYERS)


def test_cli_holds_no_sql_and_no_workflow_imports():
    """cli/ talks to the control layer: no raw SQL strings, no adapters that do work."""
    for f in (ROOT / "cli").rglob("*.py"):
        text = f.read_text()
        assert not re.search(r"\b(SELECT|INSERT|UPDATE|DELETE)\b .*\b(FROM|INTO|SET)\b", text), f
        assert ".conn." not in text, f


def test_every_crash_point_is_declared_and_used():
    from ftctl.adapters.faults import POINTS

    used = set()
    for d in ("adapters", "control", "recovery"):
        for f in (ROOT / d).glob("*.py"):
            used |= set(re.findall(r'crash_point\("([a-z_]+)"', f.read_text()))
    assert used == set(POINTS)


def test_an_unknown_crash_point_is_refused():
    p = subprocess.run(
        [sys.executable, "-c", "import ftctl.adapters.faults"],
        capture_output=True,
        text=True,
        env={"FTCTL_CRASH_AT": "mid_stpe:3:/tmp/x", "PATH": ""},
    )
    assert p.returncode != 0 and "unknown crash point 'mid_stpe'" in p.stderr
