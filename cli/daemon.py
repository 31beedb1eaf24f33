"""Commands that run or steer the daemon: start, recover, shutdown, consolidate, doctor, service. Each
parses, calls the control layer, renders (cli/table.py names them)."""

from __future__ import annotations

import signal
import sys
from dataclasses import asdict

from ftctl.control.ledger import Ledger
from ftctl.events.errors import UserError

from . import render
from .args import port, seconds


def _ledger(ws) -> Ledger:
    return Ledger(ws.open_journal())


def add_start(p) -> None:
    p.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    p.add_argument(
        "--quiet", action="store_true", help="no progress output (logs/daemon.log still gets it)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="at exit, print a JSON summary of the run (progress goes to stderr)",
    )
    p.add_argument(
        "--serve", action="store_true", help="also serve the live status page (as `ftctl serve`)"
    )
    p.add_argument(
        "--port",
        type=port,
        default=8765,
        help="with --serve: TCP port (default 8765; 0: any free port)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="with --serve: address to bind (default 127.0.0.1; any other needs --token)",
    )
    p.add_argument("--token", metavar="TOKEN", help="with --serve: every request must carry it")


def cmd_start(args, ws) -> int:
    from ftctl.control.daemon import Daemon

    # --json: stdout holds only the summary
    out = render.err_console if args.json else render.console
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
        from ftctl.control.jobs import outcomes_since

        ledger = Ledger(ws.open_journal())
        try:
            render.print_json({"stopped": reason, **outcomes_since(ledger, before)})
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


def add_recover(p) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--json", action="store_true", help="print the repairs as JSON")


def cmd_recover(args, ws) -> int:
    from ftctl.control import recover

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


def add_shutdown(p) -> None:
    p.add_argument(
        "--wait",
        type=seconds,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS until it has stopped (exit 1 if it has not)",
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def cmd_shutdown(args, ws) -> int:
    from ftctl.control import jobs, status

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


def add_consolidate(p) -> None:
    p.add_argument("--lineage", default="main", help="the lineage to consolidate (default: main)")
    p.add_argument(
        "--json", action="store_true", help="print the outcome as JSON (progress goes to stderr)"
    )


def cmd_consolidate(args, ws) -> int:
    from ftctl.control import recover

    out = render.err_console if args.json else render.console
    fused = recover.consolidate_now(
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


def add_doctor(p) -> None:
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--fix", action="store_true", help="apply the safe fixes (recovery, retention)")


def cmd_doctor(args, ws) -> int:
    from ftctl.control import doctor, recover

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


def add_service_install(p) -> None:
    add_service_manage(p)
    p.add_argument(
        "--print",
        action="store_true",
        help="print the file (its path on stderr); change nothing",
    )
    p.add_argument(
        "--platform",
        choices=("linux", "macos"),
        help="with --print: render the systemd unit (linux) or the launchd plist (macos)",
    )


def add_service_manage(p) -> None:
    p.add_argument(
        "--system",
        action="store_true",
        help="a system unit / LaunchDaemon (as root) instead of the user's, running as the workspace's "
        "owner",
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(platform=None, print=False)


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
        raise UserError(
            "--platform only goes with `ftctl service install --print`: install, uninstall and status "
            "act on this machine",
            kept="nothing was changed",
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
