"""The workspace on disk: where the journal, config, queue inbox, jobs and logs live.

    <home>/journal.db     the event journal (the only source of truth)
    <home>/ftctl.yaml     the configuration new jobs are resolved against
    <home>/inbox/         drop JSONL files here; the daemon validates and queues them
    <home>/jobs/<id>/     data/ (the job's own copy of its data), checkpoints/, adapters/
    <home>/models/        consolidated base models
    <home>/logs/          daemon.log and one log per job (worker stderr)
    <home>/run/           the daemon lock file

Everything is created 0700 (folders) / 0600 (files): training data is often private.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftctl.core.config import Config, ConfigError, decode_config, default_config_dict, merge_overrides
from ftctl.events.journal import Journal

DIRS = ("inbox", "inbox/rejected", "jobs", "models", "logs", "run")
_FIX_CONFIG = (
    "Nothing was changed. Edit ftctl.yaml to fix it (`ftctl config show` prints the effective values "
    "once it reads), then run the command again."
)


class WorkspaceError(Exception):
    """A workspace problem a user can act on."""


@dataclass(frozen=True)
class Workspace:
    home: Path

    @property
    def journal_path(self) -> Path:
        return self.home / "journal.db"

    @property
    def config_path(self) -> Path:
        return self.home / "ftctl.yaml"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def lock_path(self) -> Path:
        return self.home / "run" / "daemon.lock"

    def job_dir(self, job_id: str) -> Path:
        return self.home / "jobs" / job_id

    def job_log(self, job_id: str) -> Path:
        return self.logs / f"job-{job_id}.log"

    @property
    def models(self) -> Path:
        return self.home / "models"

    def exists(self) -> bool:
        return self.journal_path.exists()

    def require(self) -> None:
        if not self.exists():
            raise WorkspaceError(
                f"no ftctl workspace at {self.home} (no journal.db). "
                "Run `ftctl init --home DIR` first, or pass --home / set FTCTL_HOME to your workspace."
            )

    def open_journal(self) -> Journal:
        self.require()
        return Journal.open(self.journal_path)

    def read_config_dict(self) -> dict:
        path = self.config_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise WorkspaceError(f"{path} is missing: run `ftctl init` or restore it") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}). {_FIX_CONFIG}") from None
        except OSError as e:
            raise WorkspaceError(f"cannot read {path}: {e.strerror}. Nothing was changed.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML{_yaml_where(e)}. {_FIX_CONFIG}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path} must be a mapping of keys to values, but it holds a {_yaml_kind(data)}. {_FIX_CONFIG}",
                value=data,
            )
        return data

    def load_config(self, overrides: list[str] = ()) -> tuple[Config, list[str]]:
        """The effective config: ftctl.yaml with ``key=value`` overrides applied."""
        data = merge_overrides(self.read_config_dict(), list(overrides))
        return decode_config(data, source=str(self.config_path))


def init_workspace(home: Path, model: str, extra: dict | None = None) -> Workspace:
    """Create a workspace. Refuses to touch an existing journal."""
    ws = Workspace(Path(home).expanduser().resolve())
    if ws.exists():
        raise WorkspaceError(f"{ws.home} already holds an ftctl workspace; nothing was changed")
    old = os.umask(0o077)
    try:
        ws.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(ws.home, 0o700)
        for d in DIRS:
            (ws.home / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = default_config_dict(model)
        if extra:
            cfg.update(extra)
        decode_config(cfg)  # never write a config we would refuse to read
        if not ws.config_path.exists():
            write_private(ws.config_path, _config_text(cfg))
        Journal.create(ws.journal_path).close()
    finally:
        os.umask(old)
    return ws


def write_private(path: Path, text: str) -> None:
    """Write a small file atomically (temp + fsync + rename), mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _at(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_where(e: yaml.YAMLError) -> str:
    """' at line 4, column 1: <problem> (while parsing a flow sequence that starts at line 2, column 16)'."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return f": {e}"
    text = f" at {_at(mark)}: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        text += f" ({context} that starts at {_at(start)})"
    return text


def _yaml_kind(data) -> str:
    kinds = {list: "a list", str: "a single string", int: "a single number", float: "a single number", bool: "a single true/false"}
    return kinds.get(type(data), type(data).__name__)


def _config_text(cfg: dict) -> str:
    head = (
        "# ftctl configuration: mlx-lm's LoRA keys plus ftctl's own (retention, restart, timeouts,\n"
        "# min_free_disk_gb, consolidation). Each job records the resolved config it was submitted\n"
        "# with; `ftctl config show` prints the effective values. Override per job with\n"
        "# `ftctl submit FILE --set key=value`.\n"
    )
    return head + yaml.safe_dump(cfg, sort_keys=False)


def resolve_home(arg: str | None) -> Workspace:
    home = arg or os.environ.get("FTCTL_HOME") or "~/.ftctl"
    return Workspace(Path(home).expanduser().resolve())
