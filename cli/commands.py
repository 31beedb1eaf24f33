"""Commands that run or steer the daemon: start, recover, crashes, pause/resume/cancel, shutdown,
consolidate, eval, config show, doctor, demo. Each parses, calls the control layer, renders."""

from __future__ import annotations

import signal
import sys
from dataclasses import asdict
from pathlib import Path

from ftctl.events import types as ev
from ftctl.recovery.ledger import Ledger

from . import render
from .args import port, seconds
from .lazy import lazy

# imported on first use (cli/lazy.py): each command loads only the control modules it calls
consolidation = lazy("ftctl.control.consolidation")
doctor = lazy("ftctl.control.doctor")
jobs = lazy("ftctl.control.jobs")
recover = lazy("ftctl.control.recover")
status = lazy("ftctl.control.status")


def cmd_start(args, ws) -> int:
    from ftctl.control.daemon import Daemon

    out = (
        render.err_console if args.json else render.console
    )  # --json: stdout holds only the summary
    if args.serve:
        from .views import check_bind, serve_app
        from .web.app import run_in_thread

        check_bind(args.host, args.token)
        url = run_in_thread(serve_app(ws, args.token, args.host), args.host, args.port)
        out.print(
            f"status page: {url}"
            + ("?token=…" if args.token else "")
            + " (read-only; it stops with the daemon)"
        )
    daemon = Daemon(
        ws, until_idle=args.until_idle, report=render.ConsoleReporter(quiet=args.quiet, out=out)
    )
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
    stuck = daemon.stuck()
    if args.until_idle and stuck:  # a script waiting for the queue must not read "all done"
        for job, why in stuck.items():
            render.err_console.print(f"[red]job {job} {render.escape(why)}[/]")
        render.err_console.print(
            f"{len(stuck)} job(s) did not complete: see `ftctl status`; everything they committed is kept"
        )
        return 1
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


NO_DAEMON = "no daemon is running: it is applied at the next `ftctl start`"


