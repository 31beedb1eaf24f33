"""Commands about jobs: submit, status, history, replay, pause/resume/retry/cancel, lineage set-head,
eval. Each parses, calls the control layer, renders (cli/table.py names them)."""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.machine import JOB_STATES
from ftctl.events import types as ev

from . import render


def _ledger(ws: Workspace, *, write: bool = True) -> Ledger:
    """``write=False`` for the queries (status, history, replay): looking never changes journal.db,
    not even by a snapshot (the daemon and every command that appends keep those fresh) — and works
    on storage ftctl cannot write (a read-only mount), saying so."""
    return Ledger(render.said_readonly(ws.open_journal(write=write)), write_snapshots=write)


def add_submit(p) -> None:
    p.add_argument(
        "file", help="the training data: JSONL, one example per line (chat, completions or text)"
    )
    p.add_argument("--name", help="a name for the job (default: the file name without .jsonl)")
    p.add_argument("--valid", help="validation JSONL (default: hold out every 20th example)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key for this job (repeatable)",
    )
    p.add_argument("--lineage", default="main", help="lineage the job belongs to (default: main)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a fresh adapter instead of warm-starting from the lineage",
    )
    p.add_argument(
        "--again",
        action="store_true",
        help="queue it even if the same data with the same config is already a job",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")


def cmd_submit(args, ws: Workspace) -> int:
    from ftctl.control.submit import submit

    ledger = _ledger(ws)
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
    from ftctl.control import status

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


def add_status(p) -> None:
    from ftctl.control.status import DEFAULT_LIMIT

    p.add_argument("job", nargs="?", help="one job (7 or 0007): everything about it")
    p.add_argument(
        "--state",
        action="append",
        choices=[x for x in JOB_STATES if x != "new"],
        metavar="STATE",
        help="only jobs in STATE (repeatable): " + ", ".join(x for x in JOB_STATES if x != "new"),
    )
    p.add_argument(
        "--all",
        action="store_true",
        help=f"every job (default: no rejected submission and, past {DEFAULT_LIMIT} jobs, "
        f"the last {DEFAULT_LIMIT} plus every unfinished one)",
    )
    p.add_argument("--json", action="store_true", help="every job unless --state is given")


def cmd_status(args, ws: Workspace) -> int:
    from ftctl.control import status

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


def add_history(p) -> None:
    p.add_argument("job", nargs="?", help="only this job's events (7 or 0007)")
    p.add_argument(
        "--since",
        type=_since,
        metavar="SEQ|AGE|TIME",
        help="only events after sequence number SEQ, or in the last AGE (90s, 10m, 2h, 1d), "
        "or at or after TIME (ISO, UTC unless it names a zone: 2026-11-23T14:00)",
    )
    p.add_argument(
        "-n", type=_count, metavar="N", help="only the last N events (of those selected)"
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--crashes", action="store_true", help="only crashes and failures")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON list; with --follow, one compact object per line",
    )


def cmd_history(args, ws: Workspace) -> int:
    from ftctl.control import history

    ledger = _ledger(ws, write=False)
    sel = history.Selection(job=args.job, crashes=args.crashes, since=args.since, last=args.n)
    recs, last = history.events(ledger, sel)
    if args.json and not args.follow:
        render.print_json([render.event_json(r) for r in recs])
        return 0
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
        for new in history.follow(ledger, sel, last):
            for r in new:
                if args.json:
                    render.print_ndjson(render.event_json(r))
                else:
                    render.console.print(render.event_line(r))
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_replay(args, ws: Workspace) -> int:
    from ftctl.control.history import replay

    r = replay(ws, render.said_readonly(ws.open_journal(write=False)), args.job, args.to)
    if args.json:
        render.print_json({"at_seq": r.at, **render.job_json(r.state)})
    else:
        render.console.print(f"job {r.job} as it was after event {r.at} (journal now at {r.last}):")
        render.console.print(render.job_panel(r.state, None))
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


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of events (0 or more)")
    return int(text)


def add_replay(p) -> None:
    p.add_argument("job", help="job id (7 or 0007)")
    p.add_argument(
        "--to",
        type=int,
        required=True,
        metavar="SEQ",
        help="journal sequence number (see `ftctl history`)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the job as JSON (the `status JOB --json` shape)"
    )


def add_control(p) -> None:
    p.add_argument("job", help="job id (7 or 0007)")
    p.add_argument("--json", action="store_true", help="print what was recorded as JSON")


def add_retry(p) -> None:
    add_control(p)
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change the job's recorded config (repeatable; a failed or paused job), validated as "
        "`submit --set`: it resumes from its last checkpoint where the change allows it "
        "(bit-exact for keys that change nothing it computes), from step 0 for a key that "
        "changes the adapter's shape (only with no checkpoint yet)",
    )
    p.add_argument(
        "--reshard",
        action="store_true",
        help="a data-parallel job may continue on another number of ranks than its checkpoints' "
        "(deterministic from then on, not bit-exact with an uninterrupted run)",
    )


