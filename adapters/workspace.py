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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ftctl.adapters import fs, process
from ftctl.core.config import (
    Config,
    ConfigError,
    decode_config,
    default_config_dict,
    with_overrides,
)
from ftctl.core.fit import fitting_keys
from ftctl.events.errors import UserError
from ftctl.events.journal import DiskFull, Journal, JournalError, NoPermission, ReadOnly

DIRS = ("inbox", "inbox/rejected", "jobs", "models", "logs", "run")
# the first file of a reproduction's scratch folder: ours to delete
SCRATCH_MARKER = ".ftctl-reproduce"


def _fix(path: Path) -> str:
    return (
        f"Nothing was changed. Edit {path.name} to fix it"
        + (
            " (`ftctl config show` prints the effective values once it reads)"
            if path.name == "ftctl.yaml"
            else ""
        )
        + ", then run the command again."
    )


class WorkspaceError(UserError):
    """A workspace problem a user can act on."""


@dataclass(frozen=True)
class Workspace:
    home: Path

    def __post_init__(self):
        # One spelling of the workspace's location (symlinks resolved), so that `rel` recognises every
        # path built from it, whoever built the Workspace.
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())

    # Paths the journal records are relative to the workspace (events/types.py, "workspace paths"):
    # `rel` is how one is written, `abs` how one is used, against where the workspace is *now*.
    def rel(self, path) -> str:
        """``path`` as the journal records it: relative to the workspace if it lies inside it, else
        absolute (a user's model folder or data file)."""
        p = str(path)
        if not os.path.isabs(p):
            return p
        home = str(self.home)
        if p == home:
            return "."
        return p[len(home) + 1 :] if p.startswith(home + os.sep) else p

    def abs(self, path) -> Path:
        """A path as the journal records it, made absolute against the workspace's current location."""
        p = Path(path)
        return p if p.is_absolute() else self.home / p

    def located(self, cfg: Config) -> Config:
        """A job's recorded config as a worker needs it: its model path absolute, against the
        workspace's current location (the journal records a model inside the workspace relative)."""
        model = str(self.abs(cfg.model))
        return cfg if model == cfg.model else msgspec.structs.replace(cfg, model=model)

    def model(self, spec: str) -> str:
        """``model`` as ftctl.yaml (or --set) names it, as this machine finds it: a relative path names a
        folder of the workspace when there is one (``demo/model``, ``models/v0001``: a moved workspace
        keeps working), else a path relative to the current folder, else a Hugging Face repo id."""
        from .model import is_repo_id

        p = Path(spec).expanduser()
        if p.is_absolute():
            return str(p)
        inside = self.home / p
        if inside.exists() or not (p.exists() or is_repo_id(spec)):
            return str(inside)
        return str(p.resolve()) if p.exists() else spec

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

    def reproduce_scratch(self, job_id: str, pid: int) -> Path:
        """The scratch folder of `ftctl reproduce` (or the daemon's replay) of ``job_id`` in process ``pid``."""
        return self.home / "run" / f"reproduce-{job_id}-{pid}"

    def abandoned_scratch(self) -> list[Path]:
        """Scratch folders of reproductions whose process is gone (killed before it cleaned up). Only
        ours: each holds SCRATCH_MARKER, written first."""
        out = []
        for d in sorted((self.home / "run").glob("reproduce-*-*")):
            pid = d.name.rpartition("-")[2]
            if (
                (d / SCRATCH_MARKER).is_file()
                and pid.isdigit()
                and int(pid) != os.getpid()
                and not process.psutil.pid_exists(int(pid))
            ):
                out.append(d)
        return out

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (`metrics.tensorboard: true`, `ftctl export-tb`): one run folder per job."""
        return self.home / "tensorboard"

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

    def open_journal(self, write: bool = True) -> Journal:
        """The journal; ``write=False`` (a query): on storage ftctl cannot write (a read-only mount, a
        workspace of another user) it is opened read-only instead of refused (``Journal.readonly``)."""
        self.require()
        try:
            return Journal.open(self.journal_path)
        except (ReadOnly, NoPermission, DiskFull):
            if write:
                raise
            return Journal.open_readonly(self.journal_path)

    def read_config_dict(self) -> dict:
        path = self.config_path
        if not path.exists():
            raise WorkspaceError(f"{path} is missing: run `ftctl init` or restore it")
        return read_mapping(path)

    def load_config(self, overrides: list[str] = ()) -> tuple[Config, list[str]]:
        """The effective config: ftctl.yaml with ``key=value`` overrides applied."""
        return with_overrides(self.read_config_dict(), overrides, source=str(self.config_path))


def read_mapping(path: Path) -> dict:
    """A YAML config file (ftctl.yaml, an mlx-lm -c file) as a mapping: a key given twice, bad YAML or
    a file that is no mapping is a ConfigError naming the file and the line; {} for an empty file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkspaceError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}). {_fix(path)}") from None
    except OSError as e:
        raise WorkspaceError(
            f"cannot read {path}: {e.strerror}. Nothing was changed; check the path (for ftctl.yaml: "
            "that --home or FTCTL_HOME is your workspace)."
        ) from None
    import yaml  # read where used: status, replay and recover never parse ftctl.yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except DuplicateKey as e:
        raise ConfigError(
            f"{path}: key {e.key!r} is given twice (lines {e.first} and {e.second}); "
            "nothing was changed; keep one of them (YAML would silently take the last)",
            key=str(e.key),
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML{_yaml_where(e)}. {_fix(path)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must be a mapping of keys to values, but it holds a {_yaml_kind(data)}. {_fix(path)}",
            value=data,
        )
    return data


def init_workspace(home: Path, model: str, extra: dict | None = None, then=None) -> Workspace:
    """Create a workspace, durably. Refuses to touch an existing journal.

    ``then(ws, made)``, if given, runs last, inside the same undo scope (what it creates it
    appends to ``made``): importing the model into the new workspace.

    If it fails part-way it removes what it created in this call (and nothing else) and raises a
    WorkspaceError that says what happened (any other exception is re-raised after the undo)."""
    ws = Workspace(Path(home).expanduser().resolve())
    if ws.exists():
        raise WorkspaceError(f"{ws.home} already holds an ftctl workspace; nothing was changed")
    fitting = _fitting(model)
    if os.path.isabs(model):
        model = ws.rel(model)  # a model inside the workspace moves with it: `demo/model`
    cfg = {**default_config_dict(model), **fitting}
    if extra:
        cfg.update(extra)
    decode_config(cfg)  # never write a config we would refuse to read
    old = os.umask(0o077)
    try:
        with creating(ws.home) as made:
            make_folder(ws.home, made)
            for d in DIRS:
                make_folder(ws.home / d, made)
            if not ws.config_path.exists():
                write_private(ws.config_path, _config_text(cfg))
                made.append(ws.config_path)
            made += [f for f in _journal_files(ws.journal_path) if not f.exists()]
            Journal.create(ws.journal_path).close()
            fs.fsync_path(ws.journal_path)
            fs.fsync_path(ws.home)
            if then is not None:
                then(ws, made)
            os.chmod(ws.home, 0o700)  # last: a failed init leaves an existing folder's mode alone
    finally:
        os.umask(old)
    return ws


def _fitting(model: str) -> dict:
    """num_layers and max_seq_length that fit a model folder (core.fit.fitting_keys); {} for a model
    that is not a readable folder (yet: a GGUF being imported passes its own)."""
    from ftctl.adapters.model import model_problem, shape

    if model_problem(model) is not None:
        return {}
    return fitting_keys(shape(model))


def write_private(path: Path, text: str) -> None:
    """Write a small file atomically and durably (temp + fsync + rename + fsync of the folder), mode 0600."""
    fs.write_durable(path, text.encode("utf-8"), 0o600)


# --------------------------------------------------------------------------- creating files and folders safely

_HOME_ADVICE = "Pass --home a folder you can write to (it may not exist yet), or set FTCTL_HOME, and try again."


def make_folder(path: Path, made: list[Path]) -> None:
    """Create the folder `path` and its missing parents (0700, fsynced), recording each in `made`."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists():
            raise WorkspaceError(
                f"{p} is a file, not a folder"
                if p == path
                else f"cannot create {path}: {p} is a file, not a folder"
            )
    fs.make_dirs(path, made)


@contextmanager
def creating(where: Path) -> Iterator[list[Path]]:
    """Yield a list to record each file and folder created; if the block fails, remove them.

    Only what is in the list is removed, newest first, folders only when empty: never anything
    that existed before. An OSError or a WorkspaceError becomes a WorkspaceError saying what
    happened, what was undone and what to do."""
    made: list[Path] = []
    try:
        yield made
    except (OSError, JournalError, WorkspaceError) as e:
        left = undo(made)
        kept = (
            "Nothing was changed."
            if not left
            else (
                "Removed what it had created except "
                + ", ".join(map(str, left))
                + " (not empty, or not removable: look at it before removing it yourself)."
            )
        )
        raise WorkspaceError(f"{_what_failed(e, where)}. {kept} {_HOME_ADVICE}") from None
    except BaseException:
        undo(made)
        raise


def undo(made: list[Path]) -> list[Path]:
    """Remove the recorded files and (empty) folders, newest first; return those that stayed."""
    left = []
    for p in reversed(made):
        try:
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:
            left.append(p)
    return left


def _journal_files(journal: Path) -> list[Path]:
    """The journal and the companions SQLite may leave beside it, companions last (removed first)."""
    return [journal, *(journal.with_name(journal.name + s) for s in ("-journal", "-wal", "-shm"))]


def _what_failed(e: BaseException, where: Path) -> str:
    if isinstance(e, OSError):
        return f"cannot create {e.filename or where}: {e.strerror or e}"
    if isinstance(e, JournalError):
        return f"cannot create the journal in {where}: {e}"
    return str(e)


class DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


_LOADER = None


def _unique_key_loader():
    """yaml.SafeLoader that refuses a mapping key given twice instead of keeping the last value
    (made on first use: importing yaml is a cost only commands that read ftctl.yaml pay)."""
    global _LOADER
    if _LOADER is None:
        import yaml

        # libyaml's parser where PyYAML has it (every wheel does): 5-10x faster, the same marks
        class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            def construct_mapping(self, node, deep=False):
                seen: dict = {}
                for key_node, _ in node.value:
                    if (
                        not isinstance(key_node, yaml.ScalarNode)
                        or key_node.tag == "tag:yaml.org,2002:merge"
                    ):
                        continue  # complex keys and `<<` merges: PyYAML's own rules
                    key = self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                    seen[key] = line
                return super().construct_mapping(node, deep=deep)

        _LOADER = _UniqueKeyLoader
    return _LOADER


def _at(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_where(e) -> str:
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
    kinds = {
        list: "a list",
        str: "a single string",
        int: "a single number",
        float: "a single number",
        bool: "a single true/false",
    }
    return kinds.get(type(data), type(data).__name__)


def _config_text(cfg: dict) -> str:
    head = (
        "# ftctl configuration: mlx-lm's LoRA keys plus ftctl's own (retention, restart, timeouts,\n"
        "# min_free_disk_gb, consolidation). Each job records the resolved config it was submitted\n"
        "# with; `ftctl config show` prints the effective values. Override per job with\n"
        "# `ftctl submit FILE --set key=value`.\n"
    )
    import yaml

    return head + yaml.safe_dump(cfg, sort_keys=False)


def resolve_home(arg: str | None) -> Workspace:
    home = arg or os.environ.get("FTCTL_HOME") or "~/.ftctl"
    return Workspace(Path(home).expanduser().resolve())
