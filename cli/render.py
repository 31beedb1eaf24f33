"""Turning the projection and the journal into what a person (rich) or a program (--json) reads.

The --json shapes are part of ftctl's interface; docs/cli.md documents them. Change them only
by adding keys.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import Any

import msgspec

from ftctl.adapters import protocol as P
from ftctl.control.reporter import Every, Reporter, memory, pairs, progress_line
from ftctl.control.status import DaemonView, JobView
from ftctl.core.crash import where as crash_where
from ftctl.core.state import JobState, as_dict
from ftctl.events.types import AdapterEvaluated, Recorded, to_dict

# rich (and yaml) are imported on first use: `--json` output and a failing command's message never
# pay for them (see docs/architecture.md, "Start-up"). `render.console` / `render.err_console` are
# made on first access (module __getattr__), once.
_CONSOLES: dict[str, Any] = {}


def _console(name: str):
    c = globals().get(name) or _CONSOLES.get(name)  # a test may have put its own in place
    if c is None:
        from rich.console import Console

        # Piped output (logs, `| less`) gets a wide page instead of rich's default 80 columns.
        stream = sys.stderr if name == "err_console" else sys.stdout
        c = _CONSOLES[name] = Console(
            stderr=name == "err_console",
            highlight=False,
            width=None if stream.isatty() or os.environ.get("COLUMNS") else 160,
        )
    return c


def __getattr__(name: str):
    if name in ("console", "err_console"):
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def escape(text: str) -> str:
    """rich markup escaped (rich.markup.escape, imported on first use)."""
    from rich.markup import escape as _escape

    return _escape(text)


def Table(*args, **kwargs):  # noqa: N802 (rich's class, made on first use)
    from rich.table import Table as _Table

    return _Table(*args, **kwargs)


# Body fields that are too long or too repetitive for the timeline's one-line summary.
_HIDDEN = {"type", "job", "config", "config_sha256", "problems", "summary", "lineage"}


def print_json(obj: Any) -> None:
    # json.dumps with indent= runs the pure-Python encoder (4 s for `status --json` of 8,500 jobs);
    # the C encoder's compact text re-indented by msgspec is the same text, byte for byte, 5x sooner.
    text = msgspec.json.format(json.dumps(obj, sort_keys=False, default=str), indent=2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_ndjson(obj: Any) -> None:
    """One compact JSON object on one line (NDJSON), flushed: for streams a program reads line by line."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def yaml_value(v: Any) -> str:
    """A value as it would be written in ftctl.yaml: lora, null, false, 1e-05, [a, b], {k: v}."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # plain unless YAML needs quotes ('true', '', '1e-5', 'a: b')
        import yaml

        return yaml.safe_dump(v, width=float("inf")).removesuffix("\n...\n").rstrip("\n")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(yaml_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{yaml_value(k)}: {yaml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_short(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v[:3]) + (", …" if len(v) > 3 else "") + "]"
    return clip(str(v))


def clip(text: str, limit: int = 100) -> str:
    """The first line of ``text``, cut at a space before ``limit`` characters: a word or a path is
    never cut in the middle (a single token longer than the limit is kept whole)."""
    lines = text.splitlines()
    s = lines[0] if lines else text
    more = len(lines) > 1
    if len(s) > limit:
        cut = s.rfind(" ", 0, limit)
        if cut > 0:
            s, more = s[:cut], True
    return s + " …" if more else s


_EXCEPTION = re.compile(
    r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Warning)\b|Fatal Python error|"
    r"Segmentation fault|Killed\b)"
)


def evidence_line(evidence: str) -> str:
    """The line of a crash's evidence worth reading first: the last exception line of the stderr
    tail if it has one (``ValueError: …``), else the daemon's first line (exit code, signal, last
    step, log path). Whole lines, never cut."""
    lines = [l.strip() for l in evidence.splitlines() if l.strip()]
    if not lines:
        return ""
    return next((l for l in reversed(lines[1:]) if _EXCEPTION.match(l)), lines[0])


def signal_name(sig: int | None) -> str:
    if sig is None:
        return "-"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def event_fields(rec: Recorded) -> str:
    body = to_dict(rec.event)
    if body.get("env"):
        body["env"] = env_line(body["env"])
    if body.get("env_changed"):
        body["env_changed"] = "NOT bit-exact with the earlier attempts: " + "; ".join(
            body["env_changed"]
        )
    if isinstance(body.get("evidence"), str):
        body["evidence"] = evidence_line(body["evidence"])  # whole: the log path in it stays usable
    return "  ".join(
        f"{k}={v if k == 'evidence' else _short(v)}"
        for k, v in body.items()
        if k not in _HIDDEN and v not in (None, "", [], {})
    )


def env_line(env: dict) -> str:
    """The environment fingerprint in one short line.

    e.g. 'cuda:0 NVIDIA H100, mlx 0.32.4, mlx_lm 0.32.2, openblas libopenblas.so.0 x2, Linux-x86_64'
    (the device first where the attempt recorded it)."""
    blas = env.get("blas", "?").split(" (")[0]
    kind, _, lib = blas.partition(" ")
    device = f"{env['device']}, " if env.get("device") else ""
    t = env.get("blas_threads", "?")
    threads = f"x{t}" if t.isdigit() or t == "?" else f"(threads {t})"
    return (
        f"{device}mlx {env.get('mlx', '?')}, mlx_lm {env.get('mlx_lm', '?')}, {kind} "
        f"{lib.rsplit('/', 1)[-1]} {threads}, {env.get('platform', '?')}"
    )


def event_line(r: Recorded) -> str:
    """One event on one line (`ftctl history --follow`)."""
    return (
        f"{r.ts[:19].replace('T', ' ')}  {r.seq:>6}  {r.stream:<12} "
        f"{type(r.event).kind():<22} {event_fields(r)}"
    )


def event_json(rec: Recorded) -> dict:
    return {
        "seq": rec.seq,
        "ts": rec.ts,
        "stream": rec.stream,
        "version": rec.version,
        "type": type(rec.event).kind(),
        "schema": type(rec.event).schema,
        "data": to_dict(rec.event),
    }


_STATE_STYLE = {
    "queued": "cyan",
    "training": "bold green",
    "checkpointing": "green",
    "paused": "yellow",
    "crashed": "bold red",
    "completed": "bold blue",
    "failed": "red",
    "cancelled": "dim",
    "rejected": "magenta",
}


def history_table(recs: list[Recorded], title: str = "history") -> Table:
    t = Table(title=title, show_lines=False, expand=False)
    t.add_column("time (UTC)", no_wrap=True, style="dim")
    t.add_column("seq", justify="right")
    t.add_column("stream", no_wrap=True)
    t.add_column("event", no_wrap=True)
    t.add_column("details", overflow="fold")
    for r in recs:
        kind = type(r.event).kind()
        style = "bold red" if kind in ("crashed", "failed", "checkpoint_corrupt") else None
        t.add_row(
            r.ts[:19].replace("T", " "),
            str(r.seq),
            r.stream,
            f"[{style}]{kind}[/]" if style else kind,
            escape(event_fields(r)),
        )
    return t


def job_json(j: JobState, metrics: dict | None = None, view: JobView | None = None) -> dict:
    last = j.good_checkpoints()[-1] if j.good_checkpoints() else None
    out = {
        "job": j.job,
        "name": j.name,
        "state": j.state,
        "lineage": j.lineage,
        "reason": j.reason or None,
        "iters": j.iters,
        "step": j.step,
        "global_step": j.global_step,
        "attempt": j.attempt,
        "submitted_at": j.submitted_at,
        "updated_at": j.updated_at,
        "updated_seq": j.updated_seq,
        "data_path": j.data_path,
        "data_sha256": j.data_sha256,
        "data_format": j.data_format,
        "examples": j.examples,
        "valid_path": j.valid_path,
        "base_model": j.base_model,
        "warm_start_from": j.warm_start_from,
        "parent_job": j.parent_job,
        "global_step_base": j.global_step_base,
        "model_repo": j.model_repo,
        "model_revision": j.model_revision,
        "config_sha256": j.config_sha256,
        "checkpoints": [{**as_dict(c), "corrupt": j.corrupt.get(c.path)} for c in j.checkpoints],
        "last_checkpoint": last.path if last else None,
        "last_val_loss": j.last_val_loss,
        "best_val_loss": j.best_val_loss,
        "adapter_path": j.adapter_path,
        "adapter_sha256": j.adapter_sha256,
        # which checkpoint the adapter was published from (config `result`) and why training ended
        "result": j.result or None,
        "result_step": j.result_step,
        "result_val_loss": j.result_val_loss,
        "result_checkpoint": j.result_checkpoint,
        "result_note": j.result_note or None,
        "stopped_early": j.stopped_early or None,
        "epochs": j.config.epochs if j.config else None,
        "exported_to": j.exported_to,
        "export_refused": j.export_refused,
        "last_eval": {
            **{k: v for k, v in to_dict(j.last_eval).items() if k != "type"},
            "at": j.last_eval_at,
        }
        if j.last_eval
        else None,
        "worker": as_dict(j.worker) if j.worker else None,
        "env": j.env or None,
        "env_changed": j.env_changed,
        "world_size": j.world_size,
        "hosts": j.hosts or None,
        "rank_tokens_per_s": j.rank_tokens_per_s or None,
        "resharded": j.resharded,
        "crashes": [as_dict(c) for c in j.crashes],
        "alerts": [as_dict(a) for a in j.alerts],
        # a guard's checkpoint-and-continue in a fresh worker (restart_planned): not crashes
        "planned_restarts": j.planned_restarts,
        "requested": j.requested,
        "warnings": j.warnings,
        "last_report": metrics,
    }
    if view is not None:  # what the journal means now (status only: replay shows the past)
        out.update(
            {
                "checkpoint_step": j.step,
                "live_step": view.live_step,
                "live_global_step": view.live_global_step,
                "epoch": view.epoch,
                "stale": view.stale,
                "note": view.note or None,
                "eta_s": None if view.eta_s is None else round(view.eta_s, 1),
                "eta_basis": view.eta_basis,
            }
        )
    return out


def said_readonly(journal):
    """The journal, after a note on stderr when it had to be opened read-only (a read-only mount)."""
    if journal.readonly is not None:
        _console("err_console").print(f"[yellow]note:[/] {escape(journal.readonly.note())}")
    return journal


def lineage_line(lin) -> str:
    """One line per lineage: its head (what new jobs warm-start from, what consolidation fuses) and
    its branches (completed jobs that did not become the head)."""
    base = f"base v{lin.base_version}" if lin.base_version else "original base"
    head = f"head job {lin.head_job}" if lin.head_job else "no head yet"
    line = f"lineage {escape(lin.name)} ({base}): {head}"
    if lin.branches:
        line += f"; branches: {', '.join(lin.branches)} (`ftctl lineage set-head JOB` makes one the head)"
    return line


def daemon_json(d: DaemonView) -> dict:
    return {
        "running": d.running,
        "pid": d.pid,
        "host": d.host,
        "started_at": d.started_at,
        "shutdown_requested": d.shutdown_requested,
        "alive": d.alive,
        "recorded_running": d.recorded,
        "died": d.died,
        "lock_holder": d.holder,
        "last_entry_at": d.last_entry_at,
        "summary": d.summary,
        "standby": d.standby,
        "power": d.power,
    }


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def status_table(views: list[JobView]) -> Table:
    t = Table(title="jobs", expand=False)
    for col, kw in [
        ("job", {}),
        ("name", {}),
        ("state", {}),
        ("step", {"justify": "right"}),
        ("global", {"justify": "right"}),
        ("loss", {"justify": "right"}),
        ("val loss", {"justify": "right"}),
        ("ckpts", {"justify": "right"}),
        ("eta", {"justify": "right"}),
        ("note", {"overflow": "fold"}),
    ]:
        t.add_column(col, **kw)
    for v in views:
        j, m = v.job, v.metrics or {}
        style = _STATE_STYLE.get(j.state, "")
        state = f"[{style}]{j.state}[/]" + (" [red](daemon dead)[/]" if v.stale else "")
        step = f"{v.live_step}/{j.iters}" if j.iters else "-"
        if v.epoch:
            step += f" (epoch {v.epoch})"
        loss = f"{m['loss']:.4f}" if m.get("loss") is not None else "-"
        val = f"{j.last_val_loss:.4f}" if j.last_val_loss is not None else "-"
        note = escape(v.note if len(v.note) <= 200 else v.note[:197] + "…")
        t.add_row(
            j.job,
            j.name,
            state,
            step,
            str(v.live_global_step),
            loss,
            val,
            str(len(j.good_checkpoints())),
            duration(v.eta_s),
            note,
        )
    return t


def job_panel(j: JobState, metrics: dict | None, view: JobView | None = None) -> Table:
    t = Table(title=f"job {j.job} ({j.name})", show_header=False, expand=False)
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    d = job_json(j, metrics, view)
    if view is not None:
        d["eta"] = (
            f"{duration(view.eta_s)} ({view.eta_basis})"
            if view.eta_s is not None
            else (f"unknown: {view.eta_basis}" if view.eta_basis else None)
        )
    if j.result_step is not None:
        d["result"] = f"step {j.result_step}, {d['result']}" + (
            f", val loss {j.result_val_loss:.4f}" if j.result_val_loss is not None else ""
        )
    # the worker that trains it now (a dead daemon's is in the note, with whether it still runs)
    d["worker"] = (
        f"pid {j.worker.pid}" if j.worker and not (view is not None and view.stale) else None
    )
    for k in [
        "state",
        "note" if view is not None else "reason",
        "live_step",
        "step",
        "iters",
        "epoch",
        "eta",
        "global_step",
        "attempt",
        "worker",
        "lineage",
        "base_model",
        "model_repo",
        "model_revision",
        "data_path",
        "data_sha256",
        "examples",
        "valid_path",
        "last_checkpoint",
        "last_val_loss",
        "best_val_loss",
        "adapter_path",
        "adapter_sha256",
        "result",
        "result_note",
        "stopped_early",
        "exported_to",
        "export_refused",
        "requested",
        "updated_at",
    ]:
        v = d.get(k)
        if v not in (None, "", []):
            label = {"step": "step (checkpoint)", "result": "adapter from"}.get(k, k)
            t.add_row(
                label, f"[{_STATE_STYLE.get(v, '')}]{v}[/]" if k == "state" else escape(str(v))
            )
    if (e := j.last_eval) is not None:
        t.add_row(
            "last eval",
            escape(
                f"loss {_fmt(e.adapter_loss, '.4f')} (ppl {_fmt(e.adapter_ppl, '.2f')}) with the adapter, "
                f"{_fmt(e.base_loss, '.4f')} (ppl {_fmt(e.base_ppl, '.2f')}) without, on {e.examples} "
                f"examples of {e.data_path} ({j.last_eval_at[:19].replace('T', ' ')})"
                + (
                    f"; pairs ranked right {_fmt(e.preference.adapter_accuracy, '.1%')} with the "
                    f"adapter, {_fmt(e.preference.base_accuracy, '.1%')} without"
                    if e.preference
                    else ""
                )
            ),
        )
    if metrics:
        t.add_row(
            "last report",
            "  ".join(
                f"{k}={_short(metrics[k])}"
                for k in ("step", "loss", "lr", "tokens_per_s")
                if metrics.get(k) is not None
            )
            + (
                f"  peak memory {memory(metrics['peak_mem_gb'])}"
                if metrics.get("peak_mem_gb") is not None
                else ""
            ),
        )
    if j.planned_restarts:
        t.add_row(
            "planned restarts",
            f"{j.planned_restarts} (a guard checkpointed and continued in a fresh worker: `ftctl "
            f"history {j.job}` has the evidence; no restart budget used)",
        )
    if metrics and (dev := device_line(metrics)):
        t.add_row("device", escape(dev))
    # what bit-exactness depends on: the last attempt's fingerprint, with the BLAS threads it keeps
    if j.env:
        t.add_row("environment", escape(env_line(j.env)))
    if j.world_size > 1 or j.hosts:
        rates = ", ".join(f"rank {i} {_fmt(r, '.0f')}" for i, r in enumerate(j.rank_tokens_per_s))
        t.add_row(
            "ranks",
            escape(
                f"{j.world_size} ({', '.join(j.hosts)})"
                + (f"; tok/s {rates}" if rates else "")
                + (f"; resharded {'; '.join(j.resharded)}" if j.resharded else "")
            ),
        )
    if j.crashes:
        c = j.crashes[-1]
        where = f" on rank {c.rank} ({c.host})" if c.rank is not None else ""
        t.add_row(
            "last crash",
            escape(f"{c.category}{where} {crash_where(c)} ({c.ts[:19]}): {c.suggestion}"),
        )
        if c.verdict:
            t.add_row(
                "reproduction", f"[{VERDICT_STYLE.get(c.verdict, '')}]{escape(c.reproduction)}[/]"
            )
    for a in j.alerts[-3:]:  # the latest training-health alerts (all of them: `ftctl history JOB`)
        t.add_row("alert", f"[yellow]{escape(a.text)}[/]")
    for w in j.warnings:
        t.add_row("warning", escape(w))
    return t


VERDICT_STYLE = {"reproduced": "bold red", "not reproduced": "green", "different": "yellow"}


def reproduction(r) -> list:
    """`ftctl reproduce`'s report (control.reproduce.Result): the verdict, the replay, the failing batch."""
    out = []
    v, c, o = r.verdict, r.crash, r.outcome
    if v is not None:
        said = f": {escape(c.message)}" if c.message and c.category not in ("nan", "inf") else ""
        out.append(
            f"verdict: [{VERDICT_STYLE.get(v.verdict, '')}]{v.verdict.upper()}[/] — crash {c.number} of job {r.job} "
            f"({escape(c.category)} after step {c.step}{said})"
        )
    else:
        out.append(
            f"job {r.job}: "
            + (
                "[green]ran cleanly[/]"
                if o.category is None
                else f"[red]failed: {escape(o.category)}[/]"
            )
            + f" up to step {o.step} (no crash compared: --step)"
        )
    start = (
        f"checkpoint step {r.from_step} ({escape(r.checkpoint)})"
        if r.checkpoint
        else "the start of the job"
        + (f", warm-started from {escape(r.warm_start)} as the job was" if r.warm_start else "")
    )
    ended = (
        "ran cleanly"
        if o.category is None
        else f"failed with {escape(o.category)} after step {o.step}"
        + (f": {escape(o.message)}" if o.message and o.category not in ("nan", "inf") else "")
    )
    out.append(
        f"  replayed from {start} to step {r.target} on a scratch copy in {r.seconds:.1f} s: {ended}"
    )
    if o.category is not None and o.category not in ("nan", "inf") and r.log_tail.strip():
        at = r.log_tail.rfind("Traceback (most recent call last)")
        tail = (r.log_tail[at:] if at >= 0 else r.log_tail).strip().splitlines()[-8:]
        out.append(
            "  the replay's worker log ends:\n" + "\n".join(f"    {escape(x)}" for x in tail)
        )
    if v is not None and v.first_nonfinite_step is not None:
        from ftctl.core.reproduction import describe_groups

        out.append(
            f"  first non-finite: the {v.first_nonfinite} at step {v.first_nonfinite_step}"
            + (
                f" — the gradient of {escape(describe_groups(v.groups, v.group_count))}"
                if v.groups
                else ""
            )
        )
    if r.examples:
        step = v.failing_step if v is not None else o.step + 1
        t = Table(title=f"failing batch: step {step}", title_justify="left", expand=False)
        for col in ("example", "line", "submitted line", "tokens", "first characters"):
            t.add_column(
                col, justify="right" if col != "first characters" else "left", overflow="fold"
            )
        for e in r.examples:
            t.add_row(
                str(e.index),
                str(e.line),
                "-" if e.source_line is None else str(e.source_line),
                str(e.tokens),
                escape(e.head),
            )
        out.append(t)
        out.append(
            f"  lines are those of the job's data, {escape(r.data_path)}"
            + ("; submitted lines those of " + escape(r.source_path) if r.source_path else "")
        )
    if r.bit_exact:
        out.append(
            f"  bit-exact: the replay's weights and optimizer state equal the job's own checkpoint at step "
            f"{', '.join(map(str, r.bit_exact))} (sha256)"
        )
    if r.mismatch:
        out.append(
            f"  [yellow]not bit-exact[/]: the replay's checkpoint differs from the job's at step "
            f"{', '.join(map(str, r.mismatch))}"
        )
    if r.env_changed:
        out.append(
            "  [yellow]environment differs from the crashed attempt's[/]: "
            + escape("; ".join(r.env_changed))
            + " (bit-exactness holds only within one environment)"
        )
    elif c is not None and c.attempt is not None and c.attempt.env:
        out.append(
            f"  environment: the crashed attempt's (mlx {escape(r.env.get('mlx', '?'))}, blas "
            f"{escape(r.env.get('blas', '?'))}, {escape(r.env.get('blas_threads', '?'))} threads)"
        )
    for n in r.notes:
        out.append(f"  [yellow]note:[/] {escape(n)}")
    return out


