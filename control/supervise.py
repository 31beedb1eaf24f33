"""Supervising one worker: its messages become events, user requests become a stop, its death a
crash with a decision.

The daemon learns of a worker's death by waiting on it (EOF on the message pipe, then wait()),
not by polling a PID file. ``on_message`` is the one place a worker message becomes an event.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import TYPE_CHECKING

import msgspec

from ftctl.adapters import blas, process, system
from ftctl.adapters import protocol as P
from ftctl.adapters.faults import crash_point
from ftctl.core.policy import (
    Evidence,
    after_crash,
    branch_reason,
    classify,
    follow_up,
    suggestion,
)
from ftctl.core.reproduction import DETERMINISTIC
from ftctl.core.state import CrashRecord, JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.journal import utc_now
from ftctl.recovery.reconcile import apply, mark_corrupt

from . import reproduce, retention
from .reporter import Every
from .status import describe_result
from .tensorboard import Live
from .trackers import Trackers

if TYPE_CHECKING:
    from .daemon import Daemon

POLL_S = 0.25
CONTROL_EVERY_S = 0.5


class Supervision:
    """Watches one worker: messages -> events, control requests -> stop, death -> crash."""

    def __init__(
        self, d: "Daemon", j: JobState, worker: process.Worker, oom_before: int | None, step: int
    ):
        self.d, self.job, self.cfg, self.w, self.oom_before = d, j.job, j.config, worker, oom_before
        self.stream = job_stream(j.job)
        self.last_progress = time.monotonic()
        self.in_eval = False
        self.loading = True  # imports + model load: allowed eval_hang_s, not hang_s
        self.step_seen = False  # a spare is started after this worker's first step
        self.stop_sent: float | None = None
        self.stop_reason: str | None = None  # "pause" | "cancel" | "shutdown"
        self.hung = False
        self.halted: list[int] = []  # what stopped() found when the watchdog last looked
        self.stop_forced = False  # asked to stop, it did not within stop_s: ftctl killed it
        self.error: P.Failed | None = None
        self.finished: str | None = None  # "completed" | "stopped"
        self.step = step  # a crash before the first step is at the resume step
        self.stopped_step = 0
        self.log_due = Every(j.iters)  # daemon.log gets progress at a sane rate
        self.tb = Live(d.ws, d.ledger.state.jobs[j.job], d.say)  # TensorBoard files, if configured
        self.trackers = Trackers(
            d.ws, d.ledger.state.jobs[j.job], d.say
        )  # report_to, if configured
        d.report.training(j.job, j.name, j.iters)

    # ------------------------------------------------------------------ loop
    def watch(self) -> None:
        fd = self.w.messages.fileno()
        buf = b""
        last_control = 0.0
        try:
            while True:
                r, _, _ = select.select([fd], [], [], POLL_S)
                if r:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break  # EOF: the worker exited (or closed the pipe as it died)
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in filter(bytes.strip, lines):
                        self.receive(line)
                now = time.monotonic()
                if now - last_control >= CONTROL_EVERY_S:
                    last_control = now
                    self.control()
                    self.standby()
                    self.d.scan_inbox()  # files dropped in while a job trains are queued now, not after it
                self.watchdog(now)
            code = self.w.proc.wait()
        finally:
            self.d.report.training_ended(self.job)
            self.w.messages.close()
            if self.w.proc.stdin:
                try:
                    self.w.proc.stdin.close()
                except OSError:
                    pass
        self.w.kill_group()  # nothing of the worker's group may outlive it
        self.tb.close()
        self.trackers.close()
        self.finish(code)

    def receive(self, line: bytes) -> None:
        try:
            msg = P.decode_message(line)
        except (
            P.ProtocolError
        ) as e:  # a bug, not a reason to drop the worker: say it, keep watching
            self.d.say(f"job {self.job}: {e}", "error")
            return
        self.on_message(msg)

    def control(self) -> None:
        d = self.d
        d.ledger.refresh()
        j = d.ledger.state.jobs[self.job]
        want = None
        if j.requested in ("pause", "cancel"):
            want = j.requested
        elif d.stopping or d.ledger.state.daemon.shutdown_requested:
            want = "shutdown"
        if want == "cancel" and self.stop_reason != "cancel":
            self.stop_reason = "cancel"
            d.say(f"job {self.job}: cancel requested, stopping the worker")
            self.w.kill_group()
        elif want and self.stop_sent is None:
            self.stop_reason, self.stop_sent = want, time.monotonic()
            d.say(f"job {self.job}: {want} requested, checkpointing at the current step")
            self.w.send(P.encode(P.Stop()))
        if d.force:
            self.w.kill_group()

    def standby(self) -> None:
        """Keep a spare worker (control/standby.py) once this one trains (not while it loads: the spare's
        imports would slow that load on a small machine), and report the spare's memory."""
        if self.cfg.standby and self.step_seen and self.stop_sent is None and not self.d.stopping:
            self.d.standby.ensure(blas.for_worker(self.cfg.blas)[0].env)
        self.d.standby.report()

    def stopped(self) -> list[int]:
        """The worker's processes stopped by a signal (SIGSTOP, SIGTSTP): alive, computing nothing."""
        return process.stopped([self.w.proc.pid])

    def watchdog(self, now: float) -> None:
        """No progress for hang_s (eval_hang_s while loading or evaluating) is a hang: the worker group
        is killed. A stopped process gets hang_s even then: a stopped evaluation is not a slow one."""
        t = self.cfg.timeouts
        quiet = now - self.last_progress
        if not self.hung and quiet > t.hang_s:
            self.halted = self.stopped()
            limit = (
                t.eval_hang_s if (self.in_eval or self.loading) and not self.halted else t.hang_s
            )
            if quiet > limit:
                self.hung = True
                self.d.say(
                    f"job {self.job}: no progress for {limit:g} s: killing the worker group (hang)",
                    "error",
                )
                self.w.kill_group()
        if self.stop_sent is not None and now - self.stop_sent > t.stop_s:
            self.d.say(
                f"job {self.job}: worker did not stop within {t.stop_s:g} s: killing it", "error"
            )
            self.halted = self.stopped()
            self.stop_forced = True
            self.w.kill_group()
            self.stop_sent = float("inf")

    # ------------------------------------------------------------------ messages
    def on_message(self, msg: P.WorkerMessage) -> None:
        """The one place a worker message becomes an event (or a metrics row)."""
        L, job, d = self.d.ledger, self.job, self.d
        self.last_progress = time.monotonic()
        match msg:
            case P.Loaded(step=step):
                self.step, self.loading = step, False
            case P.Step(step=step):
                if (
                    self.step_seen is False
                ):  # the first step: the new worker is up, time for a new spare
                    self.step_seen = True
                    self.standby()
                self.step = step
            case P.Report(metrics=m):
                L.journal.record_metric(job, m)
                self.tb.report(m)  # after the journal has it: a view of what is recorded
                self.trackers.report(m)
                if self.log_due.due(m.step):
                    d.log(
                        f"job {job} step {m.step}/{self.cfg.iters}: loss {_num(m.loss, '.4f')}  lr "
                        f"{_num(m.lr, '.3g')}  "
                        f"{_num(m.tokens_per_s, '.0f')} tok/s  peak {_num(m.peak_mem_gb, '.2f')} GB"
                    )
            case P.EvalStarted():
                self.in_eval = True
            case P.Evaluated(step=step, global_step=gstep, val_loss=val, preference=pref):
                self.in_eval = False
                L.commit(
                    self.stream,
                    ev.Evaluated(
                        job=job, step=step, global_step=gstep, val_loss=val, preference=pref
                    ),
                )
                self.tb.val(gstep, val, pref)
                self.trackers.val(gstep, step, val)
                d.log(f"job {job} step {step}: val loss {_num(val, '.4f')}")
            case P.CheckpointStarted(step=step, global_step=gstep):
                L.commit(self.stream, ev.CheckpointStarted(job=job, step=step, global_step=gstep))
            case P.CheckpointWritten(checkpoint=c):
                crash_point("daemon_before_commit", c.step)
                c = msgspec.structs.replace(c, path=d.ws.rel(c.path))  # recorded relative
                L.commit(self.stream, ev.CheckpointCommitted(job=job, checkpoint=c))
                d.log(f"job {job}: checkpoint step {c.step} committed ({c.bytes / 1e6:.1f} MB)")
                self.retention()
            case P.Completed():
                L.refresh()  # the head as it is now: decided, and recorded with the completion
                j = L.state.jobs[job]
                lin = L.state.lineages.get(j.lineage)
                branch = branch_reason(j, lin) if lin is not None else ""
                done = ev.Completed(
                    job=job,
                    step=msg.step,
                    global_step=msg.global_step,
                    adapter_path=d.ws.rel(msg.adapter_path),
                    adapter_sha256=msg.adapter_sha256,
                    checkpoint=d.ws.rel(msg.checkpoint),
                    result=msg.result,
                    result_step=msg.result_step,
                    result_val_loss=msg.result_val_loss,
                    result_note=msg.result_note,
                    exported_to=msg.exported_to,
                    export_refused=msg.export_refused,
                    branch=branch,
                )
                # early stopping's decision and the test split's scores (config `test`) with it, in
                # one transaction: all or nothing (a job never reads as stopped early without its
                # result, nor completes early without the reason)
                early = (
                    [
                        ev.EarlyStopped(
                            job=job,
                            step=msg.step,
                            global_step=msg.global_step,
                            reason=msg.stopped_early,
                            best_step=msg.best_step,
                            best_val_loss=msg.best_val_loss,
                        )
                    ]
                    if msg.stopped_early
                    else []
                )
                scored = [
                    msgspec.structs.replace(e, data_path=d.ws.rel(e.data_path))  # recorded relative
                    for e in ([msg.evaluated] if msg.evaluated else [])
                ]
                L.commit(self.stream, *early, done, *scored)
                self.finished = "completed"
                if msg.stopped_early:
                    d.say(f"job {job}: {msg.stopped_early}", "ok")
                d.say(
                    f"job {job} completed at step {msg.step} (global {msg.global_step}): "
                    f"adapter {msg.adapter_path} sha256 {msg.adapter_sha256[:16]}…, "
                    f"{describe_result(msg)}"
                    + (f", also published at {msg.exported_to}" if msg.exported_to else ""),
                    "ok",
                )
                if msg.export_refused:
                    d.say(f"job {job}: adapter_path not written: {msg.export_refused}", "warn")
                if msg.evaluated:
                    e = msg.evaluated
                    d.say(
                        f"job {job} test split: loss {_num(e.adapter_loss, '.4f')} (base model "
                        f"{_num(e.base_loss, '.4f')}), perplexity {_num(e.adapter_ppl, '.2f')}"
                    )
                if branch:
                    d.say(f"job {job} is {branch}", "warn")
            case P.Stopped(step=step):
                self.finished, self.stopped_step = "stopped", step
            case P.Failed():
                self.error = msg
        d.report.progress(job, msg)

    def retention(self) -> None:
        r = retention.checkpoints(self.d.ws, self.d.ledger.state.jobs[self.job])
        if r is not None:
            apply(self.d.ledger, [r])

    # ------------------------------------------------------------------ the end
    def finish(self, code: int) -> None:
        d, L, j = self.d, self.d.ledger, self.d.ledger.state.jobs[self.job]
        if self.finished == "completed":
            return
        if self.finished == "stopped" and code == 0:
            if self.stop_reason == "pause":
                L.commit(
                    self.stream,
                    ev.Paused(job=self.job, reason=f"paused by user at step {self.stopped_step}"),
                )
            else:
                L.commit(
                    self.stream,
                    ev.Interrupted(
                        job=self.job,
                        step=self.stopped_step,
                        reason=f"graceful stop ({d.stopping or 'shutdown'}): checkpointed at step {self.stopped_step}",
                    ),
                )
            d.say(
                f"job {self.job}: stopped at step {self.stopped_step} with a checkpoint; nothing lost"
            )
            return
        if (
            d.force
        ):  # the user asked the daemon to stop twice: an interrupt, not a crash, whatever the exit
            from_step = (
                f"step {j.step}, its last checkpoint"
                if j.good_checkpoints()
                else "step 0 (no checkpoint yet)"
            )
            L.commit(
                self.stream,
                ev.Interrupted(
                    job=self.job,
                    step=j.step,
                    reason=(
                        f"stopped by the user ({d.stopping}, asked twice): the worker was killed before it could "
                        f"checkpoint; it resumes from {from_step}"
                    ),
                ),
            )
            d.say(
                f"job {self.job}: stopped at once (asked twice); it resumes from {from_step}",
                "warn",
            )
            return
        if (
            self.stop_reason == "cancel"
        ):  # the user's act, not a crash: no crash record, no red tick on the curve
            L.commit(
                self.stream,
                ev.Cancelled(
                    job=self.job,
                    reason=f"cancelled by user while training (step "
                    f"{self.step}); its worker was stopped",
                ),
            )
            d.say(f"job {self.job} cancelled")
            return
        self.crashed(j, code)

    def replay_cancelled(self) -> str:
        """Why the daemon's replay of a crash must stop now ("" to go on): the daemon is stopping, or the
        user asked to pause or cancel the job or to shut down — the daemon stays responsive meanwhile."""
        d = self.d
        if d.stopping:
            return "the daemon is stopping"
        d.ledger.refresh()
        if d.ledger.state.daemon.shutdown_requested:
            return "`ftctl shutdown` was requested"
        want = d.ledger.state.jobs[self.job].requested
        return f"{want} of job {self.job} was requested" if want else ""

    def crashed(self, j: JobState, code: int) -> None:
        """Classify the death, record it and the policy's decision in one transaction."""
        d, L = self.d, self.d.ledger
        oom_after = system.oom_kill_count()
        oom = None if self.oom_before is None or oom_after is None else oom_after - self.oom_before
        tail = process.tail(self.w.log_path, since=self.w.log_offset)
        said = (
            f"\n{self.error.message}" if self.error else ""
        )  # the worker's own words count as evidence too
        category = classify(
            Evidence(
                exit_code=code,
                stderr_tail=tail + said,
                reported=self.error.category if self.error else None,
                oom_kills=oom,
                hung=self.hung or self.stop_forced,
            )
        )
        if category == "corrupt_checkpoint" and self.error and self.error.path:
            bad = d.ws.rel(self.error.path)
            c = next((c for c in j.good_checkpoints() if c.path == bad), None)
            if c is not None:
                apply(L, [mark_corrupt(self.job, c, self.error.message)])
                j = L.state.jobs[self.job]
        sig = -code if code < 0 else None
        forced = (
            f"; asked to stop ({self.stop_reason}), it did not within timeouts.stop_s = "
            f"{self.cfg.timeouts.stop_s:g} s, so ftctl killed it"
            if self.stop_forced
            else ""
        )
        evidence = (
            f"exit code {code}"
            + (f" (signal {signal.Signals(sig).name})" if sig else "")
            + forced
            + (f"; worker said: {self.error.message}" if self.error else "")
            + (
                "; the worker was stopped by a signal (SIGSTOP/SIGTSTP) and made no progress"
                if (self.hung or self.stop_forced) and self.halted
                else ""
            )
            + f"; last step seen {self.step}; log {d.ws.rel(self.w.log_path)}\n"
            + _evidence_tail(tail)
        )
        detail = _first_line(self.error.message) if self.error else ""
        fix = (self.error.fix or "") if self.error else ""
        good = j.good_checkpoints()
        advice = suggestion(category, good[-1].step if good else None, fix).replace("JOB", self.job)
        if detail and category in ("exception", "load_error"):
            advice = f"{detail} — {advice}"
        crash = ev.Crashed(
            job=self.job,
            category=category,
            step=self.step,
            exit_code=code,
            signal=sig,
            evidence=evidence,
            suggestion=advice,
            message=detail,
            fix=fix,
        )
        replayed = None
        if category in DETERMINISTIC and not d.stopping and not j.requested:
            # a crash that can be a property of the run is replayed before any restart (control/reproduce.py)
            replayed = reproduce.after_crash(
                d.ws, L, j, category, self.step, detail, self.replay_cancelled, d.say
            )
            j = L.state.jobs[self.job]
            if replayed is not None:
                d.say(
                    f"job {self.job}: crash {replayed.crash} {replayed.summary}",
                    "warn" if replayed.verdict == "reproduced" else "info",
                )
        now = time.time()
        record = CrashRecord(
            ts=utc_now(),
            category=category,
            step=self.step,
            exit_code=code,
            signal=sig,
            resume_step=j.step,
        )
        dec = after_crash(
            j.crashes[j.budget_from :] + [record],
            now,
            resume_step=j.step,
            policy=self.cfg.restart,
            detail=detail,
            reproduction=replayed,
            fix=fix,
        )
        nxt = follow_up(
            self.job,
            dec,
            j.requested or (self.stop_reason if self.stop_reason == "pause" else None),
            category,
            now,
        )
        # one transaction: a crashed job is never left without its decision (nor its reproduction)
        L.commit(self.stream, crash, *([replayed] if replayed else []), nxt)
        d.say(
            f"job {self.job} crashed ({category}, exit {code}) at step {self.step}: {advice}",
            "error",
        )
        d.say(
            f"job {self.job} {type(nxt).kind()}: {getattr(nxt, 'reason', '')}",
            {"requeued": "info", "paused": "warn"}.get(type(nxt).kind(), "error"),
        )


def _first_line(message: str, limit: int = 200) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _evidence_tail(tail: str, limit: int = 3000) -> str:
    """The end of the worker's log for this attempt, from its last traceback if it has one."""
    at = tail.rfind("Traceback (most recent call last)")
    if at >= 0 and len(tail) - at <= limit:
        return tail[at:]
    return tail[-limit:]
