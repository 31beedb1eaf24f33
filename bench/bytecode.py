"""Whole-process timings compare like with like: ftctl's modules byte-compiled, as mlx-lm's are.

pip byte-compiles a package it installs (mlx-lm, MLX, transformers), but not an editable install's
source tree (ftctl in a checkout); Python writes those .pyc files on first import, unless
PYTHONDONTWRITEBYTECODE is set (the development machine of 2026-12-06 set it). There every ftctl
process (the CLI, each worker, each probe) compiled ftctl's source again on every start — 0.12 s of
the CLI's 0.46 s of CPU in one py-spy profile — which mlx_lm.lora never pays, so the bench timed an
artefact of the checkout instead of what an installed ftctl costs. The benches that time whole
processes call this first.
"""

import compileall
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_ftctl() -> None:
    """Write the .pyc of every ftctl module, its folders as pyproject.toml maps them (quietly; a file
    already compiled is skipped)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        folders = tomllib.load(f)["tool"]["setuptools"]["package-dir"].values()
    for name in folders:
        compileall.compile_dir(ROOT / name, quiet=1)
