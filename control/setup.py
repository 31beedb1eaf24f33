"""`ftctl init`: a workspace for a base model that is checked to load.

``--model`` names an mlx-lm folder, a Hugging Face repo id in the local cache (ftctl.yaml keeps
the id; each job records the snapshot it resolved to), or a GGUF file, converted into the new
workspace's models/imported/ and committed by a ``model_imported`` event (control/models.py).
"""

from __future__ import annotations

from pathlib import Path

from ftctl.adapters import gguf
from ftctl.adapters.model import shape
from ftctl.adapters.workspace import Workspace, WorkspaceError, init_workspace, make_folder
from ftctl.control.ledger import Ledger
from ftctl.core import fit
from ftctl.core.fit import ModelFacts

from . import models
from .reporter import Note, quiet

_WHAT = (
    "point --model at an mlx-lm model folder (config.json, *.safetensors weights, a tokenizer), a Hugging Face "
    "repo id in the local cache, or a Llama-family .gguf file, or try `ftctl init --demo`"
)


def init(
    home: Path, model: str, dtype: str | None = None, note: Note = quiet
) -> tuple[Workspace, str]:
    """Create the workspace for ``model``. Returns the workspace and what ftctl.yaml records as
    ``model``: the folder's absolute path, the repo id, or the imported GGUF's folder."""
    if Workspace(Path(home)).exists():
        raise WorkspaceError(f"{home} already holds an ftctl workspace", kept="nothing was changed")
    if dtype is not None and not models.is_gguf(model):
        raise WorkspaceError(
            "--dtype applies to a .gguf --model only (it sets what the import dequantizes to)",
            kept="nothing was created",
        )
    if models.is_gguf(model):
        return _init_gguf(home, model, dtype, note)
    try:
        resolved = models.resolve(model)
    except models.ModelRefused as e:
        raise WorkspaceError(
            f"--model {model}: {e}", kept="nothing was created", do=_WHAT
        ) from None
    if resolved.repo:
        note(
            f"{resolved.repo} is cached at revision {resolved.revision} ({resolved.path}); each job records the "
            "revision it trains on"
        )
    recorded = resolved.repo or resolved.path
    # fitted to the folder it names (a repo id is no folder to the workspace's own look)
    return init_workspace(home, recorded, fit.fitting_keys(shape(resolved.path))), recorded


def _init_gguf(home: Path, model: str, dtype: str | None, note: Note) -> tuple[Workspace, str]:
    source = Path(model).expanduser().resolve()
    try:
        info = gguf.inspect(source)  # refuse an unsupported file before creating anything
    except gguf.GGUFError as e:
        raise WorkspaceError(f"--model {model}: {e}", kept="nothing was created") from None
    target = (
        Workspace(Path(home).expanduser().resolve()).models
        / models.IMPORTED
        / (gguf.name_of(source) + (f"-{dtype}" if dtype else ""))
    )

    def convert(ws: Workspace, made: list) -> None:
        make_folder(models.imported_root(ws), made)
        ledger = Ledger(ws.open_journal())
        try:
            models.import_into(ws, ledger, source, dtype, note)
        finally:
            ledger.close()

    facts = ModelFacts(info.layers, "", {}, {}, info.context, "context_length")
    try:
        ws = init_workspace(home, str(target), fit.fitting_keys(facts), then=convert)
    except models.ModelRefused as e:
        raise WorkspaceError(f"--model {model}: {e}", kept="nothing was created") from None
    return ws, ws.rel(target)
