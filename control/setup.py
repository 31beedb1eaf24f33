"""`ftctl init`: a workspace for a base model that is checked to load."""

from __future__ import annotations

from pathlib import Path

from ftctl.adapters.model import model_problem
from ftctl.adapters.workspace import Workspace, WorkspaceError, init_workspace


def init(home: Path, model: str) -> tuple[Workspace, str]:
    """Create the workspace; ``model`` must be an mlx-lm model folder that loads (config.json,
    weights, tokenizer). Returns the workspace and the model's absolute path, as ftctl.yaml records it."""
    if Workspace(Path(home)).exists():
        raise WorkspaceError(f"{home} already holds an ftctl workspace; nothing was changed")
    path = Path(model).expanduser().resolve()
    problem = model_problem(path)
    if problem:
        raise WorkspaceError(f"--model {model}: {problem}. Nothing was created; point --model at an mlx-lm model "
                             "folder (config.json, *.safetensors weights, a tokenizer), or try `ftctl init --demo`.")
    return init_workspace(home, str(path)), str(path)
