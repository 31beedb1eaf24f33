"""The effective config (`ftctl config show`): every key's value and where it comes from."""

from __future__ import annotations

from ftctl.adapters.workspace import Workspace
from ftctl.core.config import config_to_dict
from ftctl.core.state import Projection


def effective_config(ws: Workspace, p: Projection, lineage: str) -> tuple[list[dict], list[str]]:
    """([{"key", "value", "source"}…], warnings). Sources: "default", "ftctl.yaml", or the
    lineage's promoted base for ``model``. Raises ConfigError for an unreadable ftctl.yaml."""
    cfg, warnings = ws.load_config()
    raw = ws.read_config_dict()
    rows: list[dict] = []

    def walk(d: dict, given_here: dict, prefix: str = "") -> None:
        for k, v in d.items():
            given = isinstance(given_here, dict) and k in given_here
            if isinstance(v, dict) and v and k != "optimizer_config":
                walk(
                    v,
                    given_here.get(k) if given and isinstance(given_here.get(k), dict) else {},
                    prefix + k + ".",
                )
            else:
                rows.append(
                    {"key": prefix + k, "value": v, "source": "ftctl.yaml" if given else "default"}
                )

    walk(config_to_dict(cfg), raw)
    lin = p.lineages.get(lineage)
    if lin is not None and lin.base_version > 0:
        for r in rows:
            if r["key"] == "model":
                r["value"], r["source"] = (
                    lin.base_model,
                    f"lineage {lin.name}: promoted base v{lin.base_version}",
                )
    return rows, warnings