# --------------------------------------------------------------------------- the reporter


class ConsoleReporter(Reporter):
    """Draws what the control layer reports: timestamped lines, and a progress bar per training
    job on a terminal (a line per report elsewhere)."""

    STYLE = {"info": "", "ok": "green", "warn": "yellow", "error": "red"}

    def __init__(self, quiet: bool = False, out=None):
        self.quiet, self.out = quiet, out if out is not None else _console("console")
        self.bar = self.task = None
        self.iters = 0
        self.lines: Every | None = None  # without a terminal: progress lines at a sane rate

    def note(self, text: str, level: str = "info") -> None:
        if self.quiet:
            return
        style = self.STYLE.get(level, "")
        body = f"[{style}]{escape(text)}[/]" if style else escape(text)
        self.out.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {body}")

    def section(self, title: str) -> None:
        if not self.quiet:
            self.out.rule(escape(title))

    def training(self, job: str, name: str, iters: int) -> None:
        self.iters, self.lines = iters, Every(iters)
        if self.quiet or not self.out.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(f"job {escape(job)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
            TextColumn("{task.fields[tps]} tok/s  checkpoint {task.fields[ckpt]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.out,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=iters, loss="-", val="-", tps="-", ckpt="-")
        self.bar.start()

    def progress(self, job: str, msg: P.WorkerMessage) -> None:
        if self.bar is not None:
            if isinstance(msg, (P.Step, P.Loaded)):
                self.bar.update(self.task, completed=msg.step)
            elif isinstance(msg, P.Report):
                m = msg.metrics
                self.bar.update(
                    self.task,
                    completed=m.step,
                    loss=_fmt(m.loss, ".4f"),
                    tps=_fmt(m.tokens_per_s, ".0f"),
                )
            elif isinstance(msg, P.Evaluated):
                self.bar.update(self.task, val=_fmt(msg.val_loss, ".4f") + pairs(msg.preference))
            elif isinstance(msg, P.CheckpointWritten):
                self.bar.update(self.task, ckpt=f"step {msg.checkpoint.step}")
            elif isinstance(msg, P.Completed) and msg.stopped_early:  # done before iters
                self.bar.update(self.task, total=msg.step, completed=msg.step)
        elif (
            isinstance(msg, P.Report)
            and self.lines is not None
            and self.lines.due(msg.metrics.step)
        ):
            m = msg.metrics
            self.note(progress_line(job, m, self.iters))
        elif isinstance(msg, P.Evaluated):
            self.note(
                f"job {job} step {msg.step}: val loss {_fmt(msg.val_loss, '.4f')}"
                + pairs(msg.preference),
                "info" if msg.val_loss is not None else "warn",
            )

    def training_ended(self, job: str) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = self.task = None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def device_line(m: dict) -> str:
    """The device of a report and its readings, in one line ('' for a report that has none):
    'cuda:0 NVIDIA H100  memory 12.30 / 80.00 GB (15 %)  62 °C  util 98 %  310 W  ·  MLX 10.20 GB
    active + 1.10 GB cache  ·  worker RSS 2.10 GB, swap 0.0 MB'."""
    parts = []
    used, total = m.get("device_mem_used_gb"), m.get("device_mem_total_gb")
    gpu = []
    if used is not None and total:
        gpu.append(f"memory {memory(used)} / {memory(total)} ({100 * used / total:.0f} %)")
    if m.get("device_temp_c") is not None:
        gpu.append(f"{m['device_temp_c']:.0f} °C")
    if m.get("device_util_pct") is not None:
        gpu.append(f"util {m['device_util_pct']:.0f} %")
    if m.get("device_power_w") is not None:
        gpu.append(f"{m['device_power_w']:.0f} W")
    head = "  ".join([m.get("device") or "", *gpu]).strip()
    if head:
        parts.append(head)
    if m.get("mem_active_gb") is not None:
        parts.append(
            f"MLX {memory(m['mem_active_gb'])} active + {memory(m.get('mem_cache_gb') or 0.0)} cache"
        )
    if m.get("rss_gb") is not None:
        swap = f", swap {memory(m['swap_gb'])}" if m.get("swap_gb") is not None else ""
        parts.append(f"worker RSS {memory(m['rss_gb'])}{swap}")
    return "  ·  ".join(parts)


def eval_table(e: AdapterEvaluated, ws, tuned: str = "adapter"):
    """An `adapter_evaluated` record as `ftctl eval` shows it (also `ftctl lora --test`), its paths
    where the workspace ``ws`` is now (the journal records them relative to it); ``tuned`` names what
    was trained (a full fine-tune's layers)."""
    from rich.table import Table

    def num(x: float | None, spec: str) -> str:
        return "not finite" if x is None else format(x, spec)

    owner = f"job {e.job}" if e.job else "the adapter"
    t = Table(
        title=f"{owner} on {escape(str(ws.abs(e.data_path)))} ({e.examples} examples, "
        f"{e.tokens} tokens scored)"
    )
    p = e.preference  # preference pairs: the loss is the chosen answers'; how each model ranks them
    cols = ("model", "loss", "perplexity") + (("pairs ranked right", "margin") if p else ())
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")
    t.add_row(
        f"base {escape(str(ws.abs(e.base_model)))}",
        num(e.base_loss, ".4f"),
        num(e.base_ppl, ".2f"),
        *((num(p.base_accuracy, ".1%"), num(p.base_margin, "+.3f")) if p else ()),
    )
    t.add_row(
        f"base + {tuned} {'of job ' + e.job if e.job else escape(str(ws.abs(e.adapter_path)))}",
        num(e.adapter_loss, ".4f"),
        num(e.adapter_ppl, ".2f"),
        *((num(p.adapter_accuracy, ".1%"), num(p.adapter_margin, "+.3f")) if p else ()),
    )
    return t


def eval_verdict(e: AdapterEvaluated) -> str:
    """Did fine-tuning help: the adapter's loss against the base model's on the same data; on
    preference pairs, how the two rank them and the adapter's DPO reward against the base."""
    if (p := e.preference) is not None:
        return (
            f"pairs ranked right: {_fmt(p.base_accuracy, '.1%')} → {_fmt(p.adapter_accuracy, '.1%')}; "
            f"DPO reward against the base (beta {p.beta:g}): margin {_fmt(p.reward_margin, '+.4f')}, "
            f"positive on {_fmt(p.reward_accuracy, '.1%')} of pairs (loss and perplexity: the chosen "
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


GRID_ROWS = 40  # more jobs than this: compare prints a plain grid, one line per job, never folded


def _grid(title: str, heads: list[str], cells: list[list[str]], widths, rows, columns):
    """Many jobs as lines of fixed-width columns (`| less -S` scrolls them sideways): the header
    styled as the table's, each cell padded, numbers right-aligned. Rich's Table measures and lays out
    every cell — 0.4-1.1 s for 200 jobs x 22 columns here — where this takes milliseconds."""
    from rich.text import Text

    right = [any(isinstance(r[k], (int, float)) for r in rows) for k in columns]
    out = Text(no_wrap=True, overflow="ignore")
    out.append(title + "\n", style="italic")
    for i, (h, w) in enumerate(zip(heads, widths)):
        cell = Text.from_markup(h)
        pad = " " * (w - cell.cell_len)
        out.append_text(Text(pad) + cell if right[i] else cell + Text(pad))
        out.append("  ")
    out.append("\n")
    line = lambda row: "  ".join(  # noqa: E731
        v.rjust(w) if right[i] else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))
    )
    out.append("\n".join(map(line, cells)))
    return out


def compare_table(c, width: int) -> Table:
    """`ftctl compare`'s table (control.compare.Comparison): a row per job; the config keys after the
    figures (cyan; yellow where they differ). Wider than ``width``, it is turned — a line per column,
    a column per job — if that is narrower (a few jobs, many columns)."""
    from ftctl.core.compare import cell

    def show(col: str, v) -> str:
        if v is None:
            return "-"
        if col == "wall_s":
            return duration(v)
        if col == "peak_mem_gb":
            return memory(v)
        return cell(v)

    def head(col: str) -> str:
        if col in c.differing:
            return f"[bold yellow]{escape(col)}[/]"
        return f"[cyan]{escape(col)}[/]" if col in c.keys else escape(col)

    cells = [[show(k, r[k]) for k in c.columns] for r in c.rows]
    widths = [max([len(k)] + [len(row[i]) for row in cells]) for i, k in enumerate(c.columns)]
    title = f"{len(c.rows)} job(s)" + (
        f"; differing keys: {', '.join(c.differing)}" if c.differing else "; no config key differs"
    )
    wide = sum(w + 3 for w in widths) + 1
    turned = widths[0] + 4 + sum(max(len(x) for x in row) + 3 for row in cells)
    if len(c.rows) > GRID_ROWS:  # a sweep: rich would lay out every cell (~2 s for 200 jobs)
        return _grid(title, [head(k) for k in c.columns], cells, widths, c.rows, c.columns)
    if wide <= width or turned >= wide or not c.rows:  # turned only when that is what fits better
        t = Table(title=title, expand=False)
        for k in c.columns:
            numeric = any(isinstance(r[k], (int, float)) for r in c.rows)
            t.add_column(head(k), justify="right" if numeric else "left", overflow="fold")
        for row in cells:
            t.add_row(*map(escape, row))
        return t
    t = Table(title=title + " (turned: a column per job)", expand=False)
    t.add_column("")
    for r in c.rows:
        t.add_column(escape(r["job"]), overflow="fold")
    for i, k in enumerate(c.columns):
        if k != "job":
            t.add_row(head(k), *[escape(row[i]) for row in cells])
    return t
