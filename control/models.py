"""What `--model` (and `model` in ftctl.yaml) may name, resolved to the folder a job trains on.

- an mlx-lm model folder: used as it is (checked to look loadable);
- a Hugging Face repo id (``org/name``, not an existing path): resolved in the local HF cache
  the way mlx_lm.load resolves it; the job records the snapshot folder and its commit hash;
- a GGUF file: converted once into ``models/imported/NAME/`` (adapters/gguf.py), committed by a
  ``model_imported`` event; a file already imported (same sha256, same dtype) is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftctl.adapters import gguf
from ftctl.adapters.fs import sha256_file
from ftctl.adapters.model import ModelNotFound, is_repo_id, model_problem, resolve_repo
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.state import DAEMON_STREAM, Projection
from ftctl.events import types as ev
from ftctl.events.errors import UserError

from .reporter import Note, quiet

IMPORTED = "imported"


class ModelRefused(UserError):
    """The model cannot be used; nothing was recorded (the message says why and what to do)."""


@dataclass(frozen=True)
class Resolved:
    path: str  # the mlx-lm folder the job loads
    repo: str | None = None  # the Hugging Face repo id it was named by
    revision: str | None = None  # and the cached snapshot's commit hash


def is_gguf(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


def needs_resolving(spec: str) -> bool:
    """A repo id or a GGUF file: what a job trains on is a folder found (or made) from it."""
    return is_gguf(spec) or is_repo_id(spec)


def imported_root(ws: Workspace) -> Path:
    return ws.models / IMPORTED


def resolve(spec: str) -> Resolved:
    """A folder or a repo id (not GGUF: that needs a workspace to import into). ModelRefused if unusable."""
    if is_repo_id(spec):
        try:
            snap = resolve_repo(spec)
        except ModelNotFound as e:
            raise ModelRefused(str(e)) from None
        problem = model_problem(snap.path)
        if problem:
            raise ModelRefused(
                f"{spec} resolved to {snap.path} in the Hugging Face cache, which cannot load: {problem}"
            )
        return Resolved(snap.path, snap.repo, snap.revision)
    path = str(Path(spec).expanduser().resolve())
    problem = model_problem(path)
    if problem:
        raise ModelRefused(problem)
    return Resolved(path)


def problem(spec: str) -> str | None:
    """Why ``spec`` cannot be a base model, or None (a GGUF file is only inspected, not converted)."""
    if is_gguf(spec):
        try:
            gguf.inspect(Path(spec).expanduser())
        except gguf.GGUFError as e:
            return str(e)
        return None
    try:
        resolve(spec)
    except ModelRefused as e:
        return str(e)
    return None


def already_imported(
    ws: Workspace, p: Projection, source_sha256: str, dtype: str | None
) -> str | None:
    for path, e in p.imported.items():
        if e.source_sha256 == source_sha256 and e.dtype == dtype and ws.abs(path).is_dir():
            return str(ws.abs(path))
    return None


def import_into(
    ws: Workspace, ledger: Ledger, source, dtype: str | None = None, note: Note = quiet
) -> str:
    """Convert a GGUF file into models/imported/NAME and commit model_imported; the folder's path.
    A file imported before (same content, same dtype) is reused, not converted again."""
    source = Path(source).expanduser().resolve()
    try:
        gguf.inspect(source)
        done = already_imported(ws, ledger.state, sha256_file(source), dtype)
        if done:
            note(f"{source.name} was imported before (same sha256): using {done}")
            return done
        root = imported_root(ws)
        name = gguf.name_of(source) + (f"-{dtype}" if dtype else "")
        n = 2
        while (root / name).exists():  # same file name, other content (or dtype)
            name, n = f"{gguf.name_of(source)}{f'-{dtype}' if dtype else ''}-{n}", n + 1
        note(
            f"converting {source.name} into {root / name} ({'dequantized to ' + dtype if dtype else 'kept quantized'})"
        )
        imp = gguf.import_gguf(source, root, dtype=dtype, name=name)
    except gguf.GGUFError as e:
        raise ModelRefused(f"cannot import {source}: {e}") from None
    ledger.commit(
        DAEMON_STREAM,
        ev.ModelImported(
            path=ws.rel(imp.path),
            source=str(source),
            source_sha256=imp.source_sha256,
            quantization=imp.quantization,
            dtype=dtype,
            weights_sha256=imp.weights_sha256,
            bytes=imp.bytes,
            seconds=round(imp.seconds, 3),
        ),
    )
    note(
        f"imported {source.name} ({imp.quantization}{', as ' + dtype if dtype else ''}) in {imp.seconds:.1f}s; "
        f"it loads and generates ({gguf.PROBE!r} -> {imp.sample!r})",
        "ok",
    )
    if dtype is None and imp.quantization not in ("F32", "F16", "BF16") and gguf.cpu_only():
        note(
            "kept quantized (QLoRA: least memory), but this machine has no Metal GPU and MLX's CPU quantized "
            "matmul is many times slower than float: to train faster at about 16/bits times the memory, import "
            "with --dtype float32",
            "warn",
        )
    return str(imp.path)


def for_job(ws: Workspace, ledger: Ledger, spec: str, note: Note = quiet) -> Resolved:
    """What a submission trains on: GGUF imported (kept quantized), repo ids resolved, folders checked."""
    if is_gguf(spec):
        return Resolved(import_into(ws, ledger, spec, note=note))
    return resolve(spec)
