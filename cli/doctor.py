"""`ftctl doctor`: every health check the old daemon's scattered scripts did, from the journal.

Each finding has a severity (ok / warning / error), what was found, and the fix. Exit code 1
when anything is not ok. `--fix` applies the fixes that are safe to automate: the recovery
repairs (only when no daemon is running) and retention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil

from ftctl.adapters import checkpoint as ck
from ftctl.adapters import process, system
from ftctl.adapters.workspace import Workspace
from ftctl.core.config import ConfigError, config_to_dict
from ftctl.core.machine import ACTIVE
from ftctl.core.policy import to_prune
from ftctl.core.state import job_stream
from ftctl.events import types as ev
from ftctl.recovery import reconcile
from ftctl.recovery.ledger import Ledger

from . import render


@dataclass
class Finding:
    check: str
    severity: str   # "ok" | "warning" | "error"
    message: str
    fix: str = ""


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {y!r} -> {x!r}")
    return out


def examine(ws: Workspace, ledger: Ledger) -> list[Finding]:
    f: list[Finding] = []
    add = lambda *a: f.append(Finding(*a))  # noqa: E731
    p = ledger.state

    check = ledger.journal.integrity_check()
    add("journal", "ok" if check == "ok" else "error", f"integrity_check: {check}",
        "" if check == "ok" else "stop ftctl and restore journal.db from a backup copy")

    try:
        fd = process.acquire_lock(ws.lock_path)
        lock_free = True
        process.release_lock(fd)
    except process.LockHeld as e:
        lock_free, holder = False, e.holder
    d = p.daemon
    if lock_free and d.running:
        add("daemon", "warning", f"the journal says daemon pid {d.process.pid if d.process else '?'} runs, but no one holds the lock: it died",
            "`ftctl recover` (or simply `ftctl start`) repairs what it left")
    elif lock_free:
        add("daemon", "ok", "no daemon running")
    else:
        add("daemon", "ok", f"daemon running ({holder.strip()})")

    for j in p.jobs.values():
        if j.state in ACTIVE and lock_free:
            orphan = j.worker is not None and process.alive(j.worker)
            add("stale state", "warning",
                f"job {j.job} is {j.state!r} but no daemon supervises it" + (f"; its worker pid {j.worker.pid} is an orphan" if orphan else ""),
                "`ftctl recover` marks it crashed, stops the orphan and requeues it")

    strays = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "ftctl.adapters.worker" in cmd and str(ws.home) in cmd and proc.info["ppid"] == 1:
            strays.append(proc.info["pid"])
    if strays:
        add("processes", "error", f"worker process(es) {strays} of this workspace have no parent daemon",
            "`ftctl recover` stops them (pid + start time checked)")
    else:
        add("processes", "ok", "no orphan worker")

    try:
        cfg, _ = ws.load_config()
    except ConfigError as e:
        cfg = None
        add("config", "error", str(e), "fix ftctl.yaml (see docs/config.md)")
    free = system.free_disk_gb(ws.home)
    need = cfg.min_free_disk_gb if cfg else 1.0
    add("disk", "ok" if free >= need else "error", f"{free:.1f} GB free (minimum {need:g} GB)",
        "" if free >= need else "free disk space; jobs pause instead of failing when it runs out")
    mem = system.available_memory_gb()
    add("memory", "ok" if mem >= 1.0 else "warning", f"{mem:.1f} GB available", "" if mem >= 1.0 else "close other programs")

    repairs = reconcile.plan(ws, ledger) if lock_free else []
    stale = {job_stream(j.job) for j in p.jobs.values() if j.state in ACTIVE}  # already reported above
    for r in repairs:
        if r.stream not in stale:
            add("checkpoints", "warning" if "corrupt" not in r.what else "error", r.what, "`ftctl recover`")
    if lock_free and not repairs:
        add("checkpoints", "ok", "every committed checkpoint verifies; no temp or uncommitted folder")

    for j in p.jobs.values():
        if not j.config:
            continue
        keep = j.config.get("retention", {})
        extra = to_prune(j.checkpoints, keep.get("keep_last", 3), keep.get("keep_best", True))
        if extra:
            add("retention", "warning", f"job {j.job} keeps {len(extra)} checkpoint(s) beyond its retention",
                "`ftctl doctor --fix` prunes them")

    if cfg is not None:
        latest = next((j for j in reversed(list(p.jobs.values())) if j.config and j.state not in ("rejected",)), None)
        if latest is not None:
            now = config_to_dict(cfg)
            recorded = dict(latest.config)
            lin = p.lineages.get(latest.lineage)
            if lin is not None and lin.base_version > 0:
                recorded["model"] = now["model"]  # after a promotion jobs train on the new base by design
            drift = _diff(now, recorded)
            if drift:
                add("config drift", "warning",
                    f"ftctl.yaml differs from the config job {latest.job} was submitted with: " + "; ".join(drift[:8]),
                    "jobs keep the config recorded at submit; new submissions use ftctl.yaml — edit one or the other")
            else:
                add("config drift", "ok", f"ftctl.yaml matches the config of job {latest.job}")
    for j in p.jobs.values():
        if j.state == "queued" and j.data_sha256:
            try:
                cur = ck.sha256(open(j.data_path, "rb").read())
            except OSError:
                continue
            if cur != j.data_sha256:
                add("data drift", "warning", f"job {j.job}: {j.data_path} changed since it was submitted",
                    "the job trains on its own copy (jobs/<id>/data/); resubmit to train on the new content")
    return f


def fix(ws: Workspace, ledger: Ledger) -> list[str]:
    done = []
    try:
        fd = process.acquire_lock(ws.lock_path)
    except process.LockHeld:
        return ["a daemon is running: it already keeps the workspace consistent; nothing was changed"]
    try:
        done += [r.what for r in reconcile.recover(ws, ledger)]
        for j in list(ledger.state.jobs.values()):
            keep = j.config.get("retention", {}) if j.config else {}
            victims = to_prune(j.checkpoints, keep.get("keep_last", 3), keep.get("keep_best", True))
            if victims:
                ledger.commit(f"job:{j.job}", *[ev.CheckpointPruned(job=j.job, step=c.step, path=c.path, reason="retention (ftctl doctor --fix)") for c in victims])
                for c in victims:
                    ck.discard_dir(c.path)
                done.append(f"job {j.job}: pruned {len(victims)} checkpoint(s)")
    finally:
        process.release_lock(fd)
    return done


def cmd_doctor(args, ws: Workspace) -> int:
    ledger = Ledger(ws.open_journal())
    fixed = fix(ws, ledger) if args.fix else []
    findings = examine(ws, ledger)
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
