"""Comparing runs: the config keys that differ between jobs, and one table with a row per job.

Pure: the caller (control/compare.py) reads each job's recorded config and its figures from the
journal; here they become columns. A config is flattened to dotted keys (``lora_parameters.rank``);
a key differs when two jobs hold different values for it (a key one job lacks counts as a value).
A figure column that no job has a value for is left out (a run without evaluations has no val-loss
columns, a job that trained to the end no ``stopped_early``): a figure a later ftctl records is one
more name in ``FIGURES``, shown once the journal has it, never as an empty placeholder.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

# The figures of a run, in the order shown; the config keys follow them.
FIGURES = (
    "job",
    "name",
    "lineage",
    "state",
    "data_file",
    "examples",
    "steps",
    "epochs_trained",
    "final_loss",
    "best_val_loss",
    "best_val_step",
    "final_val_loss",
    "final_val_step",
    "result_step",
    "result_val_loss",
    "stopped_early",
    "test_loss",
    "test_ppl",
    "base_test_loss",
    "tokens_per_s",
    "peak_mem_gb",
    "device",
    "wall_s",
    "crashes",
    "resumes",
    "planned_restarts",
    "alerts",
)
ALWAYS = ("job", "name", "state")  # shown even if empty
_MISSING = object()


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora_parameters": {"rank": 8}} -> {"lora_parameters.rank": 8}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The flattened keys whose values are not the same in every config, in first-seen order."""
    keys: dict[str, None] = {}
    for c in configs:
        keys.update(dict.fromkeys(c))
    return [k for k in keys if len({_key(c.get(k, _MISSING)) for c in configs}) > 1]


def _key(v: Any) -> Any:
    """A hashable stand-in for a config value (lists and dicts by their repr)."""
    if v is _MISSING:
        return ("<missing>",)
    return repr(v) if isinstance(v, (list, dict)) else (type(v) is float, v)


def table(
    figures: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]], all_keys: bool = False
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(columns, the config columns that differ, rows): a row per job, its figures then its config
    keys (those that differ, or with ``all_keys`` every key). Figure columns with no value in any row
    are dropped (``ALWAYS`` stay)."""
    flat = [flatten(c) for c in configs]
    diff = differing(flat)
    if all_keys:
        keys: dict[str, None] = {}
        for c in flat:
            keys.update(dict.fromkeys(c))
        cfg_cols = list(keys)
    else:
        cfg_cols = diff
    shown = [c for c in FIGURES if c in ALWAYS or any(f.get(c) is not None for f in figures)]
    cfg_cols = [k for k in cfg_cols if k not in shown]  # a figure's name wins (none collide today)
    rows = [
        {**{c: f.get(c) for c in shown}, **{k: c.get(k) for k in cfg_cols}}
        for f, c in zip(figures, flat)
    ]
    return shown + cfg_cols, diff, rows


def sort_rows(rows: Iterable[dict[str, Any]], column: str, reverse: bool = False) -> list[dict]:
    """Rows by one column; a row without a value comes last either way. Numbers by value, anything
    else by its text."""
    rows = list(rows)
    have = [r for r in rows if r.get(column) is not None]
    none = [r for r in rows if r.get(column) is None]

    def by(r: dict) -> tuple:
        v = r[column]
        return (
            (0, v, "")
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else (1, 0, str(v))
        )

    return sorted(have, key=by, reverse=reverse) + none


def cell(v: Any) -> str:
    """A value as one table or CSV cell: numbers short, lists and mappings as compact JSON."""
    import json

    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)