NO_DAEMON = "no daemon is running: it is applied at the next `ftctl start`"


def cmd_control(args, ws) -> int:
    from ftctl.control import jobs

    if getattr(args, "set", None):  # retry --set: the job's recorded config changes
        out = jobs.retry(ws, _ledger(ws), args.job, args.set, reshard=args.reshard)
    else:
        out = jobs.request(
            _ledger(ws), args.job, args.action, ws=ws, reshard=getattr(args, "reshard", False)
        )
    if args.json:  # changes/effect: only for `retry --set`
        render.print_json(
            {k: v for k, v in asdict(out).items() if v or k not in ("changes", "effect")}
        )
        return 0
    if out.action in ("resume", "retry"):
        text = f"job {out.job} queued again; " + (
            "the running daemon picks it up within a second"
            if out.daemon_alive
            else "no daemon is running: `ftctl start` trains it"
        )
        if out.changes:
            text += f"; its config changed ({'; '.join(out.changes)}): {out.effect}, with a fresh restart budget"
        elif out.action == "retry":
            text += "; it resumes from its last good checkpoint, with a fresh restart budget"
            if getattr(args, "reshard", False):
                text += ", on the number of ranks its config now gives (not bit-exact with the earlier attempts)"
    elif out.deferred and not out.daemon_alive:
        text = f"job {out.job}: {out.action} requested; {NO_DAEMON}"
    elif out.deferred:
        text = (
            f"job {out.job}: {out.action} requested; the daemon acts on it within a second: it "
            + ("checkpoints and pauses it" if out.action == "pause" else "stops it")
        )
    elif out.action == "pause":
        text = f"job {out.job} paused; `ftctl resume {out.job}` to queue it again"
    else:
        text = (
            f"job {out.job} cancelled; its committed checkpoints stay on disk (jobs/{out.job}/checkpoints/): "
            "only its own retention (retention.keep_last, also by `ftctl doctor --fix`) ever prunes them, "
            "never a consolidation"
        )
    render.console.print(text)
    return 0


def add_set_head(p) -> None:
    p.add_argument("job", help="a completed job of the lineage (7 or 0007)")
    p.add_argument("--json", action="store_true", help='print {"lineage", "head", "previous"}')


def cmd_set_head(args, ws) -> int:
    from ftctl.control import consolidation

    e = consolidation.set_head(ws, _ledger(ws), args.job)
    if args.json:
        render.print_json({"lineage": e.lineage, "head": e.job, "previous": e.previous})
        return 0
    render.console.print(
        f"job {e.job} is now the head of lineage {e.lineage}"
        + (f" (was job {e.previous}, now a branch)" if e.previous else "")
        + ": new jobs of the lineage warm-start from its adapter, and consolidation fuses it"
    )
    return 0


def add_eval(p) -> None:
    p.add_argument("job", help="a completed job (7 or 0007)")
    p.add_argument(
        "--data", metavar="FILE", help="JSONL test data (default: the job's validation split)"
    )
    p.add_argument("--json", action="store_true", help="print the recorded result as JSON")


def cmd_eval(args, ws) -> int:
    from ftctl.control.evaluate import evaluate

    ledger = _ledger(ws)
    out = evaluate(ws, ledger, args.job, Path(args.data) if args.data else None)
    e = out.event
    cfg = ledger.state.jobs[e.job].config
    tuned = "trained layers (full fine-tune)" if cfg and cfg.fine_tune_type == "full" else "adapter"
    body = {k: v for k, v in ev.to_dict(e).items() if k != "type"}
    if args.json:
        render.print_json({**body, "at": out.at, "seq": out.seq, "warnings": out.warnings})
        return 0
    for w in out.warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    render.console.print(render.eval_table(e, ws, tuned))
    render.console.print(render.eval_verdict(e) + f" (recorded as event {out.seq})")
    return 0
