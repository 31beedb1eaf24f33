"""Commands that run or steer the daemon: start, recover, crashes, pause/resume/cancel, shutdown,
consolidate, config show, doctor, demo. Each parses, calls the control layer, renders."""

from __future__ import annotations

import os
import signal
from dataclasses import asdict
from pathlib import Path

from ftctl.control import consolidation, doctor, jobs, recover
from ftctl.control.daemon import Daemon
from ftctl.events import types as ev
from ftctl.recovery.ledger import Ledger

from . import render


def cmd_start(args, ws) -> int:
    out = render.err_console if args.json else render.console  # --json: stdout holds only the summary
    daemon = Daemon(ws, until_idle=args.until_idle, report=render.ConsoleReporter(quiet=args.quiet, out=out))
    before = _journal_seq(ws)
    handler = lambda signum, frame: daemon.stop(signal.Signals(signum).name)  # noqa: E731
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        reason = daemon.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.json:
        ledger = Ledger(ws.open_journal())
        try:
            render.print_json({"stopped": reason, **jobs.outcomes_since(ledger, before)})
        finally:
            ledger.close()
    return 0


def _journal_seq(ws) -> int:
    ledger = Ledger(ws.open_journal())
    try:
        return ledger.journal.last_seq()
    finally:
        ledger.close()


