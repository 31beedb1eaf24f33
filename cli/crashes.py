"""Commands about crashes: the crash list and `ftctl reproduce`. Each parses, calls the control layer,
renders (cli/table.py names them)."""

from __future__ import annotations

from pathlib import Path

from ftctl.control.ledger import Ledger
from ftctl.events import types as ev

from . import render


def add_crashes(p) -> None:
    p.add_argument(
        "--json", action="store_true", help="print every crash as JSON, with its whole evidence"
    )


def cmd_crashes(args, ws) -> int:
    from ftctl.control.crashes import crashes

    rows = []
    for c in crashes(Ledger(render.said_readonly(ws.open_journal(write=False)))):
        e, r = c.event, c.reproduced
        rows.append(
            {
                "seq": c.seq,
                "ts": c.ts,
                "job": c.job,
                "crash": c.number,
                "category": e.category,
                "step": e.step,
                "exit_code": e.exit_code,
                "signal": e.signal,
                "suggestion": e.suggestion,
                "evidence": e.evidence,
                "rank": e.rank,
                "host": e.host,
                "verdict": r.event.verdict if r else None,
                "reproduction": r.event.summary if r else None,
                **({"reproduction_seq": r.seq} if r else {}),
            }
        )
    if args.json:
        render.print_json(rows)
        return 0
    if not rows:
        render.console.print("no crashes recorded")
        return 0
    from rich.table import Table

    t = Table(title="crashes")
    for c in (
        "time (UTC)",
        "seq",
        "job",
        "#",
        "category",
        "step",
        "exit",
        "signal",
        "evidence",
        "suggested fix",
        "reproduced?",
    ):
        t.add_column(c, overflow="fold")
    for r in rows:
        verdict = (
            f"[{render.VERDICT_STYLE.get(r['verdict'], '')}]{r['verdict']}[/]"
            if r["verdict"]
            else f"not replayed: [bold]ftctl reproduce {r['job']} --crash {r['crash']}[/]"
        )
        where = f" (rank {r['rank']}, {r['host']})" if r["rank"] is not None else ""
        t.add_row(
            r["ts"][:19].replace("T", " "),
            str(r["seq"]),
            r["job"],
            str(r["crash"]),
            f"[red]{r['category']}[/]{render.escape(where)}",
            _dash(r["step"]),
            _dash(r["exit_code"]),
            render.signal_name(r["signal"]),
            render.escape(render.evidence_line(r["evidence"])),
            render.escape(r["suggestion"]),
            verdict,
        )
    render.console.print(t)
    render.console.print(
        "the whole evidence (stderr tail) and each reproduction's findings: `ftctl crashes --json`, "
        "or the log named in it; # is the job's crash number (reproduced?: a property of the run, or "
        "of the environment — the command shown re-runs a crash never replayed)"
    )
    return 0


def add_reproduce(p) -> None:
    p.add_argument("job", help="job id (7 or 0007)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--crash",
        type=int,
        metavar="N",
        help="the job's crash number N (the # column of `ftctl crashes`; default: its last crash)",
    )
    which.add_argument(
        "--step",
        type=int,
        metavar="S",
        help="no crash: replay the run up to step S and show what it did",
    )
    p.add_argument(
        "--until-crash",
        action="store_true",
        help="go on past the crash step until the replay fails, or to the job's last step",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="write per-step loss, grad norm, lr, tokens and batch as JSON lines",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the recorded verdict as JSON (progress goes to stderr)",
    )


def cmd_reproduce(args, ws) -> int:
    from ftctl.control.reproduce import reproduce

    out = render.err_console if args.json else render.console
    r = reproduce(
        ws,
        Ledger(ws.open_journal()),
        args.job,
        crash=args.crash,
        step=args.step,
        until_crash=args.until_crash,
        trace_path=Path(args.trace) if args.trace else None,
        note=render.ConsoleReporter(out=out).note,
    )
    if args.json:
        body = (
            {k: v for k, v in ev.to_dict(r.event).items() if k != "type"}
            if r.event
            else {
                "job": r.job,
                "verdict": None,
                "summary": r.summary,
                "from_step": r.from_step,
                "target_step": r.target,
                "category": r.outcome.category,
                "step": r.outcome.step,
                "message": r.outcome.message,
                "examples": [ev.to_dict(e) for e in r.examples],
                "env_changed": r.env_changed,
                "bit_exact": r.bit_exact,
                "mismatch": r.mismatch,
                "notes": r.notes,
            }
        )
        render.print_json(
            {
                **body,
                "seq": r.seq,
                "checkpoint": r.checkpoint,
                "seconds": round(r.seconds, 2),
                "trace": args.trace,
            }
        )
        return 0
    for part in render.reproduction(r):
        render.console.print(part)
    if args.trace:
        render.console.print(
            f"  trace: {len(r.trace)} step(s) written to {render.escape(args.trace)} (JSON lines)"
        )
    if r.seq is not None:
        render.console.print(
            f"recorded as event {r.seq} (crash_reproduced); nothing of job {r.job}'s was written"
        )
    else:
        render.console.print(
            f"nothing recorded (no crash was compared); nothing of job {r.job}'s was written"
        )
    return 0


def _dash(v) -> str:
    return "-" if v is None else str(v)


def _dash(v) -> str:
    return "-" if v is None else str(v)
