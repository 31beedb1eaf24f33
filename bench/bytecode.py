"""Whole-process timings compare like with like: ftctl's modules byte-compiled, as mlx-lm's are.

pip byte-compiles a package it installs (mlx-lm, MLX, transformers), but not an editable install's
source tree (ftctl in a checkout); Python writes those .pyc files on first import, unless
PYTHONDONTWRITEBYTECODE is set (this project's CI and dev machines set it). There every ftctl process
(the CLI, each worker, each probe) would compile ftctl's source again on every start, about 0.1 s per
process on 2 cores that mlx_lm.lora never pays, and the bench would time an artefact of the checkout
instead of what an installed ftctl costs. So the benches that time whole processes call this first.
"""

import compileall
from pathlib import Path

PACKAGES = ("events", "core", "adapters", "recovery", "control", "cli")


def compile_ftctl() -> None:
    """Write the .pyc of every ftctl module (quietly; a file already compiled is skipped)."""
    root = Path(__file__).resolve().parent.parent
    for name in PACKAGES:
        compileall.compile_dir(root / name, quiet=1)
