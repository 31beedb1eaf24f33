"""`ftctl doctor`: every health check the old daemon's scattered scripts did, from the journal.

Each finding has a severity (ok / warning / error), what was found, and the fix. ``fix`` applies
the fixes that are safe to automate: the recovery repairs and retention (only when no daemon runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from ftctl.adapters import blas, power, process, system, telemetry
from ftctl.adapters import checkpoint as ck
from ftctl.adapters.model import model_problem
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core import guards
from ftctl.core.config import Config, ConfigError, job_config, override_key
from ftctl.core.machine import ACTIVE
from ftctl.core.state import Projection, job_stream
from ftctl.events.journal import storage_problem
from ftctl.recovery.reconcile import apply

from . import recover, retention


@dataclass
class Finding:
    check: str
    severity: str  # "ok" | "warning" | "error"
    message: str
    fix: str = ""


def _diff(a: dict, b: dict, prefix: str = "", skip: frozenset = frozenset()) -> list[str]:
    """``"key: recorded -> now"`` for every dotted key that differs, except those in ``skip`` (and below them)."""
    out = []
    for k in sorted(set(a) | set(b)):
        dotted = f"{prefix}{k}"
        if dotted in skip:
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, dotted + ".", skip)
        elif x != y:
            out.append(f"{dotted}: {y!r} -> {x!r}")
    return out


def examine(ws: Workspace, ledger: Ledger) -> list[Finding]:
    f: list[Finding] = []
    p = ledger.state
    check = ledger.journal.integrity_check()
    f.append(
        Finding(
            "journal",
            "ok" if check == "ok" else "error",
            f"integrity_check: {check}",
            "" if check == "ok" else "stop ftctl and restore journal.db from a backup copy",
        )
    )
    storage = ledger.journal.readonly or storage_problem(ws.journal_path)
    if storage is not None:  # a read-only mount, another user's workspace, a full disk: not damage
        f.append(Finding("storage", "error", str(storage), "see the finding"))
    holder = process.lock_holder(ws.lock_path)
    f += _daemon(p, holder)
    try:
        cfg, _ = ws.load_config()
    except ConfigError as e:
        cfg = None
        f.append(Finding("config", "error", str(e), "fix ftctl.yaml (see docs/config.md)"))
    f += _resources(ws, cfg)
    f += _checkpoints(ws, ledger, holder)
    for j in p.jobs.values():
        due = retention.checkpoints(ws, j)
        if due is not None:
            f.append(
                Finding(
                    "retention",
                    "warning",
                    f"job {j.job} keeps {len(due.events)} checkpoint(s) beyond its retention",
                    "`ftctl doctor --fix` prunes them",
                )
            )
    f += _models(p, cfg, ws)
    f.append(_blas(cfg))
    f += _device(cfg)
    if cfg is not None:
        f += _config_drift(p, cfg)
    f += _data_drift(ws, p)
    f += _notifications(ledger, cfg)
    f += _display_sleep(cfg)
    return f


def _notifications(ledger: Ledger, cfg: Config | None) -> list[Finding]:
    """Targets whose latest delivery failed (a `notification_failed` after their last success)."""
    failed = ledger.state.daemon.notify_failed
    if not failed and not (cfg and cfg.notify):
        return []
    cursors = ledger.journal.notify_cursors()
    out = []
    for target, e in failed.items():
        if ((cursors.get(target) or {}).get("ok_seq") or 0) > e.seq:
            continue  # a later event was delivered to it since
        rec = next(iter(ledger.journal.read(after=e.seq - 1, to=e.seq)), None)
        out.append(
            Finding(
                "notifications",
                "warning",
                f"{target}: event {e.seq} ({e.event}{', ' + rec.ts[:19] if rec else ''}) was not delivered "
                f"after {e.attempts} attempt(s): {e.error}",
                "check the URL or command in ftctl.yaml's notify: and that it is reachable from this machine; "
                "later events are still sent (`ftctl history --since 1d` shows what happened)",
            )
        )
    if not out:
        n = len(cfg.notify) if cfg else 0
        out.append(
            Finding(
                "notifications",
                "ok",
                f"{n} target(s); no undelivered notification since the last success",
            )
        )
    return out


def _display_sleep(cfg: Config | None) -> list[Finding]:
    """macOS only: a display that never sleeps during long runs is when the Metal GPU watchdog kills
    MLX training (kIOGPUCommandBufferCallbackErrorImpactingInteractivity, mlx #3267)."""
    text = power.pmset()
    if text is None:
        return []
    minutes = power.display_sleep_minutes(text)
    awake = cfg is None or cfg.power.prevent_sleep
    if minutes == 0:
        return [
            Finding(
                "display sleep",
                "warning",
                "the display never sleeps (pmset displaysleep 0): with the display lit, macOS's Metal GPU watchdog "
                "kills long MLX training steps (Impacting Interactivity, mlx #3267)",
                "`sudo pmset -a displaysleep 10` (the display sleeps, ftctl's caffeinate -s keeps the Mac awake"
                + ("" if awake else "; set power.prevent_sleep: true")
                + "), or run the daemon with "
                "AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1",
            )
        ]
    return [
        Finding(
            "display sleep",
            "ok",
            f"the display sleeps after {minutes} min" if minutes else "pmset does not say",
        )
    ]


def _daemon(p: Projection, holder: str | None) -> list[Finding]:
    d, out = p.daemon, []
    if holder is None and d.running:
        out.append(
            Finding(
                "daemon",
                "warning",
                f"the journal says daemon pid {d.process.pid if d.process else '?'} runs, "
                "but no one holds the lock: it died",
                "`ftctl recover` (or simply `ftctl start`) repairs what it left",
            )
        )
    elif holder is None:
        out.append(Finding("daemon", "ok", "no daemon running"))
    else:
        out.append(Finding("daemon", "ok", f"daemon running ({holder})"))
    for j in p.jobs.values():
        if j.state in ACTIVE and holder is None:
            orphan = j.worker is not None and process.alive(j.worker)
            out.append(
                Finding(
                    "stale state",
                    "warning",
                    f"job {j.job} is {j.state!r} but no daemon supervises it"
                    + (f"; its worker pid {j.worker.pid} is an orphan" if orphan else ""),
                    "`ftctl recover` marks it crashed, stops the orphan and requeues it",
                )
            )
    return out


def _models(p: Projection, cfg: Config | None, ws) -> list[Finding]:
    """The base model new jobs get (ftctl.yaml) and the ones waiting jobs recorded must load."""
    out, seen = [], set()
    if cfg is not None:
        from .models import (
            problem as model_spec_problem,
        )  # resolves repo ids in the HF cache, inspects GGUF

        problem = model_spec_problem(ws.model(cfg.model))  # as submit finds it
        seen.add(cfg.model)
        out.append(
            Finding(
                "model",
                "error" if problem else "ok",
                problem or f"{cfg.model} loads as an mlx-lm model",
                "set `model` in ftctl.yaml to an mlx-lm model folder, a cached Hugging Face repo id or a "
                ".gguf file"
                if problem
                else "",
            )
        )
    for j in p.jobs.values():
        if j.state in ("queued", "paused", "crashed") and j.config and j.config.model not in seen:
            seen.add(j.config.model)
            problem = model_problem(ws.abs(j.config.model))  # where the workspace is now
            if problem:
                out.append(
                    Finding(
                        "model",
                        "error",
                        f"job {j.job} ({j.state}) trains on a model that cannot load: {problem}",
                        f"restore that folder, or `ftctl cancel {j.job}` and submit again (a job keeps "
                        "the model it was submitted with)",
                    )
                )
    return out


def _blas(cfg: Config | None) -> Finding:
    """Which BLAS a worker starts on now, and how to get a fast one when it is the reference BLAS.
    Slow is not broken: only a configured library that cannot be used is a warning."""
    setting = cfg.blas if cfg is not None else "auto"
    lib = blas.choose(setting)
    n = blas.job_threads(lib, cfg.blas_threads if cfg is not None else 0, None)
    threads = (
        f", {n} thread(s)"
        if n
        else f", threads measured per job at its first load (1 to {lib.threads}: blas_threads)"
        if lib.kind == "openblas"
        else ""
    )
    if lib.kind != "reference":
        return Finding(
            "blas",
            "ok",
            f"workers run on {lib.describe() or 'the platform BLAS'} ({lib.why}{threads})",
        )
    slow = (
        f"workers run on mlx[cpu]'s reference BLAS {lib.library}: about 10-30x slower matmuls than OpenBLAS; "
        f"{blas.INSTALL_HINT}"
    )
    if setting == "reference":
        return Finding("blas", "ok", f"{slow} and set `blas: auto`")
    if setting == "auto":
        return Finding("blas", "ok", f"{slow} (`blas: auto` then uses it)")
    return Finding(
        "blas",
        "warning",
        f"`blas: {setting}` is not used: {lib.why.split('; using')[0]}",
        f"fix the path in ftctl.yaml, or set `blas: auto`; {blas.INSTALL_HINT}",
    )


def _device(cfg: Config | None) -> list[Finding]:
    """Which device the worker will train on and why (MLX imported with the worker's environment),
    and an NVIDIA GPU's readings (NVML) against guards.max_temperature_c / max_memory_pct."""
    g = (cfg or Config(model="")).guards
    b = telemetry.probe_backend(blas.choose(cfg.blas if cfg else "auto").env)
    dev, why = b.device, b.why
    if dev is None:
        out = [
            Finding(
                "backend",
                "error",
                f"the training worker cannot start MLX: {why}",
                "reinstall ftctl's MLX (pip install -e . or pip install 'ftctl[cuda]'; docs/hardware.md)",
            )
        ]
    else:
        idle_gpu = dev.backend == "cpu" and b.nvidia_gpu
        out = [
            Finding(
                "backend",
                "warning" if idle_gpu else "ok",
                f"workers train on {dev.label()}: {why}",
                'pip install "ftctl[cuda]" (docs/hardware.md)' if idle_gpu else "",
            )
        ]
    r = telemetry.host_readings()
    if not r:
        return out
    problems = guards.device_problems(r, g.max_temperature_c, g.max_memory_pct)
    seen = []
    if r.get("device_temp_c") is not None:
        seen.append(f"{r['device_temp_c']:.0f} °C")
    if r.get("device_mem_used_gb") is not None and r.get("device_mem_total_gb"):
        seen.append(f"memory {r['device_mem_used_gb']:.1f} of {r['device_mem_total_gb']:.1f} GB")
    name = r.get("device") or "the GPU"
    out.append(
        Finding(
            "gpu",
            "warning" if problems else "ok",
            f"{name}: "
            + ("; ".join(problems) if problems else ", ".join(seen) or "no readings")
            + ("" if problems else f" (limits {g.max_temperature_c:g} °C, {g.max_memory_pct:g} %)"),
            "check the cooling and airflow, and what else runs on the GPU (nvidia-smi); a training job "
            "pauses above guards.max_temperature_c"
            if problems
            else "",
        )
    )
    return out


def _resources(ws: Workspace, cfg: Config | None) -> list[Finding]:
    out = []
    strays = process.orphan_workers(ws.home)
    if strays:
        out.append(
            Finding(
                "processes",
                "error",
                f"worker process(es) {[w.pid for w in strays]} of this workspace have no parent daemon",
                "`ftctl recover` stops them (pid + start time checked)",
            )
        )
    else:
        out.append(Finding("processes", "ok", "no orphan worker"))
    free = system.free_disk_gb(ws.home)
    # the schema's default while ftctl.yaml is unreadable
    need = (cfg or Config(model="")).min_free_disk_gb
    out.append(
        Finding(
            "disk",
            "ok" if free >= need else "error",
            f"{free:.1f} GB free (minimum {need:g} GB)",
            ""
            if free >= need
            else "free disk space; jobs pause instead of failing when it runs out",
        )
    )
    mem = system.available_memory_gb()
    out.append(
        Finding(
            "memory",
            "ok" if mem >= 1.0 else "warning",
            f"{mem:.1f} GB available",
            "" if mem >= 1.0 else "close other programs",
        )
    )
    return out


def _checkpoints(ws: Workspace, ledger: Ledger, holder: str | None) -> list[Finding]:
    if holder is not None:
        return []  # the running daemon owns the disk; its recovery ran at its start
    repairs = recover.plan(ws, ledger)
    # reported above
    stale = {job_stream(j.job) for j in ledger.state.jobs.values() if j.state in ACTIVE}
    out = [
        Finding(
            "checkpoints",
            "error" if r.finding or "corrupt" in r.what else "warning",
            r.what,
            "restore the folder (from the workspace's original or a backup); ftctl never deletes "
            "what the journal committed"
            if r.finding
            else "`ftctl recover`",
        )
        for r in repairs
        if r.stream not in stale
    ]
    if not repairs:
        out.append(
            Finding(
                "checkpoints",
                "ok",
                "every committed checkpoint verifies; no temp or uncommitted folder",
            )
        )
    return out


def _config_drift(p: Projection, cfg: Config) -> list[Finding]:
    latest = next((j for j in reversed(p.jobs.values()) if j.config is not None), None)
    if latest is None:
        return []
    now, recorded = (
        job_config(cfg),
        job_config(latest.config),
    )  # notify/power are the daemon's, not the job's
    lin = p.lineages.get(latest.lineage)
    if lin is not None and lin.base_version > 0:
        recorded["model"] = now["model"]  # after a promotion jobs train on the new base by design
    # its --set: chosen, not drift
    own = frozenset(k for o in latest.overrides if (k := override_key(o)))
    drift = _diff(now, recorded, skip=own)
    besides = f" (besides its own overrides {', '.join(sorted(own))})" if own else ""
    if not drift:
        return [
            Finding(
                "config drift", "ok", f"ftctl.yaml matches the config of job {latest.job}{besides}"
            )
        ]
    return [
        Finding(
            "config drift",
            "warning",
            f"ftctl.yaml differs from the config job {latest.job} was submitted with{besides}: "
            + "; ".join(drift[:8]),
            "nothing is at risk: jobs keep the config recorded at submit, new submissions use ftctl.yaml. "
            "If the edit of ftctl.yaml is meant, this is only a reminder; if not, set those keys back in ftctl.yaml",
        )
    ]


def _data_drift(ws: Workspace, p: Projection) -> list[Finding]:
    out = []
    for j in p.jobs.values():
        if j.state == "queued" and j.data_sha256:
            try:
                with open(ws.abs(j.data_path), "rb") as fh:
                    cur = ck.sha256(fh.read())
            except OSError:
                continue
            if cur != j.data_sha256:
                out.append(
                    Finding(
                        "data drift",
                        "warning",
                        f"job {j.job}: {j.data_path} changed since it was submitted",
                        "the job trains on its own copy (jobs/<id>/data/); resubmit to train on the new content",
                    )
                )
    return out


def fix(ws: Workspace, ledger: Ledger) -> list[str]:
    """Recovery, then retention. Raises recover.DaemonRunning while a daemon runs."""
    with recover.Locked(ws):
        done = [r.what for r in recover.recover(ws, ledger) if not r.finding]
        for j in list(ledger.state.jobs.values()):
            r = retention.checkpoints(ws, j)
            if r is not None:
                apply(ledger, [r])
                done.append(r.what)
    return done
