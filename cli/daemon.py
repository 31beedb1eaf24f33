"""`ftctl start`: the supervisor. One per workspace (flock), parent of one worker at a time.

It learns of a worker's death by waiting on it (EOF on the message pipe, then wait()), not by
polling a PID file; it turns what the worker reports into events; it is the only writer of a
running job's stream besides user commands, which it picks up from the journal twice a second.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from pathlib import Path

import msgspec

from ftctl.adapters import checkpoint as ck
from ftctl.adapters import process, system
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.core.config import Config, ConfigError, decode_config, locked_changes
from ftctl.core.policy import SUGGESTIONS, Evidence, after_crash, classify, follow_up, to_prune
from ftctl.core.state import DAEMON_STREAM, CrashRecord, JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.journal import utc_now
from ftctl.recovery import reconcile
from ftctl.recovery.ledger import Ledger

from rich.markup import escape

from . import render
from .jobs import SubmitError, submit

POLL_S = 0.25
CONTROL_EVERY_S = 0.5
INBOX_SETTLE_S = 2.0

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("ftctl")
except Exception:  # running from a source tree without metadata
    VERSION = "dev"


class DaemonError(Exception):
    pass


class LockedConfig(Exception):
    pass


class Daemon:
    def __init__(self, ws: Workspace, *, until_idle: bool = False, env: dict | None = None, quiet: bool = False):
        self.ws = ws
        self.until_idle = until_idle
        self.env = env or {}
        self.quiet = quiet
        self.console = render.console
        self.stopping: str | None = None   # why we were asked to stop (signal / shutdown)
        self.force = False
        self.ledger: Ledger | None = None
        self.lock_fd: int | None = None
        self.refused: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ lifecycle
    def say(self, text: str, style: str = "") -> None:
        if not self.quiet:
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [{style}]{escape(text)}[/]" if style
                               else f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(text)}")
        with open(self.ws.logs / "daemon.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:
            self.force = True
        self.stopping = signal.Signals(signum).name

    def acquire(self) -> None:
        self.ws.require()
        try:
            self.lock_fd = process.acquire_lock(self.ws.lock_path)
        except process.LockHeld as e:
            d = Ledger(self.ws.open_journal()).state.daemon
            since = f", running since {d.started_at[:19]} UTC" if d.running else ""
            raise DaemonError(
                f"another ftctl daemon is running on {self.ws.home} ({e.holder.strip()}{since}). "
                "Only one may run per workspace; nothing was changed. Use `ftctl status`, or "
                "`ftctl shutdown` to stop it."
            ) from None

    def run(self) -> int:
        self.acquire()
        self.ledger = Ledger(self.ws.open_journal())
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.recover()
            me = process.identity(os.getpid())
            self.ledger.commit(DAEMON_STREAM, ev.DaemonStarted(process=me, host=socket.gethostname(), version=VERSION))
            self.say(f"daemon started (pid {os.getpid()}) on {self.ws.home}")
            reason = self.loop()
            self.ledger.commit(DAEMON_STREAM, ev.DaemonStopped(pid=os.getpid(), reason=reason))
            self.say(f"daemon stopped: {reason}")
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.ledger.close()
            process.release_lock(self.lock_fd)

    def recover(self) -> int:
        return len(reconcile.recover(self.ws, self.ledger, lambda r: self.say(f"recovery: {r.what}")))

    # ------------------------------------------------------------------ the queue
    def loop(self) -> str:
        while True:
            self.ledger.refresh()
            if self.stopping:
                return f"stopped by {self.stopping}"
            if self.ledger.state.daemon.shutdown_requested:
                return "ftctl shutdown"
            self.scan_inbox()
            now = time.time()
            queued = self.ledger.state.queue()
            ready = [j for j in queued if j.not_before <= now]
            if ready:
                self.run_job(ready[0])
                continue
            if self.consolidate_if_due():
                continue
            if self.until_idle and not queued and not self._inbox_files():
                return "queue empty (--until-idle)"
            time.sleep(POLL_S)

    def consolidate_if_due(self) -> bool:
        """When idle: run a requested consolidation, or the daily scheduled one (never under a job)."""
        from .consolidate import ConsolidationRefused, blockers, consolidate, due

        try:
            cfg, _ = self.ws.load_config()
        except ConfigError:
            return False
        for lin in list(self.ledger.state.lineages.values()):
            key = (lin.name, lin.version)
            if lin.state != "idle" or lin.head_job is None or key in self.refused or blockers(self.ledger, lin.name):
                continue
            if not (lin.requested or due(cfg.consolidation.schedule, lin.last_consolidation_at)):
                continue
            try:
                consolidate(self.ws, self.ledger, lin.name, keep_models=cfg.consolidation.keep_models,
                            min_free_gb=cfg.min_free_disk_gb, say=self.say)
            except ConsolidationRefused as e:
                self.refused.add(key)  # not again in this run unless the lineage changes
                self.say(f"consolidation of lineage {lin.name} refused: {e}", "yellow")
            return True
        return False

    def _inbox_files(self) -> list[Path]:
        return sorted(p for p in self.ws.inbox.glob("*.jsonl") if p.is_file())

    def scan_inbox(self) -> None:
        for path in self._inbox_files():
            try:
                if time.time() - path.stat().st_mtime < INBOX_SETTLE_S and not self.until_idle:
                    continue  # still being written
                sub = submit(self.ws, self.ledger, path, name=path.stem)
            except (SubmitError, ConfigError) as e:
                self.say(f"inbox: {path.name}: {e}", "red")
                dest = self.ws.inbox / "rejected" / path.name
            else:
                if sub.state == "queued":
                    self.say(f"inbox: {path.name} queued as job {sub.job} ({sub.report.valid} examples)")
                    dest = self.ws.inbox / "accepted" / f"{sub.job}-{path.name}"
                else:
                    self.say(f"inbox: {path.name} rejected as job {sub.job}: {'; '.join(sub.reasons)}", "red")
                    dest = self.ws.inbox / "rejected" / path.name
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(path, dest)  # the content is untouched; it only leaves the inbox

    # ------------------------------------------------------------------ one job
    def _config(self, j: JobState) -> Config | None:
        try:
            return decode_config(j.config)[0]
        except ConfigError as e:
            self.ledger.commit(job_stream(j.job), ev.Failed(job=j.job, reason=f"recorded config no longer valid: {e}", category="config"))
            return None

    def _resume_point(self, j: JobState) -> str | None:
        """Newest committed checkpoint that verifies; corrupt ones are recorded and skipped."""
        for c in reversed(j.good_checkpoints()):
            try:
                ck.verify_checkpoint(c.path)
                return c.path
            except ck.CheckpointCorrupt as e:
                self.say(f"job {j.job}: checkpoint step {c.step} is corrupt ({e.reason}); falling back", "yellow")
                self.ledger.commit(job_stream(j.job), ev.CheckpointCorrupt(job=j.job, step=c.step, path=c.path, reason=e.reason))
        return None

    def _warm_start(self, j: JobState, cfg: Config) -> tuple[str | None, int]:
        if j.attempt > 0:  # a restart uses exactly what the first attempt used
            return j.warm_start_from, j.global_step_base
        lin = self.ledger.state.lineages.get(j.lineage)
        head = self.ledger.state.jobs.get(lin.head_job) if lin and lin.head_job else None
        if not cfg.warm_start or head is None or head.base_model != j.base_model:
            return None, 0
        changed = locked_changes(head.config, j.config)
        if changed:
            raise LockedConfig(f"job {j.job} would warm-start from job {head.job}'s adapter but changes what shapes it "
                               f"({'; '.join(changed)}); consolidate first or submit it to a new lineage (--lineage NAME)")
        good = head.good_checkpoints()
        final = [c for c in good if c.step == head.step]
        if not final:
            self.say(f"job {j.job}: previous job {head.job} has no verified final checkpoint; starting fresh", "yellow")
            return None, 0
        return final[-1].path, head.global_step

    def _preflight(self, j: JobState, cfg: Config) -> str | None:
        last = j.good_checkpoints()[-1].bytes if j.good_checkpoints() else 0
        need = max(cfg.min_free_disk_gb, 2 * last / system.GB)
        free = system.free_disk_gb(self.ws.home)
        if free < need:
            return (f"only {free:.2f} GB free on {self.ws.home}, need {need:.2f} GB "
                    f"(max of min_free_disk_gb and twice the checkpoint size): free space, then `ftctl resume {j.job}`")
        model = Path(cfg.model)
        if not model.exists():
            return f"base model {cfg.model} does not exist: restore it, then `ftctl resume {j.job}`"
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) / system.GB
        avail = system.available_memory_gb()
        if avail < weights * 1.2:
            return (f"only {avail:.2f} GB of memory available, the model needs about {weights * 1.2:.2f} GB: "
                    f"close other programs, then `ftctl resume {j.job}`")
        return None

    def run_job(self, j: JobState) -> None:
        cfg = self._config(j)
        if cfg is None:
            return
        stream = job_stream(j.job)
        short = self._preflight(j, cfg)
        if short:
            self.say(f"job {j.job} paused: {short}", "yellow")
            self.ledger.commit(stream, ev.Paused(job=j.job, reason=short))
            return
        reconcile.apply(self.ledger, reconcile.debris(self.ws, j))  # what a crashed attempt left
        resume = self._resume_point(j)
        j = self.ledger.state.jobs[j.job]
        try:
            warm, base = self._warm_start(j, cfg)
        except LockedConfig as e:
            self.say(f"job {j.job} failed: {e}", "red")
            self.ledger.commit(stream, ev.Failed(job=j.job, reason=str(e), category="config_lock"))
            return
        from ftctl.adapters.trainer import TrainPlan  # MLX and mlx-lm load only where training starts

        jdir = self.ws.job_dir(j.job)
        valid = jdir / "data" / "valid.jsonl"
        plan = TrainPlan(job_id=j.job, job_dir=str(jdir), config=cfg, train_path=str(jdir / "data" / "train.jsonl"),
                         valid_path=str(valid) if valid.exists() else None, resume_from=resume,
                         warm_start_from=warm, global_step_base=base)
        oom_before = system.oom_kill_count()
        worker = process.spawn_worker(msgspec.json.encode(plan), self.ws.job_log(j.job), self.env,
                                      label=(j.job, str(self.ws.home)))
        crash_point("daemon_after_spawn", j.attempt + 1)
        resume_step = ck.checkpoint_step(resume) if resume else 0
        attempt = j.attempt + 1
        self.ledger.commit(stream, ev.TrainingStarted(
            job=j.job, attempt=attempt, worker_pid=worker.id.pid, worker_started_at=worker.id.started_at,
            resume_step=resume_step, resume_checkpoint=resume, warm_start_from=warm, global_step_base=base,
            base_model=cfg.model))
        how = f"resuming from step {resume_step}" if resume else ("warm start from " + warm if warm else "fresh adapter")
        self.say(f"job {j.job} ({j.name}): training, attempt {attempt}, worker pid {worker.id.pid}, {how}")
        Supervision(self, j.job, cfg, worker, oom_before, resume_step).watch()


class Supervision:
    """Watches one worker: messages -> events, control requests -> stop, death -> crash."""

    def __init__(self, d: Daemon, job: str, cfg: Config, worker: process.Worker, oom_before: int | None, step: int):
        self.d, self.job, self.cfg, self.w, self.oom_before = d, job, cfg, worker, oom_before
        self.stream = job_stream(job)
        self.last_progress = time.monotonic()
        self.in_eval = False
        self.loading = True                   # imports + model load: allowed eval_hang_s, not hang_s
        self.stop_sent: float | None = None
        self.stop_reason: str | None = None   # "pause" | "cancel" | "shutdown"
        self.hung = False
        self.error: dict | None = None
        self.finished: str | None = None      # "completed" | "stopped"
        self.step = step                      # a crash before the first step is at the resume step
        self.stopped_step = 0
        self.bar = None

    # ------------------------------------------------------------------ loop
    def watch(self) -> None:
        fd = self.w.messages.fileno()
        buf = b""
        last_control = 0.0
        self._bar_open()
        try:
            while True:
                r, _, _ = select.select([fd], [], [], POLL_S)
                if r:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break  # EOF: the worker exited (or closed the pipe as it died)
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self.on_message(json.loads(line))
                now = time.monotonic()
                if now - last_control >= CONTROL_EVERY_S:
                    last_control = now
                    self.control()
                self.watchdog(now)
            code = self.w.proc.wait()
        finally:
            self._bar_close()
            self.w.messages.close()
            if self.w.proc.stdin:
                try:
                    self.w.proc.stdin.close()
                except OSError:
                    pass
        self.w.kill_group()  # nothing of the worker's group may outlive it
        self.finish(code)

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
            self.w.send("stop")
        if d.force:
            self.w.kill_group()

    def watchdog(self, now: float) -> None:
        t = self.cfg.timeouts
        limit = t.eval_hang_s if self.in_eval or self.loading else t.hang_s
        if not self.hung and now - self.last_progress > limit:
            self.hung = True
            self.d.say(f"job {self.job}: no progress for {limit:g} s: killing the worker group (hang)", "red")
            self.w.kill_group()
        if self.stop_sent is not None and now - self.stop_sent > t.stop_s:
            self.d.say(f"job {self.job}: worker did not stop within {t.stop_s:g} s: killing it", "red")
            self.w.kill_group()
            self.stop_sent = float("inf")

    # ------------------------------------------------------------------ messages
    def on_message(self, m: dict) -> None:
        t = m.get("t")
        L = self.d.ledger
        self.last_progress = time.monotonic()
        if t == "step":
            self.step = m["step"]
            self._bar_update(m)
        elif t == "loaded":
            self.step, self.loading = m["step"], False
            self._bar_update(m)
        elif t == "report":
            L.journal.record_metric(self.job, m)
            self._bar_update(m)
            if self.bar is None and m["loss"] is not None:
                self.d.say(f"job {self.job} step {m['step']}/{self.cfg.iters}: loss {m['loss']:.4f}  "
                           f"lr {m['lr']:.3g}  {m['tokens_per_s']:.0f} tok/s  peak {m['peak_mem_gb']:.2f} GB")
        elif t == "eval_begin":
            self.in_eval = True
        elif t == "eval":
            self.in_eval = False
            L.commit(self.stream, ev.Evaluated(job=self.job, step=m["step"], global_step=m["global_step"], val_loss=m["val_loss"]))
            if m["val_loss"] is None:
                self.d.say(f"job {self.job} step {m['step']}: validation loss is not finite", "yellow")
            elif self.bar is None:
                self.d.say(f"job {self.job} step {m['step']}: val loss {m['val_loss']:.4f}")
        elif t == "checkpoint_begin":
            L.commit(self.stream, ev.CheckpointStarted(job=self.job, step=m["step"], global_step=m["global_step"]))
        elif t == "checkpoint":
            crash_point("daemon_before_commit", m["step"])
            L.commit(self.stream, ev.CheckpointCommitted(
                job=self.job, step=m["step"], global_step=m["global_step"], path=m["path"],
                manifest_sha256=m["manifest_sha256"], bytes=m["bytes"], train_loss=m.get("train_loss"),
                val_loss=m.get("val_loss")))
            self.retention()
        elif t == "completed":
            L.commit(self.stream, ev.Completed(job=self.job, step=m["step"], global_step=m["global_step"],
                                               adapter_path=m["adapter_path"], adapter_sha256=m["adapter_sha256"],
                                               checkpoint=m["checkpoint"]))
            self.finished = "completed"
            self.d.say(f"job {self.job} completed at step {m['step']} (global {m['global_step']}): "
                       f"adapter {m['adapter_path']} sha256 {m['adapter_sha256'][:16]}…", "green")
        elif t == "stopped":
            self.finished, self.stopped_step = "stopped", m["step"]
        elif t == "error":
            self.error = m

    def retention(self) -> None:
        L = self.d.ledger
        j = L.state.jobs[self.job]
        r = self.cfg.retention
        victims = to_prune(j.checkpoints, r.keep_last, r.keep_best)
        if not victims:
            return
        L.commit(self.stream, *[ev.CheckpointPruned(job=self.job, step=c.step, path=c.path,
                                                    reason=f"retention: keep_last={r.keep_last}, keep_best={r.keep_best}")
                                for c in victims])
        for c in victims:  # the event first, the deletion after: a crash in between is cleaned by recovery
            ck.discard_dir(c.path)

    # ------------------------------------------------------------------ the end
    def finish(self, code: int) -> None:
        d, L, j = self.d, self.d.ledger, self.d.ledger.state.jobs[self.job]
        if self.finished == "completed":
            return
        if self.finished == "stopped" and code == 0:
            if self.stop_reason == "pause":
                L.commit(self.stream, ev.Paused(job=self.job, reason=f"paused by user at step {self.stopped_step}"))
            else:
                L.commit(self.stream, ev.Interrupted(job=self.job, step=self.stopped_step,
                                                     reason=f"graceful stop ({d.stopping or 'shutdown'}): checkpointed at step {self.stopped_step}"))
            d.say(f"job {self.job}: stopped at step {self.stopped_step} with a checkpoint; nothing lost")
            return
        if self.stop_reason == "cancel":
            L.commit(self.stream, ev.Crashed(job=self.job, category="killed", step=j.step, exit_code=code,
                                             evidence="cancelled by user", suggestion=""),
                     ev.Cancelled(job=self.job, reason="cancelled by user"))
            d.say(f"job {self.job} cancelled")
            return
        oom_after = system.oom_kill_count()
        oom = None if self.oom_before is None or oom_after is None else oom_after - self.oom_before
        tail = process.tail(self.w.log_path, since=self.w.log_offset)
        category = classify(Evidence(exit_code=code, stderr_tail=tail, reported=(self.error or {}).get("category"),
                                     oom_kills=oom, hung=self.hung))
        if category == "corrupt_checkpoint" and self.error and self.error.get("path"):
            c = next((c for c in j.good_checkpoints() if c.path == self.error["path"]), None)
            if c is not None:
                L.commit(self.stream, ev.CheckpointCorrupt(job=self.job, step=c.step, path=c.path, reason=self.error["message"]))
        sig = -code if code < 0 else None
        evidence = (f"exit code {code}" + (f" (signal {signal.Signals(sig).name})" if sig else "")
                    + (f"; worker said: {self.error['message']}" if self.error else "")
                    + f"; last step seen {self.step}; log {self.w.log_path}\n" + _evidence_tail(tail))
        crash = ev.Crashed(job=self.job, category=category, step=self.step, exit_code=code, signal=sig,
                           evidence=evidence, suggestion=SUGGESTIONS.get(category, ""))
        now = time.time()
        p = self.cfg.restart
        record = CrashRecord(ts=utc_now(), category=category, step=self.step, exit_code=code, signal=sig)
        dec = after_crash(j.crashes + [record], now, resume_step=j.step, max_restarts=p.max_restarts,
                          window_s=p.window_s, backoff_s=p.backoff_s, backoff_max_s=p.backoff_max_s)
        nxt = follow_up(self.job, dec, j.requested or (self.stop_reason if self.stop_reason == "pause" else None), category, now)
        L.commit(self.stream, crash, nxt)  # one transaction: a crashed job is never left without its decision
        d.say(f"job {self.job} crashed ({category}, exit {code}) at step {self.step}: {SUGGESTIONS.get(category, '')}", "red")
        d.say(f"job {self.job} {type(nxt).kind()}: {getattr(nxt, 'reason', '')}",
              {"requeued": "", "paused": "yellow"}.get(type(nxt).kind(), "red"))


    # ------------------------------------------------------------------ progress bar
    def _bar_open(self) -> None:
        if self.d.quiet or not self.d.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(f"job {self.job}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeRemainingColumn(), console=self.d.console, transient=False)
        self.task = self.bar.add_task("train", total=self.cfg.iters, loss="-", tps="-")
        self.bar.start()

    def _bar_update(self, m: dict) -> None:
        if self.bar is None:
            return
        fields = {}
        if m.get("loss") is not None:
            fields = {"loss": f"{m['loss']:.4f}", "tps": f"{m['tokens_per_s']:.0f}"}
        self.bar.update(self.task, completed=m["step"], **fields)

    def _bar_close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _evidence_tail(tail: str, limit: int = 3000) -> str:
    """The end of the worker's log for this attempt, from its last traceback if it has one."""
    at = tail.rfind("Traceback (most recent call last)")
    if at >= 0 and len(tail) - at <= limit:
        return tail[at:]
    return tail[-limit:]