def cmd_control(args, ws) -> int:
    if getattr(args, "set", None):  # retry --set: the job's recorded config changes
        out = jobs.retry(ws, Ledger(ws.open_journal()), args.job, args.set, reshard=args.reshard)
    else:
        out = jobs.request(
            Ledger(ws.open_journal()),
            args.job,
            args.action,
            ws=ws,
            reshard=getattr(args, "reshard", False),
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


def cmd_shutdown(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    requested = jobs.shutdown(ledger, ws=ws)
    stopped = jobs.wait_stopped(ledger, args.wait, ws=ws) if requested and args.wait else None
    if args.json:
        render.print_json({"requested": requested, "stopped": stopped if requested else True})
    elif not requested:
        d = status.daemon_view(ws, ledger)
        render.console.print(
            "no daemon is running; nothing to stop"
            + (f"\ndaemon {render.escape(d.summary)}" if d.died else "")
        )
    else:
        render.console.print(
            "shutdown requested: the daemon acts on it within a second: it checkpoints the running "
            "job, then exits"
            + ("" if args.wait else " (`ftctl shutdown --wait S` waits and says when)")
        )
        if stopped:
            render.console.print("daemon stopped")
        elif stopped is False:
            render.err_console.print(
                f"the daemon is still running after {args.wait:g} s; it goes on checkpointing "
                "and stops by itself (`ftctl status` shows it), nothing was lost"
            )
    return 1 if stopped is False else 0


def cmd_demo(args, ws) -> int:
    """Init a demo workspace, train a job end to end, kill its worker mid-run, show the recovery.
    Its folder is --home if given on this command, else ./ftctl-demo (never $FTCTL_HOME: that is
    where a user's real workspace lives)."""
    from ftctl.control.demo import tour

    from .main import main as ftctl

    home = ws.home if getattr(args, "home", None) else Path("ftctl-demo").resolve()
    t = tour(home, reset=args.reset, kill_at=args.kill_at, report=render.ConsoleReporter())
    render.console.rule("4. the journal tells the story")
    ftctl(["history", "--home", str(home)])
    render.console.rule("5. status of the finished job")
    ftctl(["status", t.job, "--home", str(home)])
    if t.killed_at:
        render.console.rule("6. reproduce the crash: a property of the run, or of the environment?")
        ftctl(["reproduce", t.job, "--home", str(home)])
    killed = (
        f"killed at step {', '.join(map(str, t.killed_at))} and resumed"
        if t.killed_at
        else "never killed (the journal records no kill)"
    )
    render.console.print(
        f"adapter sha256, {killed}: {t.sha256}\n"
        f"adapter sha256, {'never interrupted':<{len(killed)}}: {t.reference_sha256}"
    )
    if t.proven:
        render.console.print(
            "[green]identical[/], from the same data and config (sha256 checked in both journals), with "
            f"the kill at step {t.kill_at} recorded: the resume was bit-for-bit (weights, optimizer, "
            "LR position, data cursor and RNG all restored)"
        )
    elif t.killed_at != [t.kill_at]:
        render.err_console.print(
            f"[red]not shown[/]: the journal records the worker killed at {t.killed_at or 'no step'}, "
            f"not once at step {t.kill_at}; this run proves nothing about resuming"
        )
    elif not t.same_inputs:
        render.err_console.print(
            "[red]not comparable[/]: the two jobs recorded different data or config sha256"
        )
    else:
        render.err_console.print(
            "[red]DIFFERENT[/] from the same inputs: the resume was not bit-for-bit. This is a bug: "
            f"please report it with {home}/journal.db"
        )
    render.console.print(
        f"Try: ftctl history --home {home} --crashes · ftctl replay {t.job} --to SEQ --home {home}"
    )
    return 0 if t.proven else (2 if t.killed_at == [t.kill_at] and t.same_inputs else 1)


def cmd_consolidate(args, ws) -> int:
    out = render.err_console if args.json else render.console
    fused = consolidation.now_or_requested(
        ws, Ledger(ws.open_journal()), args.lineage, note=render.ConsoleReporter(out=out).note
    )
    if args.json:
        render.print_json(
            {
                "lineage": args.lineage,
                "requested": fused is None,
                "path": str(fused.path) if fused else None,
                "weights_sha256": fused.weights_sha256 if fused else None,
            }
        )
    elif fused is None:
        render.console.print(
            f"consolidation of lineage {args.lineage} requested: the running daemon fuses it as soon "
            "as no job of the lineage is queued or training (`ftctl history --follow` shows it)"
        )
    else:
        render.console.print(
            f"[green]promoted[/] {fused.path} (weights sha256 {fused.weights_sha256[:16]}…)"
        )
    return 0


def cmd_set_head(args, ws) -> int:
    e = consolidation.set_head(ws, Ledger(ws.open_journal()), args.job)
    if args.json:
        render.print_json({"lineage": e.lineage, "head": e.job, "previous": e.previous})
        return 0
    render.console.print(
        f"job {e.job} is now the head of lineage {e.lineage}"
        + (f" (was job {e.previous}, now a branch)" if e.previous else "")
        + ": new jobs of the lineage warm-start from its adapter, and consolidation fuses it"
    )
    return 0


def cmd_eval(args, ws) -> int:
    from ftctl.control.evaluate import evaluate

    ledger = Ledger(ws.open_journal())
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
    render.console.print(eval_table(e, ws, tuned))
    render.console.print(verdict(e) + f" (recorded as event {out.seq})")
    return 0


def eval_table(e: ev.AdapterEvaluated, ws, tuned: str = "adapter"):
    """An `adapter_evaluated` record as `ftctl eval` shows it (also `ftctl lora --test`); ``tuned``
    names what was trained (a full fine-tune's layers)."""
    from rich.table import Table

    owner = f"job {e.job}" if e.job else "the adapter"
    t = Table(
        title=f"{owner} on {render.escape(str(ws.abs(e.data_path)))} ({e.examples} examples, "
        f"{e.tokens} tokens scored)"
    )
    p = e.preference  # preference pairs: the loss is the chosen answers'; how each model ranks them
    cols = ("model", "loss", "perplexity") + (("pairs ranked right", "margin") if p else ())
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")
    t.add_row(
        f"base {render.escape(str(ws.abs(e.base_model)))}",
        _num(e.base_loss, ".4f"),
        _num(e.base_ppl, ".2f"),
        *((_num(p.base_accuracy, ".1%"), _num(p.base_margin, "+.3f")) if p else ()),
    )
    t.add_row(
        f"base + {tuned} {'of job ' + e.job if e.job else render.escape(str(ws.abs(e.adapter_path)))}",
        _num(e.adapter_loss, ".4f"),
        _num(e.adapter_ppl, ".2f"),
        *((_num(p.adapter_accuracy, ".1%"), _num(p.adapter_margin, "+.3f")) if p else ()),
    )
    return t


def _num(x: float | None, spec: str) -> str:
    return "not finite" if x is None else format(x, spec)


def verdict(e: ev.AdapterEvaluated) -> str:
    if (p := e.preference) is not None:  # preference pairs: judged by how they are ranked
        return (
            f"pairs ranked right: {_num(p.base_accuracy, '.1%')} → {_num(p.adapter_accuracy, '.1%')}; "
            f"DPO reward against the base (beta {p.beta:g}): margin {_num(p.reward_margin, '+.4f')}, "
            f"positive on {_num(p.reward_accuracy, '.1%')} of pairs (loss and perplexity: the chosen "
            "answers')"
        )
    if e.base_loss is None or e.adapter_loss is None:
        return "[red]a loss is not finite[/]: no comparison"
    change = e.adapter_loss - e.base_loss
    ppl = (
        f", perplexity {e.base_ppl:.2f} → {e.adapter_ppl:.2f}"
        if e.base_ppl is not None and e.adapter_ppl is not None
        else ""
    )
    if change < 0:
        return (
            f"[green]fine-tuning helped[/]: loss {change:+.4f} ({change / e.base_loss:+.1%}){ppl}"
        )
    return f"[yellow]fine-tuning did not help on this data[/]: loss {change:+.4f}{ppl}"


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
        t.add_row(
            r["key"],
            render.escape(render.yaml_value(r["value"])),
            f"[dim]{r['source']}[/]" if r["source"] == "default" else r["source"],
        )
    render.console.print(t)
    for w in warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    return 0


def cmd_doctor(args, ws) -> int:
    # without --fix it only looks: it works (and says why it cannot write) on a read-only mount too
    ledger = Ledger(render.said_readonly(ws.open_journal(write=args.fix)))
    fixed = []
    if args.fix:
        try:
            fixed = doctor.fix(ws, ledger)
        except recover.DaemonRunning as e:
            fixed = [f"nothing fixed: {e}"]
    findings = doctor.examine(ws, ledger)
    bad = [x for x in findings if x.severity != "ok"]
    if args.json:
        render.print_json(
            {"ok": not bad, "fixed": fixed, "findings": [asdict(x) for x in findings]}
        )
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


def cmd_service(args, ws) -> int:
    from ftctl.control import service

    what = args.service_command
    if what == "install" and args.print:
        from ftctl.adapters.service import platform

        plat = args.platform or platform()
        path, data = service.render(ws, args.system, plat)
        render.err_console.print(
            f"[dim]# would be written to {render.escape(str(path))} (nothing was changed)[/]"
        )
        sys.stdout.write(data.decode())
        return 0
    if args.platform:
        raise jobs.UserError(
            "--platform only goes with `ftctl service install --print`: install, uninstall and status "
            "act on this machine"
        )
    if what == "status":
        st = service.status(ws, args.system)
        if args.json:
            render.print_json(st)
        elif st["foreign_file"]:
            render.console.print(
                f"{st['path']} exists but was not written by ftctl: no ftctl service is installed"
            )
        elif not st["installed"]:
            render.console.print(
                f"no service installed for {ws.home} (`ftctl service install` installs one at {st['path']})"
            )
        else:
            fresh = {
                True: "up to date",
                False: "differs from what `ftctl service install` writes now (run it again "
                "to update)",
                None: f"cannot compare: {st['config_problem']}",
            }[st["up_to_date"]]
            manager = (
                f"service manager: {st['manager_state']}"
                if st["manager_state"]
                else "its service manager is not running here"
            )
            render.console.print(
                f"service {st['name']} installed at {st['path']} ({fresh}); {manager}; "
                f"daemon {'running (' + st['daemon'] + ')' if st['daemon'] else 'not running'}"
            )
        return 0
    out = (service.install if what == "install" else service.uninstall)(ws, args.system)
    if args.json:
        render.print_json(
            {
                "platform": out.platform,
                "path": str(out.path),
                "name": out.name,
                "action": out.action,
                "notes": out.notes,
            }
        )
        return 0
    head = {
        "written": f"[green]installed[/] {out.name} at",
        "updated": f"[green]updated[/] {out.name} at",
        "unchanged": f"{out.name} already installed, unchanged, at",
        "removed": f"[green]removed[/] {out.name} from",
        "absent": "no service file at",
    }[out.action]
    render.console.print(f"{head} {render.escape(str(out.path))}")
    for n in out.notes:
        render.console.print(f"  {render.escape(n)}")
    return 0


def cmd_completion(args, ws) -> int:
    from .completion import SHELLS
    from .main import build_parser

    sys.stdout.write(SHELLS[args.shell](build_parser()))
    return 0


def register(sub, home) -> None:
    s = sub.add_parser(
        "start", parents=[home], help="run the daemon in the foreground and train the queue"
    )
    s.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    s.add_argument(
        "--quiet", action="store_true", help="no progress output (logs/daemon.log still gets it)"
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="at exit, print a JSON summary of the run (progress goes to stderr)",
    )
    s.add_argument(
        "--serve", action="store_true", help="also serve the live status page (as `ftctl serve`)"
    )
    s.add_argument(
        "--port",
        type=port,
        default=8765,
        help="with --serve: TCP port (default 8765; 0: any free port)",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="with --serve: address to bind (default 127.0.0.1; any other needs --token)",
    )
    s.add_argument("--token", metavar="TOKEN", help="with --serve: every request must carry it")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser(
        "recover", parents=[home], help="replay the journal and repair disk and processes to match"
    )
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    s.add_argument("--json", action="store_true", help="print the repairs as JSON")
    s.set_defaults(func=cmd_recover)

    s = sub.add_parser(
        "crashes",
        parents=[home],
        help="crashes with category, step, evidence and the suggested fix",
    )
    s.add_argument(
        "--json", action="store_true", help="print every crash as JSON, with its whole evidence"
    )
    s.set_defaults(func=cmd_crashes)

    s = sub.add_parser(
        "reproduce",
        parents=[home],
        help="re-run a crash from its last checkpoint: reproduced, or environmental?",
    )
    s.add_argument("job", help="job id (7 or 0007)")
    which = s.add_mutually_exclusive_group()
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
    s.add_argument(
        "--until-crash",
        action="store_true",
        help="go on past the crash step until the replay fails, or to the job's last step",
    )
    s.add_argument(
        "--trace",
        metavar="FILE",
        help="write per-step loss, grad norm, lr, tokens and batch as JSON lines",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the recorded verdict as JSON (progress goes to stderr)",
    )
    s.set_defaults(func=cmd_reproduce)

    for action, text in (
        ("pause", "checkpoint and pause a job"),
        ("resume", "queue a paused job again"),
        (
            "retry",
            "queue a failed job again: it continues from its last good checkpoint, budget reset",
        ),
        ("cancel", "cancel a job"),
    ):
        s = sub.add_parser(action, parents=[home], help=text)
        s.add_argument("job", help="job id (7 or 0007)")
        s.add_argument("--json", action="store_true", help="print what was recorded as JSON")
        if action == "retry":
            s.add_argument(
                "--set",
                action="append",
                metavar="KEY=VALUE",
                help="change the job's recorded config (repeatable; a failed or paused job), validated as "
                "`submit --set`: it resumes from its last checkpoint where the change allows it "
                "(bit-exact for keys that change nothing it computes), from step 0 for a key that "
                "changes the adapter's shape (only with no checkpoint yet)",
            )
            s.add_argument(
                "--reshard",
                action="store_true",
                help="a data-parallel job may continue on another number of ranks than its checkpoints' "
                "(deterministic from then on, not bit-exact with an uninterrupted run)",
            )
        s.set_defaults(func=cmd_control, action=action)

    s = sub.add_parser(
        "shutdown", parents=[home], help="stop the daemon gracefully (checkpoint first)"
    )
    s.add_argument(
        "--wait",
        type=seconds,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS until it has stopped (exit 1 if it has not)",
    )
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.set_defaults(func=cmd_shutdown)

    s = sub.add_parser(
        "consolidate", parents=[home], help="fuse the lineage's adapter into a new base model"
    )
    s.add_argument("--lineage", default="main", help="the lineage to consolidate (default: main)")
    s.add_argument(
        "--json", action="store_true", help="print the outcome as JSON (progress goes to stderr)"
    )
    s.set_defaults(func=cmd_consolidate)

    s = sub.add_parser(
        "lineage", parents=[home], help="a lineage's head: which adapter it continues from"
    )
    lsub = s.add_subparsers(
        dest="lineage_command",
        required=True,
        parser_class=s.__class__,
        metavar="COMMAND",
        help="set-head",
    )
    c = lsub.add_parser(
        "set-head", parents=[home], help="make a completed job the lineage's head (e.g. a branch)"
    )
    c.add_argument("job", help="a completed job of the lineage (7 or 0007)")
    c.add_argument("--json", action="store_true", help='print {"lineage", "head", "previous"}')
    c.set_defaults(func=cmd_set_head)
    s = sub.add_parser(
        "eval",
        parents=[home],
        help="test loss and perplexity of a job's adapter and of its base model",
    )
    s.add_argument("job", help="a completed job (7 or 0007)")
    s.add_argument(
        "--data", metavar="FILE", help="JSONL test data (default: the job's validation split)"
    )
    s.add_argument("--json", action="store_true", help="print the recorded result as JSON")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("config", parents=[home], help="configuration")
    csub = s.add_subparsers(
        dest="config_command",
        required=True,
        parser_class=s.__class__,
        metavar="COMMAND",
        help="one of:",
    )
    c = csub.add_parser(
        "show", parents=[home], help="the effective config and where each value comes from"
    )
    c.add_argument(
        "--lineage", default="main", help="the lineage whose new jobs it describes (default: main)"
    )
    c.add_argument("--json", action="store_true", help="print the keys, values and sources as JSON")
    c.set_defaults(func=cmd_config_show)

    s = sub.add_parser(
        "doctor",
        parents=[home],
        help="health checks: journal, daemon, processes, disk, checkpoints, drift",
    )
    s.add_argument("--json", action="store_true", help="print the findings as JSON")
    s.add_argument("--fix", action="store_true", help="apply the safe fixes (recovery, retention)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser(
        "service", parents=[home], help="run the daemon as a systemd / launchd service"
    )
    ssub = s.add_subparsers(
        dest="service_command",
        required=True,
        parser_class=s.__class__,
        metavar="COMMAND",
        help="one of:",
    )
    for name, text in (
        ("install", "write, enable and start the service for this workspace"),
        ("uninstall", "stop (gracefully), disable and remove the service"),
        ("status", "whether it is installed, up to date and running"),
    ):
        c = ssub.add_parser(name, parents=[home], help=text)
        c.add_argument(
            "--system",
            action="store_true",
            help="a system unit / LaunchDaemon (as root) instead of the user's, running as the workspace's owner",
        )
        if name == "install":
            c.add_argument(
                "--print",
                action="store_true",
                help="print the file (its path on stderr); change nothing",
            )
            c.add_argument(
                "--platform",
                choices=("linux", "macos"),
                help="with --print: render the systemd unit (linux) or the launchd plist (macos)",
            )
        else:
            c.set_defaults(platform=None, print=False)
        c.add_argument("--json", action="store_true", help="print the outcome as JSON")
        c.set_defaults(func=cmd_service)

    s = sub.add_parser("completion", parents=[home], help="print a shell completion script")
    s.add_argument("shell", choices=("bash", "zsh", "fish"), help="bash, zsh or fish")
    s.set_defaults(func=cmd_completion)

    s = sub.add_parser(
        "demo", parents=[home], help="the one-minute tour on the embedded tiny model"
    )
    s.add_argument(
        "--reset",
        action="store_true",
        help="delete the demo workspace first (only one `ftctl demo` made)",
    )
    s.add_argument(
        "--kill-at", type=int, default=17, metavar="STEP", help="step at which the worker is killed"
    )
    s.set_defaults(func=cmd_demo)
