"""transformers' index of its own modules, kept on disk instead of rebuilt by every worker.

``import transformers`` (5.x) reads the source of every module under transformers/ and
transformers/models/ (about 1,700 files) for their ``__all__`` and backends, to build the lazy
import structure it serves names from, and does it again in every process: on the 2-core VM ftctl
is built on, ``import mlx_lm.tokenizer_utils`` took 1.26-1.60 s of which this index was about 0.7 s
(0.58-0.74 s with it read from here). mlx-lm's tokenizer module imports transformers, so every
worker paid it before it could load a model, once per job and again after every restart.

The index depends only on the installed files: ``install`` wraps transformers'
``define_import_structure`` so that its result is kept in ``cache_dir`` under a key naming the
installation (its folder, its dist-info and the mtime and size of the RECORD every pip install
rewrites) and the arguments, and read back next time. Anything unexpected (no dist-info beside the
package, as in a source checkout; another function or result shape in a later transformers; a
cache that cannot be read or written) leaves transformers' own function in charge: this changes how
fast the index is built, never what it holds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path

MODULE = "transformers.utils.import_utils"


def install(cache_dir: Path) -> None:
    """Cache the index of the transformers this process imports next (no-op once it is imported)."""
    if "transformers" not in sys.modules:
        sys.meta_path.insert(0, _Finder(cache_dir))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds transformers' import_utils as Python would, and wraps its index function once loaded."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # once: the module is found by the ordinary finders from now on
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            real = getattr(module, "define_import_structure", None)
            key = _installation(Path(module.__file__).parents[1])
            if callable(real) and key:
                module.define_import_structure = _cached(real, self.cache_dir, key)

        spec.loader.exec_module = exec_module
        return spec


def _installation(package: Path) -> str | None:
    """A key for the transformers installed at ``package``, or None (no single dist-info beside it)."""
    try:
        infos = [p for p in package.parent.glob("transformers-*.dist-info") if p.is_dir()]
        if len(infos) != 1:
            return None
        st = (infos[0] / "RECORD").stat()
    except OSError:
        return None
    ident = (str(package), infos[0].name, st.st_size, st.st_mtime_ns, sys.version_info[:2])
    return hashlib.sha256(repr(ident).encode()).hexdigest()[:16]


def _cached(real, cache_dir: Path, key: str):
    @functools.lru_cache  # like transformers' own: the same object for the same arguments
    def define_import_structure(module_path, prefix=None):
        name = hashlib.sha256(repr((str(module_path), prefix)).encode()).hexdigest()[:16]
        file = cache_dir / f"transformers-index-{key}-{name}.json"
        try:
            return _decode(json.loads(file.read_bytes()))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        made = real(module_path, prefix)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        try:
            text = json.dumps(_encode(made))  # before transformers adds to it (its __init__ does)
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, file)
        except (OSError, TypeError, ValueError):  # not kept: the next process builds it again
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return made

    define_import_structure.ftctl_cache = cache_dir  # how a test tells it from transformers' own
    return define_import_structure


def _encode(structure) -> list:
    """{frozenset(backends): {module: {names}}} as JSON lists; TypeError for any other shape."""
    if not isinstance(structure, dict):
        raise TypeError(type(structure))
    out = []
    for backends, modules in structure.items():
        if not isinstance(backends, frozenset) or not isinstance(modules, dict):
            raise TypeError("unexpected import structure")
        if not all(isinstance(v, set) for v in modules.values()):
            raise TypeError("unexpected import structure")
        out.append([sorted(backends), {m: sorted(v) for m, v in modules.items()}])
    return out


def _decode(data: list) -> dict:
    return {frozenset(b): {m: set(v) for m, v in mods.items()} for b, mods in data}
