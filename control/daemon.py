"""The daemon (`ftctl start`): one per workspace (flock), parent of one attempt at a time.

It recovers, records that it started, then loops: user requests from the journal, the inbox, the
queue (one job at a time: its attempt is supervised by supervise.py, whatever its number of ranks),
the consolidation schedule. It reports through a Reporter and appends every line it reports to
logs/daemon.log; it never prints.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ftctl.adapters import logs, process, system
from ftctl.adapters.model import checkpoint_estimate, model_problem
from ftctl.adapters.protocol import TrainPlan
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.config import Config, ConfigError, locked_changes
from ftctl.core.machine import ACTIVE
from ftctl.core.retention import disk_needed_gb
from ftctl.core.state import DAEMON_STREAM, JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.types import CheckpointRecord
from ftctl.recovery import reconcile

from . import consolidation, recover, supervise
from .inbox import SETTLE_S, inbox_files, skip_reason
from .notifier import Notifier
from .reporter import SILENT, Reporter
from .standby import Standby
from .submit import RESUME_ADAPTER, SubmitError, submit

POLL_S = 0.25

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("ftctl")
except Exception:  # running from a source tree without metadata
    VERSION = "dev"


def _unused(dest: Path) -> Path:
    """``dest``, or ``NAME~2.jsonl``, ``NAME~3.jsonl``… if it is taken: a file moved out of the inbox
    never replaces one moved there earlier (the user's, not ftctl's to delete)."""
    out, n = dest, 1
    while os.path.lexists(out):
        n += 1
        out = dest.with_name(f"{dest.stem}~{n}{dest.suffix}")
    return out


class DaemonError(UserError):
    """The daemon cannot start here (another one runs)."""


class LockedConfig(Exception):
    pass


class Daemon:
    def __init__(
        self,
        ws: Workspace,
        *,
        until_idle: bool = False,
        env: dict | None = None,
        report: Reporter = SILENT,
        until_job: str | None = None,
        standby: Standby | None = None,
    ):
        self.ws = ws
        self.until_idle = until_idle
        self.until_job = until_job  # `ftctl lora`: run until this job is done (or paused, failed…)
        self.env = env or {}
        self.report = report
        self.flags = supervise.StopFlags()  # why we were asked to stop; twice: kill, no checkpoint
        self.ledger: Ledger | None = None
        self.refused: set[tuple[str, int]] = set()
        # after run(): jobs it moved, -> (state, reason)
        self.ended: dict[str, tuple[str, str]] = {}
        self.skipped: set[tuple[str, float]] = set()  # inbox files already said to be skipped
        # the spare (control/standby.py): `ftctl lora` hands over the one it started first thing
        self.standby = standby or Standby(ws, self.env)
        self.standby.attach(self._spare_news)
        self.notifier: Notifier | None = None  # notify: targets (control/notifier.py)

    # ------------------------------------------------------------------ lifecycle
    def log(self, text: str) -> None:
        logs.append(self.ws.logs / "daemon.log", text)

    def say(self, text: str, level: str = "info") -> None:
        self.report.note(text, level)
        self.log(text)

    def _spare_news(self, text: str, level: str = "info") -> None:
        """The spare's routine news (started, imports done) goes to daemon.log only: it trains
        nothing, and `ftctl status` shows it; its warnings are said like the daemon's."""
        if level == "info":
            self.log(text)
        else:
            self.say(text, level)

    @property
    def stopping(self) -> str | None:
        return self.flags.why

    def stop(self, why: str) -> None:
        """Ask the daemon to stop (a signal handler calls this): the running job checkpoints first;
        asked a second time, the worker is killed."""
        if self.flags.why:
            self.flags.force = True
        self.flags.why = why

    def host(self) -> supervise.Host:
        """What a supervised attempt may use of the daemon."""
        return supervise.Host(
            ws=self.ws,
            ledger=self.ledger,
            report=self.report,
            log=self.log,
            standby=self.standby,
            stop=self.flags,
            env=self.env,
            prevent_sleep=self._prevent_sleep,
            chores=self.scan_inbox,
        )

    def acquire(self) -> int:
        self.ws.require()
        try:
            return process.acquire_lock(self.ws.lock_path)
        except process.LockHeld as e:
            ledger = Ledger(self.ws.open_journal())
            d = ledger.state.daemon
            ledger.close()
            since = f", running since {d.started_at[:19]} UTC" if d.running else ""
            raise DaemonError(
                f"another ftctl daemon is running on {self.ws.home} ({e.holder.strip()}{since}); "
                "only one may run per workspace",
                kept="nothing was changed",
                do="use `ftctl status`, or `ftctl shutdown` to stop it",
            ) from None

    def run(self) -> str:
        """Recover, run until asked to stop (or idle with until_idle); returns why it stopped."""
        lock = self.acquire()
        self.ledger = Ledger(self.ws.open_journal())
        start = self.ledger.state.seq
        try:
            self._start_notifier()  # before recovery: a stop it records for a dead daemon is sent too
            recover.recover(self.ws, self.ledger, lambda r: self.say(f"recovery: {r.what}"))
            me = process.identity(os.getpid())
            self.ledger.commit(
                DAEMON_STREAM,
                ev.DaemonStarted(process=me, host=socket.gethostname(), version=VERSION),
            )
            self.say(f"daemon started (pid {os.getpid()}) on {self.ws.home}")
            reason = "internal error"
            try:
                reason = self.loop()
            except BaseException as e:
                reason = f"internal error: {type(e).__name__}: {e}"
                raise
            finally:
                self.standby.dismiss()  # the spare never outlives the daemon
                self._stopped(reason)
                self.ended = {
                    j.job: (j.state, j.reason)
                    for j in self.ledger.state.jobs.values()
                    if j.updated_seq > start
                }
            return reason
        finally:
            if self.notifier is not None:
                self.notifier.close()  # what is due (daemon_stopped too) is sent before the lock goes
            self.ledger.close()
            process.release_lock(lock)

    def _daemon_config(self) -> Config | None:
        """ftctl.yaml as it is now, for the daemon's own settings (notify, power); None if unreadable."""
        try:
            return self.ws.load_config()[0]
        except Exception as e:  # noqa: BLE001 - a bad or missing ftctl.yaml must not stop the daemon
            key = ("daemon settings", str(e))  # said once (consolidation says its own line)
            if key not in self.refused:
                self.refused.add(key)
                self.say(
                    f"ftctl.yaml cannot be read ({e}): no notifications, power defaults", "warn"
                )
            return None

    def _start_notifier(self) -> None:
        cfg = self._daemon_config()
        if cfg is None or not cfg.notify:
            return
        self.notifier = Notifier(self.ws, cfg.notify, self.say)
        try:
            self.notifier.start()
        except Exception as e:  # noqa: BLE001 - notifications must never keep the daemon from running
            self.notifier = None
            self.say(f"notifications are off: {type(e).__name__}: {e}", "error")
            return
        self.say(
            f"notifications: {len(cfg.notify)} target(s) (read at start; restart the daemon after editing notify:)"
        )

    def _prevent_sleep(self) -> bool:
        cfg = self._daemon_config()
        return cfg is None or cfg.power.prevent_sleep

    def _stopped(self, reason: str) -> None:
        """Record the stop, even on the way out of an internal error (best effort: the error
        may be the journal's own; recovery marks a daemon that could not say it stopped)."""
        try:
            self.ledger.commit(DAEMON_STREAM, ev.DaemonStopped(pid=os.getpid(), reason=reason))
            self.say(
                f"daemon stopped: {reason}", "error" if reason.startswith("internal") else "info"
            )
        except Exception:
            pass

    # ------------------------------------------------------------------ the queue
    def loop(self) -> str:
        while True:
            self.ledger.refresh()
            if self.stopping:
                return f"stopped by {self.stopping}"
            if self.ledger.state.daemon.shutdown_requested:
                return "ftctl shutdown"
            if self.until_job is not None:
                j = self.ledger.state.jobs[self.until_job]
                if j.state not in ("queued", "crashed", *ACTIVE):
                    return f"job {j.job} {j.state}"
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
        try:
            cfg, _ = self.ws.load_config()
        except ConfigError as e:
            if ("config", str(e)) not in self.refused:  # say it once, not every poll
                self.refused.add(("config", str(e)))
                self.say(f"consolidation skipped: {e}", "warn")
            return False
        p = self.ledger.state
        for lin in list(p.lineages.values()):
            key = (lin.name, lin.version)
            if (
                lin.state != "idle"
                or lin.head_job is None
                or key in self.refused
                or consolidation.blockers(p, lin.name)
            ):
                continue
            if not (
                lin.requested
                or consolidation.due(cfg.consolidation.schedule, lin.last_consolidation_at)
            ):
                continue
            try:
                consolidation.consolidate(
                    self.ws,
                    self.ledger,
                    lin.name,
                    keep_models=cfg.consolidation.keep_models,
                    min_free_gb=cfg.min_free_disk_gb,
                    note=self.say,
                )
            except consolidation.ConsolidationRefused as e:
                self.refused.add(key)  # not again in this run unless the lineage changes
                self.say(f"consolidation of lineage {lin.name} refused: {e}", "warn")
            return True
        return False

    def _inbox_files(self) -> list[Path]:
        return [p for p in inbox_files(self.ws) if p.suffix.lower() == ".jsonl"]

    def scan_inbox(self) -> None:
        """Submit what was dropped into inbox/ (also while a job trains: supervise.py calls this)."""
        for path in inbox_files(self.ws):
            if path.suffix.lower() != ".jsonl":
                key = (path.name, path.stat().st_mtime)
                if key not in self.skipped:  # say it once per version of the file
                    self.skipped.add(key)
                    self.say(f"inbox: {path.name} skipped: {skip_reason(path)}", "warn")
                continue
            try:
                if time.time() - path.stat().st_mtime < SETTLE_S and not self.until_idle:
                    continue  # still being written
                sub = submit(self.ws, self.ledger, path, name=path.stem)
            except (SubmitError, ConfigError) as e:
                self.say(f"inbox: {path.name}: {e}", "error")
                dest = self.ws.inbox / "rejected" / path.name
            else:
                if sub.state == "queued":
                    self.say(
                        f"inbox: {path.name} queued as job {sub.job} ({sub.report.valid} examples)"
                    )
                    dest = self.ws.inbox / "accepted" / f"{sub.job}-{path.name}"
                else:
                    self.say(
                        f"inbox: {path.name} rejected as job {sub.job}: {'; '.join(sub.reasons)}",
                        "error",
                    )
                    dest = self.ws.inbox / "rejected" / path.name
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.rename(path, _unused(dest))  # the content is untouched; it only leaves the inbox

    # ------------------------------------------------------------------ one job
    def _resume_point(self, j: JobState) -> CheckpointRecord | None:
        """Newest committed checkpoint that verifies; corrupt ones are recorded and skipped."""
        for c in reversed(j.good_checkpoints()):
            bad = reconcile.verify(self.ws, j, c)
            if bad is None:
                return c
            self.say(f"{bad.what}", "warn")  # a missing one is said, not recorded: see verify
            reconcile.apply(self.ledger, [bad])
        return None

    def _warm_start(self, j: JobState) -> tuple[str | None, int, str | None]:
        """(checkpoint to warm-start from, global step base, the head job it belongs to)."""
        if j.attempt > 0:  # a restart uses exactly what the first attempt used
            return j.warm_start_from, j.global_step_base, j.parent_job
        if j.config.resume_adapter_file is not None:  # the job's own start: not the lineage's
            return None, 0, None
        lin = self.ledger.state.lineages.get(j.lineage)
        head = self.ledger.state.jobs.get(lin.head_job) if lin and lin.head_job else None
        if not j.config.warm_start or head is None or head.base_model != j.base_model:
            return None, 0, None
        changed = locked_changes(head.config, j.config)
        if changed:
            raise LockedConfig(
                f"job {j.job} would warm-start from job {head.job}'s adapter but changes what shapes it "
                f"({'; '.join(changed)}); consolidate first or submit it to a new lineage (--lineage NAME)"
            )
        # the checkpoint its adapter was published from (config `result`: the best or the last), so
        # the lineage continues from the weights it published; the global step goes on from its end
        src = head.result_checkpoint or next(
            (c.path for c in head.good_checkpoints() if c.step == head.step), None
        )
        if src is None or src not in {c.path for c in head.good_checkpoints()}:
            self.say(
                f"job {j.job}: previous job {head.job} has no verified checkpoint of its published "
                "adapter; starting fresh",
                "warn",
            )
            return None, 0, None
        return src, head.global_step, head.job

    def _preflight(self, j: JobState, cfg: Config) -> str | None:
        """Why the job cannot start now (it is paused with that reason), or None."""
        good = j.good_checkpoints()
        size = good[-1].bytes if good else checkpoint_estimate(self.ws.located(cfg))
        need, why = disk_needed_gb(cfg, size / system.GB, len(good))
        free = system.free_disk_gb(self.ws.home)
        if free < need:
            return (
                f"only {free:.2f} GB free on {self.ws.home}, need {need:.2f} GB ({why}): free space, "
                f"then `ftctl resume {j.job}`"
            )
        model = self.ws.abs(cfg.model)
        problem = model_problem(model)
        if problem:
            return (
                f"the base model cannot load: {problem}. The job and its checkpoints are kept. The job keeps the "
                f"model path it was submitted with (editing ftctl.yaml does not change it): restore that folder, "
                f"then `ftctl resume {j.job}` — or `ftctl cancel {j.job}` and submit the data again"
            )
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) / system.GB
        avail = system.available_memory_gb()
        if avail < weights * 1.2:
            return (
                f"only {avail:.2f} GB of memory available, the model needs about {weights * 1.2:.2f} GB: "
                f"close other programs, then `ftctl resume {j.job}`"
            )
        return None

    def stuck(self) -> dict[str, str]:
        """After run(): the jobs this run (its recovery included) left failed or paused, with why."""
        return {
            j: f"{state}: {reason}"
            for j, (state, reason) in self.ended.items()
            if state in ("failed", "paused")
        }

    def run_job(self, j: JobState) -> None:
        stream = job_stream(j.job)
        short = self._preflight(j, j.config)
        if short:
            self.say(f"job {j.job} paused: {short}", "warn")
            self.ledger.commit(stream, ev.Paused(job=j.job, reason=short))
            return
        reconcile.apply(self.ledger, reconcile.debris(self.ws, j))  # what a crashed attempt left
        resume = self._resume_point(j)
        j = self.ledger.state.jobs[j.job]
        try:
            warm, base, parent = self._warm_start(j)
        except LockedConfig as e:
            self.say(f"job {j.job} failed: {e}", "error")
            self.ledger.commit(stream, ev.Failed(job=j.job, reason=str(e), category="config_lock"))
            return
        jdir = self.ws.job_dir(j.job)
        valid, test = jdir / "data" / "valid.jsonl", jdir / "data" / "test.jsonl"
        resume_file = jdir / "data" / RESUME_ADAPTER
        # The journal's paths are relative to the workspace; the worker gets them absolute, against
        # where the workspace is now (a moved or copied workspace trains where it is).
        plan = TrainPlan(
            job_id=j.job,
            job_dir=str(jdir),
            config=self.ws.located(j.config),
            train_path=str(jdir / "data" / "train.jsonl"),
            valid_path=str(valid) if valid.exists() else None,
            resume_from=str(self.ws.abs(resume.path)) if resume else None,
            warm_start_from=str(self.ws.abs(warm)) if warm else None,
            global_step_base=base,
            log_path=str(self.ws.job_log(j.job)),
            test_path=str(test) if j.config.test and test.exists() else None,
            resume_adapter_file=str(resume_file) if j.config.resume_adapter_file else None,
        )
        supervise.run(self.host(), j, plan, resume, warm, base, parent)
