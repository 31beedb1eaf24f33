"""Modules imported on first use. `ftctl status`, `replay` and `recover --json` must start in a
fraction of a second, so the CLI names the control modules it may need without importing them: a
command pays only for the modules it uses (MLX, psutil, yaml, rich, transformers never load for a
read-only query). See docs/architecture.md, "Start-up"."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


class LazyModule:
    """Stands for a module; the first attribute read imports it."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name, self._module = name, None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str):
        return getattr(self._load(), attr)


def lazy(name: str) -> LazyModule:
    return LazyModule(name)


def loaded_classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes among (module, class name) whose module is imported already: an exception of
    a module that was never imported cannot have been raised, so `except loaded_classes(...)`
    catches exactly what the eager tuple would have, without importing anything."""
    out = []
    for module, name in names:
        m = sys.modules.get(module)
        if m is not None and hasattr(m, name):
            out.append(getattr(m, name))
    return tuple(out)
