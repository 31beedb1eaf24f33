"""Commands that run or steer the daemon: start, recover, crashes, pause/resume/cancel, shutdown, demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ftctl.adapters import process
from ftctl.core.machine import ACTIVE
from ftctl.core.state import DAEMON_STREAM, job_stream
from ftctl.events import types as ev
from ftctl.recovery import reconcile
from ftctl.recovery.ledger import Ledger

from . import render
from .daemon import Daemon
from .jobs import find_job


def cmd_start(args, ws) -> int:
    return Daemon(ws, until_idle=args.until_idle, quiet=args.quiet).run()


def cmd_recover(args, ws) -> int:
    ws.require()
    try:
        fd = process.acquire_lock(ws.lock_path)
    except process.LockHeld as e:
        render.err_console.print(f"[red]error:[/] a daemon is running on {ws.home} ({render.escape(e.holder)}); it recovered at its "
                                 "start and supervises its jobs now. Nothing was changed.")
        return 1
    try:
        ledger = Ledger(ws.open_journal())
        repairs = reconcile.plan(ws, ledger) if args.dry_run else reconcile.recover(ws, ledger)
        if args.json:
            render.print_json({"dry_run": args.dry_run, "repairs": [r.as_dict() for r in repairs]})
        elif not repairs:
            render.console.print("nothing to repair: the disk and the processes agree with the journal")
        else:
            verb = "would repair" if args.dry_run else "repaired"
            render.console.print(f"{verb} {len(repairs)} thing(s):")
            for r in repairs:
                render.console.print(f"  - {r.what}")
            if args.dry_run:
                render.console.print("dry run: nothing was changed; run `ftctl recover` to apply")
        return 0
    finally:
        process.release_lock(fd)


def cmd_crashes(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    rows = []
    for r in ledger.journal.read():
        e = r.event
        if isinstance(e, ev.Crashed):
            rows.append({"seq": r.seq, "ts": r.ts, "job": e.job, "category": e.category, "step": e.step,
                         "exit_code": e.exit_code, "signal": e.signal, "suggestion": e.suggestion,
                         "evidence": e.evidence})
    if args.json:
        render.print_json(rows)
        return 0
    if not rows:
        render.console.print("no crashes recorded")
        return 0
    from rich.table import Table

    t = Table(title="crashes")
    for c in ("time (UTC)", "seq", "job", "category", "step", "exit", "suggested fix"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r["ts"][:19].replace("T", " "), str(r["seq"]), r["job"], f"[red]{r['category']}[/]",
                  str(r["step"]), str(r["exit_code"]), r["suggestion"])
    render.console.print(t)
    return 0


def cmd_control(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    j = find_job(ledger, args.job)
    s = job_stream(j.job)
    action = args.action
    if action == "resume":
        ledger.commit(s, ev.Resumed(job=j.job))
        render.console.print(f"job {j.job} queued again; a running daemon picks it up within a second")
    elif j.state in ACTIVE:
        ledger.commit(s, ev.ControlRequested(job=j.job, action=action))
        render.console.print(f"job {j.job}: {action} requested; the daemon "
                             + ("checkpoints and pauses it" if action == "pause" else "stops it")
                             + " within a second (or at its next start if it is not running)")
    elif action == "pause":
        ledger.commit(s, ev.Paused(job=j.job, reason="paused by user"))
        render.console.print(f"job {j.job} paused; `ftctl resume {j.job}` to queue it again")
    else:
        ledger.commit(s, ev.Cancelled(job=j.job, reason="cancelled by user"))
        render.console.print(f"job {j.job} cancelled; its checkpoints stay on disk until retention or `ftctl doctor --fix`")
    return 0


def cmd_shutdown(args, ws) -> int:
    ledger = Ledger(ws.open_journal())
    if not ledger.state.daemon.running:
        render.console.print("no daemon is running; nothing to stop")
        return 0
    ledger.commit(DAEMON_STREAM, ev.ShutdownRequested(reason="ftctl shutdown"))
    render.console.print("shutdown requested: the daemon checkpoints the running job and exits within a second")
    if args.wait:
        deadline = time.time() + args.wait
        while time.time() < deadline:
            ledger.refresh()
            if not ledger.state.daemon.running:
                render.console.print("daemon stopped")
                return 0
            time.sleep(0.2)
        render.err_console.print(f"the daemon is still running after {args.wait} s")
        return 1
    return 0


def cmd_demo(args, ws) -> int:
    """Init a demo workspace, train a job end to end, kill its worker mid-run, show the recovery."""
    from ftctl.adapters.workspace import Workspace

    from .main import main as ftctl

    if getattr(args, "home", None) is None and not os.environ.get("FTCTL_HOME"):
        ws = Workspace(Path("ftctl-demo").resolve())  # never mix the demo into a real workspace
    home = ws.home
    if (home / "journal.db").exists():
        if not args.reset:
            render.console.print(f"{home} already holds a workspace: reusing it (pass --reset to start over)")
    if args.reset and home.exists():
        shutil.rmtree(home)
    if not (home / "journal.db").exists():
        if ftctl(["init", "--demo", "--home", str(home)]) != 0:
            return 1
    data = home / "demo" / "data"
    render.console.rule("1. submit the demo data (validated before it is queued)")
    if ftctl(["submit", str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"), "--name", "demo", "--home", str(home)]) != 0:
        return 1
    render.console.rule("2. train; the worker is SIGKILLed mid-run (a simulated crash)")
    marker = home / "run" / "demo-crash.marker"
    env = {"FTCTL_CRASH_AT": f"mid_step:{args.kill_at}:{marker}"}
    code = Daemon(ws, until_idle=True, env=env).run()
    if code != 0:
        return code
    render.console.rule("3. the journal tells the story")
    ftctl(["history", "--home", str(home)])
    render.console.rule("4. status of the finished job")
    ledger = Ledger(ws.open_journal())
    last = list(ledger.state.jobs)[-1]
    ftctl(["status", last, "--home", str(home)])
    render.console.rule("5. the same job, never interrupted, for comparison")
    ref = Workspace(home / "reference")
    if ref.home.exists():
        shutil.rmtree(ref.home)
    from ftctl.adapters.workspace import init_workspace

    init_workspace(ref.home, ledger.state.jobs[last].config["model"], ws.read_config_dict())
    ftctl(["submit", str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"), "--name", "reference", "--home", str(ref.home)])
    Daemon(ref, until_idle=True, quiet=True).run()
    crashed_sha = ledger.state.jobs[last].adapter_sha256
    ref_sha = Ledger(ref.open_journal()).state.jobs["0001"].adapter_sha256
    same = crashed_sha == ref_sha
    render.console.print(f"adapter sha256, killed at step {args.kill_at} and resumed: {crashed_sha}\n"
                         f"adapter sha256, never interrupted:             {ref_sha}\n"
                         + ("[green]identical[/]: the resume was bit-for-bit (weights, optimizer, LR position, data "
                            "cursor and RNG all restored)" if same else "[red]DIFFERENT[/]: please report this"))
    render.console.print(f"Try: ftctl history --home {home} --crashes · ftctl replay {last} --to SEQ --home {home}")
    return 0 if same else 2


def cmd_consolidate(args, ws) -> int:
    from .consolidate import check, consolidate

    ledger = Ledger(ws.open_journal())
    try:
        fd = process.acquire_lock(ws.lock_path)
    except process.LockHeld:
        if args.lineage not in ledger.state.lineages:
            check(ws, ledger, args.lineage)  # raises: no such lineage
        ledger.commit(f"lineage:{args.lineage}", ev.ConsolidationRequested(lineage=args.lineage))
        render.console.print(f"consolidation of lineage {args.lineage} requested: the running daemon fuses it as soon "
                             "as no job of the lineage is queued or training (`ftctl history --follow` shows it)")
        return 0
    try:
        cfg, _ = ws.load_config()
        reconcile.recover(ws, ledger)  # never fuse on top of debris
        fused = consolidate(ws, ledger, args.lineage, keep_models=cfg.consolidation.keep_models,
                            min_free_gb=cfg.min_free_disk_gb, say=lambda t: render.console.print(render.escape(t)))
        render.console.print(f"[green]promoted[/] {fused.path} (weights sha256 {fused.weights_sha256[:16]}…)")
        return 0
    finally:
        process.release_lock(fd)


def cmd_config_show(args, ws) -> int:
    from ftctl.core.config import config_to_dict, default_config_dict

    cfg, warnings = ws.load_config()
    raw = ws.read_config_dict()
    defaults = default_config_dict(cfg.model)
    ledger = Ledger(ws.open_journal())
    lin = ledger.state.lineages.get(args.lineage)
    eff = config_to_dict(cfg)
    rows = []

    def walk(d: dict, r: dict, df: dict, prefix: str = ""):
        for k, v in d.items():
            key = prefix + k
            given = isinstance(r, dict) and k in r
            if isinstance(v, dict) and v and k not in ("optimizer_config",):
                walk(v, r.get(k, {}) if given and isinstance(r.get(k), dict) else {}, df.get(k) or {}, key + ".")
                continue
            source = "ftctl.yaml" if given else "default"
            rows.append({"key": key, "value": v, "source": source})

    walk(eff, raw, defaults)
    if lin is not None and lin.base_version > 0:
        for r in rows:
            if r["key"] == "model":
                r["value"], r["source"] = lin.base_model, f"lineage {lin.name}: promoted base v{lin.base_version}"
    if args.json:
        render.print_json({"lineage": args.lineage, "config": rows, "warnings": warnings})
        return 0
    from rich.table import Table

    t = Table(title=f"effective config ({ws.config_path}, lineage {args.lineage})")
    for c in ("key", "value", "source"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r["key"], render.escape(repr(r["value"]) if isinstance(r["value"], str) else str(r["value"])),
                  f"[dim]{r['source']}[/]" if r["source"] == "default" else r["source"])
    render.console.print(t)
    for w in warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    return 0


def register(sub, home) -> None:
    s = sub.add_parser("start", parents=[home], help="run the daemon in the foreground and train the queue")
    s.add_argument("--until-idle", action="store_true", help="exit when the queue is empty")
    s.add_argument("--quiet", action="store_true", help="no progress output (logs/daemon.log still gets it)")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("recover", parents=[home], help="replay the journal and repair disk and processes to match")
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_recover)

    s = sub.add_parser("crashes", parents=[home], help="crashes with category, step, evidence and the suggested fix")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_crashes)

    for action, text in (("pause", "checkpoint and pause a job"), ("resume", "queue a paused job again"),
                         ("cancel", "cancel a job")):
        s = sub.add_parser(action, parents=[home], help=text)
        s.add_argument("job")
        s.set_defaults(func=cmd_control, action=action)

    s = sub.add_parser("shutdown", parents=[home], help="stop the daemon gracefully (checkpoint first)")
    s.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait until it has stopped")
    s.set_defaults(func=cmd_shutdown)

    from .doctor import cmd_doctor

    s = sub.add_parser("consolidate", parents=[home], help="fuse the lineage's adapter into a new base model")
    s.add_argument("--lineage", default="main")
    s.set_defaults(func=cmd_consolidate)

    s = sub.add_parser("config", parents=[home], help="configuration")
    csub = s.add_subparsers(dest="config_command", required=True, parser_class=s.__class__)
    c = csub.add_parser("show", parents=[home], help="the effective config and where each value comes from")
    c.add_argument("--lineage", default="main")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config_show)

    s = sub.add_parser("doctor", parents=[home], help="health checks: journal, daemon, processes, disk, checkpoints, drift")
    s.add_argument("--json", action="store_true")
    s.add_argument("--fix", action="store_true", help="apply the safe fixes (recovery, retention)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("demo", parents=[home], help="the one-minute tour on the embedded tiny model")
    s.add_argument("--reset", action="store_true", help="delete the demo workspace first")
    s.add_argument("--kill-at", type=int, default=17, metavar="STEP", help="step at which the worker is killed")
    s.set_defaults(func=cmd_demo)