def cmd_recover(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    repairs = recover.run(ws, ledger, dry_run=args.dry_run)
    if args.json:
        render.print_json({"dry_run": args.dry_run, "repairs": [r.as_dict() for r in repairs]})
    elif not repairs:
        render.console.print("nothing to repair: the disk and the processes agree with the journal")
    else:
        verb = "would repair" if args.dry_run else "repaired"
        render.console.print(f"{verb} {len(repairs)} thing(s):")
        for r in repairs:
            render.console.print(f"  - {render.escape(r.what)}")
        if args.dry_run:
            render.console.print("dry run: nothing was changed; run `ftctl recover` to apply")
    return 0


def cmd_crashes(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    rows = [{"seq": r.seq, "ts": r.ts, "job": e.job, "category": e.category, "step": e.step, "exit_code": e.exit_code,
             "signal": e.signal, "suggestion": e.suggestion, "evidence": e.evidence}
            for r in ledger.journal.read() if isinstance(e := r.event, ev.Crashed)]
    if args.json:
        render.print_json(rows)
        return 0
    if not rows:
        render.console.print("no crashes recorded")
        return 0
    from rich.table import Table

    t = Table(title="crashes")
    for c in ("time (UTC)", "seq", "job", "category", "step", "exit", "signal", "evidence", "suggested fix"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r["ts"][:19].replace("T", " "), str(r["seq"]), r["job"], f"[red]{r['category']}[/]",
                  _dash(r["step"]), _dash(r["exit_code"]), render.signal_name(r["signal"]),
                  render.escape(render.evidence_line(r["evidence"])), render.escape(r["suggestion"]))
    render.console.print(t)
    render.console.print("the whole evidence (stderr tail): `ftctl crashes --json`, or the log named in it")
    return 0


def _dash(v) -> str:
    return "-" if v is None else str(v)


def cmd_control(args, ws) -> int:
    out = jobs.request(Ledger(ws.open_journal()), args.job, args.action)
    if args.json:
        render.print_json(asdict(out))
        return 0
    if out.action == "resume":
        text = f"job {out.job} queued again; a running daemon picks it up within a second"
    elif out.deferred:
        text = (f"job {out.job}: {out.action} requested; the daemon "
                + ("checkpoints and pauses it" if out.action == "pause" else "stops it")
                + " within a second (or at its next start if it is not running)")
    elif out.action == "pause":
        text = f"job {out.job} paused; `ftctl resume {out.job}` to queue it again"
    else:
        text = f"job {out.job} cancelled; its checkpoints stay on disk until retention or `ftctl doctor --fix`"
    render.console.print(text)
    return 0


def cmd_shutdown(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    requested = jobs.shutdown(ledger)
    stopped = jobs.wait_stopped(ledger, args.wait) if requested and args.wait else None
    if args.json:
        render.print_json({"requested": requested, "stopped": stopped if requested else True})
    elif not requested:
        render.console.print("no daemon is running; nothing to stop")
    else:
        render.console.print("shutdown requested: the daemon checkpoints the running job and exits within a second")
        if stopped:
            render.console.print("daemon stopped")
        elif stopped is False:
            render.err_console.print(f"the daemon is still running after {args.wait:g} s; it goes on checkpointing "
                                     "and stops by itself (`ftctl status` shows it), nothing was lost")
    return 1 if stopped is False else 0


def cmd_demo(args, ws) -> int:
    """Init a demo workspace, train a job end to end, kill its worker mid-run, show the recovery."""
    from ftctl.control.demo import tour

    from .main import main as ftctl

    home = ws.home if getattr(args, "home", None) or os.environ.get("FTCTL_HOME") else Path("ftctl-demo").resolve()
    t = tour(home, reset=args.reset, kill_at=args.kill_at, report=render.ConsoleReporter())
    render.console.rule("4. the journal tells the story")
    ftctl(["history", "--home", str(home)])
    render.console.rule("5. status of the finished job")
    ftctl(["status", t.job, "--home", str(home)])
    how = (f"killed at step {', '.join(map(str, t.killed_at))} and resumed" if t.killed_at
           else "never killed (the kill step was not reached)")
    render.console.print(f"adapter sha256, {how}: {t.sha256}\n"
                         f"adapter sha256, never interrupted:{' ' * max(1, len(how) - 17)}{t.reference_sha256}")
    if t.identical and t.killed_at:
        render.console.print("[green]identical[/]: the resume was bit-for-bit (weights, optimizer, LR position, data "
                             "cursor and RNG all restored)")
    elif t.identical:
        render.console.print("[green]identical[/], but nothing was killed, so this shows no resume")
    else:
        render.console.print("[red]DIFFERENT[/]: please report this")
    render.console.print(f"Try: ftctl history --home {home} --crashes · ftctl replay {t.job} --to SEQ --home {home}")
    return 0 if t.identical else 2


def cmd_consolidate(args, ws) -> int:
    out = render.err_console if args.json else render.console
    fused = consolidation.now_or_requested(ws, Ledger(ws.open_journal()), args.lineage,
                                           note=render.ConsoleReporter(out=out).note)
    if args.json:
        render.print_json({"lineage": args.lineage, "requested": fused is None,
                           "path": str(fused.path) if fused else None,
                           "weights_sha256": fused.weights_sha256 if fused else None})
    elif fused is None:
        render.console.print(f"consolidation of lineage {args.lineage} requested: the running daemon fuses it as soon "
                             "as no job of the lineage is queued or training (`ftctl history --follow` shows it)")
    else:
        render.console.print(f"[green]promoted[/] {fused.path} (weights sha256 {fused.weights_sha256[:16]}…)")
    return 0


def cmd_config_show(args, ws) -> int:
    from ftctl.control.effective import effective_config

    ledger = Ledger(ws.open_journal())
    rows, warnings = effective_config(ws, ledger.state, args.lineage)
    if args.json:
        render.print_json({"lineage": args.lineage, "config": rows, "warnings": warnings})
        return 0
    from rich.table import Table

    t = Table(title=f"effective config ({ws.config_path}, lineage {args.lineage})")
    for c in ("key", "value", "source"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r["key"], render.escape(render.yaml_value(r["value"])),
                  f"[dim]{r['source']}[/]" if r["source"] == "default" else r["source"])
    render.console.print(t)
    for w in warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    return 0


def cmd_doctor(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    fixed = []
    if args.fix:
        try:
            fixed = doctor.fix(ws, ledger)
        except recover.DaemonRunning as e:
            fixed = [f"nothing fixed: {e}"]
    findings = doctor.examine(ws, ledger)
    bad = [x for x in findings if x.severity != "ok"]
    if args.json:
        render.print_json({"ok": not bad, "fixed": fixed, "findings": [asdict(x) for x in findings]})
        return 1 if bad else 0
    from rich.table import Table

    for line in fixed:
        render.console.print(f"fixed: {render.escape(line)}")
    t = Table(title=f"ftctl doctor — {ws.home}")
    for c in ("check", "", "finding", "fix"):
        t.add_column(c, overflow="fold")
    style = {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]", "error": "[red]error[/]"}
    for x in findings:
        t.add_row(x.check, style[x.severity], render.escape(x.message), render.escape(x.fix))
    render.console.print(t)
    return 1 if bad else 0


def register(sub, home) -> None:
    s = sub.add_parser("start", parents=[home], help="run the daemon in the foreground and train the queue")
    s.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    s.add_argument("--quiet", action="store_true", help="no progress output (logs/daemon.log still gets it)")
    s.add_argument("--json", action="store_true",
                   help="at exit, print a JSON summary of the run (progress goes to stderr)")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("recover", parents=[home], help="replay the journal and repair disk and processes to match")
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    s.add_argument("--json", action="store_true", help="print the repairs as JSON")
    s.set_defaults(func=cmd_recover)

    s = sub.add_parser("crashes", parents=[home], help="crashes with category, step, evidence and the suggested fix")
    s.add_argument("--json", action="store_true", help="print every crash as JSON, with its whole evidence")
    s.set_defaults(func=cmd_crashes)

    for action, text in (("pause", "checkpoint and pause a job"), ("resume", "queue a paused job again"),
                         ("cancel", "cancel a job")):
        s = sub.add_parser(action, parents=[home], help=text)
        s.add_argument("job", help="job id (7 or 0007)")
        s.add_argument("--json", action="store_true", help="print what was recorded as JSON")
        s.set_defaults(func=cmd_control, action=action)

    s = sub.add_parser("shutdown", parents=[home], help="stop the daemon gracefully (checkpoint first)")
    s.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS until it has stopped (exit 1 if it has not)")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.set_defaults(func=cmd_shutdown)

    s = sub.add_parser("consolidate", parents=[home], help="fuse the lineage's adapter into a new base model")
    s.add_argument("--lineage", default="main", help="the lineage to consolidate (default: main)")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON (progress goes to stderr)")
    s.set_defaults(func=cmd_consolidate)

    s = sub.add_parser("config", parents=[home], help="configuration")
    csub = s.add_subparsers(dest="config_command", required=True, parser_class=s.__class__, metavar="COMMAND",
                            help="one of:")
    c = csub.add_parser("show", parents=[home], help="the effective config and where each value comes from")
    c.add_argument("--lineage", default="main", help="the lineage whose new jobs it describes (default: main)")
    c.add_argument("--json", action="store_true", help="print the keys, values and sources as JSON")
    c.set_defaults(func=cmd_config_show)

    s = sub.add_parser("doctor", parents=[home], help="health checks: journal, daemon, processes, disk, checkpoints, drift")
    s.add_argument("--json", action="store_true", help="print the findings as JSON")
    s.add_argument("--fix", action="store_true", help="apply the safe fixes (recovery, retention)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("demo", parents=[home], help="the one-minute tour on the embedded tiny model")
    s.add_argument("--reset", action="store_true", help="delete the demo workspace first")
    s.add_argument("--kill-at", type=int, default=17, metavar="STEP", help="step at which the worker is killed")
    s.set_defaults(func=cmd_demo)
