"""`ftctl`: the command line. Exit codes: 0 ok, 1 user error, 2 internal failure."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ftctl.adapters.workspace import Workspace, resolve_home
from ftctl.core.machine import JOB_STATES
from ftctl.recovery.ledger import Ledger, state_at

from . import render
from .args import Parser, document
from .lazy import lazy, loaded_classes

# Imported on first use (cli/lazy.py): `status`, `replay` and `recover --json` must not pay for
# the daemon, MLX, psutil or yaml.
status = lazy("ftctl.control.status")
jobs = lazy("ftctl.control.jobs")

# The errors a user can act on, by (module, class): `except user_errors()` catches those of the
# modules this command imported, which are all it can have raised.
USER_ERROR_NAMES = (
    ("ftctl.control.jobs", "UserError"),
    ("ftctl.control.consolidation", "ConsolidationRefused"),
    ("ftctl.control.daemon", "DaemonError"),
    ("ftctl.control.demo", "DemoRefused"),
    ("ftctl.control.recover", "DaemonRunning"),
    ("ftctl.adapters.workspace", "WorkspaceError"),
    ("ftctl.core.config", "ConfigError"),
    ("ftctl.core.dataset", "DataError"),
    ("ftctl.core.machine", "IllegalTransition"),
    ("ftctl.events.journal", "JournalError"),
    ("ftctl.control.submit", "SubmitError"),
    ("ftctl.core.state", "ReplayError"),
    ("ftctl.control.service", "ServiceError"),
    ("ftctl.control.reproduce", "ReproduceRefused"),
    ("ftctl.control.models", "ModelRefused"),
)


def user_errors() -> tuple[type, ...]:
    return loaded_classes(USER_ERROR_NAMES)


def UserError(message: str) -> Exception:  # noqa: N802 (control.jobs.UserError, imported when raised)
    return jobs.UserError(message)


def find_job(ledger: Ledger, job: str):
    return jobs.find_job(ledger, job)


def _ledger(ws: Workspace, *, write: bool = True) -> Ledger:
    """``write=False`` for the queries (status, history, replay): looking never changes journal.db,
    not even by a snapshot (the daemon and every command that appends keep those fresh) — and works
    on storage ftctl cannot write (a read-only mount), saying so."""
    return Ledger(render.said_readonly(ws.open_journal(write=write)), write_snapshots=write)


# --------------------------------------------------------------------------- commands


def cmd_init(args, ws: Workspace) -> int:
    data = None
    if args.demo:
        from ftctl.control.demo import init_demo

        paths = init_demo(ws.home)
        model, data = str(paths.model_dir), str(paths.data_dir)
        if not args.json:
            render.console.print(
                f"built the demo model at {paths.model_dir} and datasets in {paths.data_dir}"
            )
    else:
        if not args.model:
            raise UserError(
                "ftctl init needs --model (an mlx-lm model folder, a Hugging Face repo id or a .gguf "
                "file) or --demo"
            )
        from ftctl.control.setup import init

        note = (
            (lambda *a, **k: None)
            if args.json
            else render.ConsoleReporter(out=render.err_console).note
        )
        _, model = init(ws.home, args.model, dtype=args.dtype, note=note)
    if args.json:
        render.print_json(
            {"home": str(ws.home), "config": str(ws.config_path), "model": model, "demo_data": data}
        )
    else:
        render.console.print(
            f"[green]initialised[/] workspace {ws.home} (journal, ftctl.yaml, inbox/, jobs/, models/, logs/)"
        )
    return 0


def cmd_submit(args, ws: Workspace) -> int:
    ledger = _ledger(ws)
    from ftctl.control.submit import submit

    sub = submit(
        ws,
        ledger,
        Path(args.file),
        name=args.name,
        valid=Path(args.valid) if args.valid else None,
        overrides=args.set or [],
        lineage=args.lineage,
        fresh=args.fresh,
        again=args.again,
        note=(lambda *a, **k: None)
        if args.json
        else render.ConsoleReporter(out=render.err_console).note,
    )
    if args.json:
        render.print_json(
            {
                "job": sub.job,
                "state": sub.state,
                "format": sub.report.format,
                "lines": sub.report.lines,
                "valid": sub.report.valid,
                "bad": len(sub.report.problems),
                "bad_ratio": sub.report.bad_ratio,
                "reasons": sub.reasons,
                "warnings": sub.warnings,
                "problems": [f"line {p.line}: {p.reason}" for p in sub.report.problems[:50]],
            }
        )
        return 0 if sub.state == "queued" else 1
    rep = sub.report
    for p in rep.problems[:10]:
        render.err_console.print(
            f"  [yellow]{render.escape(args.file)}:{p.line}[/] {render.escape(p.reason)}"
        )
    if len(rep.problems) > 10:
        render.err_console.print(f"  … and {len(rep.problems) - 10} more bad lines")
    for w in sub.warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    if sub.state == "rejected":
        render.err_console.print(
            f"[red]rejected[/] job {sub.job}: " + render.escape("; ".join(sub.reasons))
        )
        render.err_console.print(
            "The data file was left untouched and nothing was queued. Fix the lines above and submit again."
        )
        return 1
    render.console.print(
        f"[green]queued[/] job {sub.job} ({rep.valid} valid {rep.format} examples of {rep.lines}); "
        + render.escape(_who_trains(ws, ledger, sub.job))
    )
    return 0


def _who_trains(ws: Workspace, ledger: Ledger, job: str) -> str:
    """What happens next, as the daemon lock says (not the journal's word): a live daemon picks the
    job up by itself; otherwise `ftctl start` is what trains it."""
    d = status.daemon_view(ws, ledger)
    if d.running:
        ahead = [
            j.job
            for j in ledger.state.jobs.values()
            if j.job < job and j.state in ("queued", "training", "checkpointing")
        ]
        return f"the running daemon (pid {d.pid}) picks it up" + (
            f" after {len(ahead)} job(s) queued or training before it ({', '.join(ahead)})"
            if ahead
            else " now"
        )
    if d.alive:
        return "a daemon is starting (it holds the lock): it picks it up once it runs"
    return "run `ftctl start` to train" + (
        " (the last daemon died without recording its stop: `ftctl start` recovers first)"
        if d.died
        else ""
    )


def cmd_status(args, ws: Workspace) -> int:
    ledger = _ledger(ws, write=False)
    if args.job:
        d, v = status.job_status(ws, ledger, args.job)
        if args.json:
            render.print_json(render.job_json(v.job, v.metrics, v))
        else:
            if d.died or v.stale:
                render.console.print(f"daemon {render.escape(d.summary)}")
            render.console.print(render.job_panel(v.job, v.metrics, v))
        return 0
    # A program gets every job unless it asks for a selection; a person gets the readable default.
    st = status.status(
        ws, ledger, states=args.state or (), everything=args.all or (args.json and not args.state)
    )
    if args.json:
        render.print_json(
            {
                "seq": st.seq,
                "daemon": render.daemon_json(st.daemon),
                "jobs": [render.job_json(v.job, v.metrics, v) for v in st.jobs],
                "lineages": [
                    render.as_dict(status.located_lineage(ws, lin))
                    for lin in st.projection.lineages.values()
                ],
                "hidden": st.hidden,
                "inbox": st.inbox,
            }
        )
        return 0
    render.console.print(
        f"workspace {ws.home}  ·  journal seq {st.seq}  ·  daemon {render.escape(st.daemon.summary)}"
    )
    if st.jobs:
        render.console.print(render.status_table(st.jobs))
    elif not st.projection.jobs:
        render.console.print("no jobs yet: `ftctl submit FILE.jsonl` or drop a file into inbox/")
    else:
        render.console.print("no job to show")
    for lin in st.projection.lineages.values():
        if lin.head_job or lin.branches:
            render.console.print(render.lineage_line(lin))
    for f in st.inbox:
        render.console.print(
            f"inbox: {render.escape(f['file'])} ({f['bytes'] / 1e6:.1f} MB): {render.escape(f['note'])}"
        )
    if st.hidden:
        why = ", ".join(f"{n} {k}" for k, n in st.hidden.items())
        render.console.print(
            f"{sum(st.hidden.values())} job(s) not shown ({why}): `ftctl status --all` shows every "
            "job, `--state STATE` those in a state (e.g. `--state rejected`)"
        )
    return 0


def cmd_history(args, ws: Workspace) -> int:
    ledger = _ledger(ws, write=False)
    stream = None
    if args.job:
        stream = f"job:{find_job(ledger, args.job).job}"
    crashes_only = args.crashes

    def batch(after: int):
        recs = list(ledger.journal.read(after=after, stream=stream))
        if crashes_only:
            recs = [r for r in recs if type(r.event).kind() in ("crashed", "failed")]
        return recs

    after = _since_seq(ledger, args.since)
    if args.n is not None and stream is None and not crashes_only:
        after = max(
            after, ledger.journal.last_seq() - args.n
        )  # seq has no gaps: skip reading the rest
    recs = batch(after)
    if args.n is not None:
        recs = recs[-args.n :] if args.n else []
    if args.json and not args.follow:
        render.print_json([render.event_json(r) for r in recs])
        return 0
    last = ledger.journal.last_seq()
    if args.json:
        for r in recs:
            render.print_ndjson(render.event_json(r))
    elif recs:
        render.console.print(
            render.history_table(recs, title=f"history{' of job ' + args.job if args.job else ''}")
        )
    elif not args.follow:
        render.console.print("no events" + (f" since {args.since[1]}" if args.since else ""))
    if not args.follow:
        return 0
    try:
        while True:
            time.sleep(0.5)
            new = batch(last)
            last = ledger.journal.last_seq()
            for r in new:
                if args.json:
                    render.print_ndjson(render.event_json(r))
                else:
                    render.console.print(
                        f"{r.ts[:19].replace('T', ' ')}  {r.seq:>6}  {r.stream:<12} "
                        f"{type(r.event).kind():<22} {render.event_fields(r)}"
                    )
    except KeyboardInterrupt:
        return 0


def _since(text: str) -> tuple[str, str]:
    """`--since`: a sequence number (events after it, as before), a duration back from now
    (`90s`, `10m`, `2h`, `1d`) or an ISO time (UTC unless it names a zone). Returns (kind, text)
    with kind "seq" or the event time it means, as the journal writes times."""
    text = text.strip()
    if text.isdigit():
        return "seq", text
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if m:
        at = datetime.now(timezone.utc) - timedelta(
            seconds=float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
        )
    else:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a sequence number, a duration (10m, 2h, 1d) or an ISO time (2026-11-23T14:00)"
            ) from None
        at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), text


def _since_seq(ledger: Ledger, since: tuple[str, str] | None) -> int:
    if since is None:
        return 0
    kind, text = since
    return int(text) if kind == "seq" else ledger.journal.seq_before(kind)


def cmd_replay(args, ws: Workspace) -> int:
    # Only the past is folded (the nearest snapshot at or before --to, then its tail): the present
    # projection is loaded only to word an error about a job id that does not exist.
    journal = render.said_readonly(ws.open_journal(write=False))
    try:
        job = (
            args.job if journal.stream_version(f"job:{args.job}") else args.job.zfill(4)
        )  # as find_job: "7" finds "0007"
        if not journal.stream_version(f"job:{job}"):
            find_job(
                Ledger(journal, write_snapshots=False), args.job
            )  # raises, naming the recent jobs
        last = journal.last_seq()
        if args.to < 0 or args.to > last:
            raise UserError(f"--to {args.to} is outside the journal (seq 0..{last})")
        p = state_at(journal, args.to)
    finally:
        journal.close()
    past = p.jobs.get(job)
    if past is None:
        raise UserError(f"job {job} did not exist yet at seq {args.to} (it was submitted later)")
    past = status.located(ws, past)  # its paths where the workspace is now, as `status` shows them
    if args.json:
        render.print_json({"at_seq": args.to, **render.job_json(past)})
    else:
        render.console.print(f"job {job} as it was after event {args.to} (journal now at {last}):")
        render.console.print(render.job_panel(past, None))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument(
        "--home",
        default=argparse.SUPPRESS,
        help="workspace directory (default: $FTCTL_HOME or ~/.ftctl)",
    )
    p = Parser(
        prog="ftctl",
        description="Crash-proof controller for MLX LoRA fine-tuning.",
        parents=[home],
        epilog="Start with `ftctl demo`, or `ftctl init --model PATH`, `ftctl submit FILE.jsonl`, `ftctl start`. "
        "`ftctl COMMAND --help` describes each command.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="print ftctl's version and exit")
    sub = p.add_subparsers(
        dest="command", required=True, parser_class=Parser, metavar="COMMAND", help="one of:"
    )

    s = sub.add_parser("init", parents=[home], help="create a workspace")
    s.add_argument(
        "--model",
        help="the base model: an mlx-lm model folder, a Hugging Face repo id (from the local "
        "cache) or a Llama-family .gguf file (converted into models/imported/)",
    )
    s.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="with a .gguf --model: dequantize to this dtype (default: keep the file's quantization, QLoRA)",
    )
    s.add_argument(
        "--demo", action="store_true", help="build the embedded tiny demo model and data, offline"
    )
    s.add_argument("--json", action="store_true", help="print what was created as JSON")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("submit", parents=[home], help="validate a JSONL data file and queue a job")
    s.add_argument(
        "file", help="the training data: JSONL, one example per line (chat, completions or text)"
    )
    s.add_argument("--name", help="a name for the job (default: the file name without .jsonl)")
    s.add_argument("--valid", help="validation JSONL (default: hold out every 20th example)")
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key for this job (repeatable)",
    )
    s.add_argument("--lineage", default="main", help="lineage the job belongs to (default: main)")
    s.add_argument(
        "--fresh",
        action="store_true",
        help="start a fresh adapter instead of warm-starting from the lineage",
    )
    s.add_argument(
        "--again",
        action="store_true",
        help="queue it even if the same data with the same config is already a job",
    )
    s.add_argument("--json", action="store_true", help="print the verdict as JSON")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser(
        "status",
        parents=[home],
        help="jobs and daemon: the journal, checked against the daemon lock",
    )
    s.add_argument("job", nargs="?", help="one job (7 or 0007): everything about it")
    s.add_argument(
        "--state",
        action="append",
        choices=[x for x in JOB_STATES if x != "new"],
        metavar="STATE",
        help="only jobs in STATE (repeatable): " + ", ".join(x for x in JOB_STATES if x != "new"),
    )
    s.add_argument(
        "--all",
        action="store_true",
        help=f"every job (default: no rejected submission and, past {status.DEFAULT_LIMIT} jobs, "
        f"the last {status.DEFAULT_LIMIT} plus every unfinished one)",
    )
    s.add_argument("--json", action="store_true", help="every job unless --state is given")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("history", parents=[home], help="the event timeline")
    s.add_argument("job", nargs="?", help="only this job's events (7 or 0007)")
    s.add_argument(
        "--since",
        type=_since,
        metavar="SEQ|AGE|TIME",
        help="only events after sequence number SEQ, or in the last AGE (90s, 10m, 2h, 1d), "
        "or at or after TIME (ISO, UTC unless it names a zone: 2026-11-23T14:00)",
    )
    s.add_argument(
        "-n", type=_count, metavar="N", help="only the last N events (of those selected)"
    )
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    s.add_argument("--crashes", action="store_true", help="only crashes and failures")
    s.add_argument(
        "--json",
        action="store_true",
        help="a JSON list; with --follow, one compact object per line",
    )
    s.set_defaults(func=cmd_history)

    s = sub.add_parser(
        "replay", parents=[home], help="a job's state exactly as it was after event SEQ"
    )
    s.add_argument("job", help="job id (7 or 0007)")
    s.add_argument(
        "--to",
        type=int,
        required=True,
        metavar="SEQ",
        help="journal sequence number (see `ftctl history`)",
    )
    s.add_argument(
        "--json", action="store_true", help="print the job as JSON (the `status JOB --json` shape)"
    )
    s.set_defaults(func=cmd_replay)

    from . import (
        commands,
        lora,
        views,
    )  # the daemon-side commands and the views register themselves

    commands.register(sub, home)
    lora.register(sub, home)
    views.register(sub, home)
    document(p)
    return p


class _Version(argparse.Action):
    """--version: reads the package version only when asked (importlib.metadata is not free)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ftctl.control.daemon import VERSION

        sys.stdout.write(f"ftctl {VERSION}\n")
        parser.exit()


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of events (0 or more)")
    return int(text)


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


def _storage(e: BaseException, ws: Workspace):
    """The storage's refusal behind an OSError (EROFS, EACCES/EPERM, ENOSPC) a command met writing the
    workspace (its lock, a job's data copy…): said as such, never as a bug or a damaged journal."""
    if not isinstance(e, OSError) or e.errno not in _STORAGE_ERRNOS:
        return None
    from ftctl.events.journal import storage_problem

    return storage_problem(e.filename or ws.home, e)


_STORAGE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


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


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # every file and folder ftctl creates is private to its user
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_jobs"]:
        return _job_ids(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    ws = resolve_home(getattr(args, "home", None))
    try:
        code = args.func(args, ws)
    except user_errors() as e:
        render.err_console.print(f"[red]error:[/] {render.escape(str(e))}")
        if getattr(
            args, "json", False
        ):  # a program reading stdout gets the refusal too, not nothing
            render.print_json({"error": str(e), "exit": 1})
        code = 1
    except KeyboardInterrupt:
        render.err_console.print("interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as e:  # internal failure: say so plainly, keep the traceback in a log
        problem = _storage(e, ws)
        if problem is not None:  # a read-only mount, permissions, a full disk: the user's to fix
            render.err_console.print(f"[red]error:[/] {render.escape(str(problem))}")
            if getattr(args, "json", False):
                render.print_json({"error": str(problem), "exit": 1})
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
