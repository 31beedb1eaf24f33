"""`ftctl`: the command line. Exit codes: 0 ok, 1 user error, 2 internal failure.

The commands are the table's (cli/table.py): the parser is built for the one named, and only its
module is imported. A ``UserError`` (events/errors.py, the base of every error a user can act on) is
printed in its three parts — what happened, what was kept, what to do — with exit 1; anything else is
a bug: exit 2, its traceback saved in logs/internal-errors.log.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from pathlib import Path

from ftctl.adapters.workspace import Workspace, resolve_home
from ftctl.events.errors import UserError

from . import render
from .args import build_parser, dispatch


def _save_traceback(ws: Workspace, text: str) -> Path | None:
    """Append the traceback to logs/internal-errors.log; None where that cannot be done (the
    workspace is gone, its file system unplugged): the handler itself must never raise."""
    try:
        log = ws.logs / "internal-errors.log"
        if not ws.logs.is_dir():
            return None
        with open(log, "a") as f:
            f.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ftctl {' '.join(sys.argv[1:])}\n{text}"
            )
        return log
    except OSError:
        return None


def _job_ids(argv: list[str]) -> int:
    """`ftctl _jobs [--home DIR]`: job ids, one a line, for shell completion. Hidden (no parser: it
    runs at every Tab), silent on any error (a completion must never print a traceback)."""
    home = argv[argv.index("--home") + 1] if "--home" in argv[:-1] else None
    try:
        with resolve_home(home).open_journal(write=False) as j:
            sys.stdout.write("".join(f"{i}\n" for i in j.job_ids()))
    except Exception:  # noqa: BLE001
        return 1
    return 0


def _storage(e: BaseException, ws: Workspace) -> UserError | None:
    """The storage's refusal behind an OSError (EROFS, EACCES/EPERM, ENOSPC) a command met writing the
    workspace (its lock, a job's data copy…): said as such, never as a bug or a damaged journal."""
    if not isinstance(e, OSError) or e.errno not in _STORAGE_ERRNOS:
        return None
    from ftctl.events.journal import storage_problem

    return storage_problem(e.filename or ws.home, e)


_STORAGE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def refused(e: UserError, as_json: bool) -> None:
    """A user error, said: what happened, then what was kept and what to do, each on its line."""
    render.err_console.print(f"[red]error:[/] {render.escape(e.what)}")
    for label, part in (("kept", e.kept), ("next", e.do)):
        if part:
            render.err_console.print(f"  {label}: {render.escape(part)}")
    if as_json:  # a program reading stdout gets the refusal too, not nothing
        render.print_json({"error": str(e), **e.parts(), "exit": 1})


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # every file and folder ftctl creates is private to its user
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_jobs"]:
        return _job_ids(argv[1:])
    args = build_parser(argv).parse_args(argv)
    ws = resolve_home(getattr(args, "home", None))
    try:
        code = dispatch(args, ws)
    except UserError as e:
        refused(e, getattr(args, "json", False))
        code = 1
    except KeyboardInterrupt:
        render.err_console.print("interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as e:  # internal failure: say so plainly, keep the traceback in a log
        problem = _storage(e, ws)
        if problem is not None:  # a read-only mount, permissions, a full disk: the user's to fix
            refused(problem, getattr(args, "json", False))
            return 1
        log = _save_traceback(ws, traceback.format_exc())
        render.err_console.print(
            f"[red]internal error:[/] {type(e).__name__}: {e}\n"
            "This is a bug in ftctl, not in your data. Committed events are safe: the journal only "
            "changes by whole transactions." + (f" Traceback saved to {log}." if log else "")
        )
        if os.environ.get("FTCTL_DEBUG"):
            traceback.print_exc()
        code = 2
    return code
