"""Supervising one attempt of a job: its worker process, or the ranks of a data-parallel job — a single
worker is a group of one.

* ``run`` starts it (a spawned worker or the warm standby; mlx.launch and its ranks), records
  ``training_started``, and holds the power assertion while it trains (power.prevent_sleep).
* ``Attempt.watch`` is the one loop over its channels (the worker's message pipe, the ranks'
  connections): every message is its rank's heartbeat, ``on_message`` is the one place a message
  becomes an event (the leader's checkpoints, evaluations, completion; every rank's tokens/s), and
  whatever asks for a stop with a checkpoint goes through ``Attempt.ask_stop``: the user's requests
  and the training-health alerts' (control/watch.py) in the control pass, the memory and temperature
  guards (control/guard.py) on each report. The daemon learns of a death by its channel closing
  (EOF on the pipe; the kernel closes a killed rank's socket), not by polling a PID file.
* ``Attempt.finish`` is the one death handler: the first rank to die or fail ends the attempt (the
  group is killed at once); its evidence goes to core.crash.decide, and the crash and the decision
  that follows it are committed together.

The daemon hands the supervisor a ``Host`` (its ledger, reporting, the standby, the stop flags), not
itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ftctl.adapters import blas, power, process, system
from ftctl.adapters import group as G
from ftctl.adapters import protocol as P
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.crash import Evidence, classify, decide, detail_of, where
from ftctl.core.reproduction import DETERMINISTIC
from ftctl.core.state import JobState, branch_reason, job_stream
from ftctl.events import types as ev
from ftctl.events.types import CheckpointRecord
from ftctl.recovery.reconcile import apply, mark_corrupt

from . import reproduce, retention
from .guard import Guard
from .reporter import Every, Reporter, progress_line
from .standby import Standby
from .status import describe_result
from .tensorboard import Live
from .trackers import Trackers
from .watch import Watch

POLL_S = 0.25
CONTROL_EVERY_S = 0.5
DRAIN_S = 2.0  # after the end: how long the last lines and EOFs may take to arrive


@dataclass
class StopFlags:
    """Why the daemon was asked to stop (a signal's name), and whether it was asked twice (kill now)."""

    why: str | None = None
    force: bool = False


@dataclass
class Host:
    """What a supervisor needs from the daemon that runs it, and nothing more."""

    ws: Workspace
    ledger: Ledger
    report: Reporter
    log: Callable[[str], None]  # a line for logs/daemon.log
    standby: Standby
    stop: StopFlags
    env: dict = field(default_factory=dict)  # more environment for the workers
    prevent_sleep: Callable[[], bool] = lambda: True  # power.prevent_sleep as ftctl.yaml says now
    chores: Callable[[], None] = lambda: None  # the daemon's own duties while a job trains (inbox)

    def say(self, text: str, level: str = "info") -> None:
        self.report.note(text, level)
        self.log(text)


# --------------------------------------------------------------------------- the start


@dataclass
class Launched:
    """A started attempt: its channels (process.Worker or group.Group) and what training_started says."""

    w: process.Worker | G.Group
    fingerprint: dict  # the environment it runs in (mlx, BLAS, threads, …)
    oom_before: int | None
    who: str  # "worker pid 123 (the standby)", "mlx.launch pid 123"
    ranks: dict = field(default_factory=dict)  # training_started's data-parallel fields
    how: str = ""  # more to say about it (resharded)


def run(
    host: Host,
    j: JobState,
    plan: P.TrainPlan,
    resume: CheckpointRecord | None,
    warm: str | None,
    base: int,
    parent: str | None,
) -> None:
    """Start job ``j``'s next attempt on ``plan``, record it, and supervise it to its end."""
    launch = _launch_ranks if j.config.distributed is not None else _launch_worker
    up = launch(host, j, plan, resume)
    if up is None:  # refused: what it recorded says why
        return
    resume_step, attempt = resume.step if resume else 0, j.attempt + 1
    host.ledger.commit(
        job_stream(j.job),
        ev.TrainingStarted(
            job=j.job,
            attempt=attempt,
            worker_pid=up.w.id.pid,
            worker_started_at=up.w.id.started_at,
            resume_step=resume_step,
            resume_checkpoint=resume.path if resume else None,
            warm_start_from=warm,
            parent_job=parent,
            global_step_base=base,
            base_model=j.config.model,
            env=up.fingerprint,
            env_changed=blas.fingerprint_diff(j.env, up.fingerprint) if resume else [],
            **up.ranks,
        ),
    )
    how = (
        f"resuming from step {resume_step}"
        if resume
        else ("warm start from " + warm if warm else "fresh adapter")
    )
    on = f" on {up.w.world_size} ranks ({', '.join(up.ranks['hosts'])})" if up.ranks else ""
    host.say(f"job {j.job} ({j.name}): training{on}, attempt {attempt}, {up.who}, {how}{up.how}")
    held = hold_power(host, j.job)  # no sleep while it trains, however many ranks
    try:
        Attempt(host, host.ledger.state.jobs[j.job], up.w, up.oom_before, resume_step).watch()
    finally:
        power.release(held)


def hold_power(host: Host, job: str) -> power.Held | None:
    """Keep the machine awake while ``job`` trains (None when power.prevent_sleep is off)."""
    if not host.prevent_sleep():
        return None
    h = power.hold(
        host.ws.lock_path.parent,
        f"ftctl job {job} is training",
        lost=lambda note: host.log(f"job {job}: power assertion lost: {note}"),
    )
    if not h.state.get("held"):
        host.say(f"job {job}: {h.state.get('note')}", "warn")
    return h


def _launch_worker(host: Host, j: JobState, plan: P.TrainPlan, resume) -> Launched:
    """One worker process: the warm standby if there is one on this BLAS, else a fresh one."""
    oom_before = system.oom_kill_count()
    lib = blas.choose(j.config.blas)  # the BLAS the worker runs on (probed once)
    if lib.kind == "reference" and j.config.blas != "reference":
        host.say(f"job {j.job}: the worker runs on the slow reference BLAS: {lib.why}", "warn")
    threads = _threads(j, lib)
    plan = msgspec.structs.replace(plan, blas_threads=threads)
    worker = None
    if j.config.standby:
        worker = host.standby.take(P.encode(plan), host.ws.job_log(j.job), lib.env)
    else:
        host.standby.dismiss()
    spare = worker is not None
    if worker is None:
        worker = process.spawn_worker(
            P.encode(plan),
            host.ws.job_log(j.job),
            {**lib.env, **host.env},
            label=(j.job, str(host.ws.home)),
        )
    crash_point("daemon_after_spawn", j.attempt + 1)
    # after the spawn: its device probe (a process importing MLX) runs while the worker imports
    fingerprint = blas.fingerprint(lib, threads)
    return Launched(
        worker, fingerprint, oom_before, f"worker pid {worker.id.pid}{' (the standby)' * spare}"
    )


def _threads(j: JobState, lib: blas.Choice) -> int | None:
    """The job's BLAS threads where decided (config, its earlier attempts, the environment); None: its
    worker measures them at its first load and ``worker_loaded`` records them."""
    return blas.job_threads(lib, j.config.blas_threads, j.env.get("blas_threads"))


def world_size_refusal(j: JobState, new: int) -> str | None:
    """Why the job may not resume on ``new`` ranks (its checkpoints were trained on another number and
    no `retry --reshard` allowed it), or None."""
    if j.world_size == new or j.reshard or not j.good_checkpoints():
        return None
    return (
        f"job {j.job}'s checkpoints were trained on {j.world_size} rank(s), and its config now gives {new} "
        f"(distributed.hosts / the hostfile changed). Nothing was started; the checkpoints are kept. Put the "
        f"hosts back to resume bit-exactly, or `ftctl retry {j.job} --reshard` to continue on {new} rank(s): "
        "deterministic from then on, but not bit-exact with an uninterrupted run"
    )


def _launch_ranks(host: Host, j: JobState, plan: P.TrainPlan, resume) -> Launched | None:
    """A data-parallel job: mlx.launch starts its ranks, which connect back. None (and the job paused or
    failed, saying why) when the hosts cannot run it."""
    stream, L = job_stream(j.job), host.ledger
    try:
        lay = G.layout(j.config)
    except G.GroupError as e:
        reason = f"{e}: fix the hostfile, then `ftctl resume {j.job}`"
        host.say(f"job {j.job} paused: {reason}", "warn")
        L.commit(stream, ev.Paused(job=j.job, reason=reason))
        return None
    resharded_from = None
    if resume is not None and j.world_size != lay.world_size:
        refusal = world_size_refusal(j, lay.world_size)
        if refusal:
            host.say(f"job {j.job} failed: {refusal}", "error")
            L.commit(stream, ev.Failed(job=j.job, reason=refusal, category="world_size"))
            return None
        resharded_from = j.world_size
    if j.config.batch_size % lay.world_size:
        reason = (
            f"batch_size = {j.config.batch_size} does not split over {lay.world_size} ranks; change "
            f"the hosts so it does, then `ftctl resume {j.job}`"
        )
        L.commit(stream, ev.Paused(job=j.job, reason=reason))
        return None
    plan = msgspec.structs.replace(
        plan,
        world_size=lay.world_size,
        backend=j.config.distributed.backend,
        reshard=resharded_from is not None,
        resume_manifest_sha256=resume.manifest_sha256 if resume else None,
    )
    host.standby.dismiss()  # the ranks are mlx.launch's to start, possibly on other hosts
    lib = blas.choose(j.config.blas)
    env = {**lib.env, **host.env}
    threads = _threads(j, lib)
    shared = G.blas_threads(lay, env)
    if (
        threads is None and shared
    ):  # the ranks on this machine share its cores: no oversubscribed BLAS
        env.update({"OPENBLAS_NUM_THREADS": shared, "OMP_NUM_THREADS": shared})
    if threads is None and lib.kind == "openblas":  # ranks do not measure: the share, or the pool
        threads = int(shared or lib.threads)
    plan = msgspec.structs.replace(plan, blas_threads=threads)
    fingerprint = blas.fingerprint(lib, threads)
    oom_before = system.oom_kill_count()
    g = G.launch(plan, j.config, host.ws.job_log(j.job), env, label=(j.job, str(host.ws.home)))
    return Launched(
        g,
        fingerprint,
        oom_before,
        f"mlx.launch pid {g.id.pid}",
        ranks=dict(
            world_size=lay.world_size,
            hosts=lay.hosts,
            backend=j.config.distributed.backend,
            resharded_from=resharded_from,
        ),
        how=""
        if resharded_from is None
        else f", resharded from {resharded_from} to {lay.world_size} ranks (not bit-exact with "
        "the earlier attempts)",
    )


# --------------------------------------------------------------------------- the watch


@dataclass
class Rank:
    """What the supervisor knows of one rank (of a single worker: rank 0)."""

    rank: int
    last_seen: float = field(default_factory=time.monotonic)
    step: int = 0
    done: bool = False  # sent its final message (Completed, Stopped, Finished, Failed)
    closed: bool = False
    error: P.Failed | None = None
    tokens_per_s: float | None = None
    report_step: int = 0


@dataclass(frozen=True)
class Failure:
    """The first failure of an attempt: the rank (None: none known), its host, what was seen."""

    rank: int | None
    host: str
    what: str
    at: float = field(default_factory=time.monotonic)


class Attempt:
    """One attempt of a job, 1..N ranks: messages -> events, control requests -> stop, death -> crash."""

    # w: process.Worker or group.Group
    def __init__(self, host: Host, j: JobState, w, oom_before: int | None, step: int):
        self.host, self.job, self.cfg, self.w = host, j.job, j.config, w
        self.oom_before, self.stream = oom_before, job_stream(j.job)
        self.world = w.world_size
        self.ranks: dict[int, Rank] = {}
        self.last_progress = time.monotonic()
        self.in_eval = False
        self.loading = True  # no Loaded yet (imports + model load): allowed eval_hang_s, not hang_s
        self.started = time.monotonic()
        self.first_step_at: float | None = None  # a spare may start only some time after it
        self.stop_sent: float | None = None
        self.stop_reason: str | None = None  # "pause" | "cancel" | "shutdown" | "guard"
        self.hung = False
        self.stop_forced = False  # asked to stop, it did not within stop_s: ftctl killed it
        self.error: P.Failed | None = None  # the first error any rank reported
        self.finished: str | None = None  # "completed" | "stopped" (the leader's last word)
        self.step = step  # the leader's last step; before the first one, where it resumes
        self.stopped_step = 0
        self.first: Failure | None = None
        self.candidates: list[tuple[int, Failure]] = []  # failures seen in one pass of the loop
        self.torn_down_s: float | None = None
        self.log_due = Every(j.iters)  # daemon.log gets progress at a sane rate
        self.report_due: int | None = None  # a step whose per-rank tokens/s are to be journaled
        self.tb = Live(host.ws, j, host.say)  # TensorBoard files, if configured
        self.trackers = Trackers(host.ws, j, host.say)  # report_to, if configured
        # what watches the job as it trains, and may ask for a stop with a checkpoint: the
        # training-health alerts over the journal's curves (control/watch.py, in the control pass) and
        # the memory / temperature guards over each report's readings (control/guard.py)
        self.health = Watch(host.ledger, j.job, host.say)
        self.guard = Guard(self.cfg.guards, j.job)
        host.report.training(j.job, j.name, j.iters)

    # ------------------------------------------------------------------ loop
    def watch(self) -> None:
        w, last_control = self.w, 0.0
        try:
            while not w.killed:
                for h in w.poll(POLL_S):
                    self.hear(h)
                self.settle()
                if self.first is not None:
                    self.teardown()
                    break
                if len(self.ranks) == self.world and all(r.closed for r in self.ranks.values()):
                    break  # every rank ended (with its final message, or the leader had nothing to say)
                # mlx.launch exited: its ranks' last lines and EOFs may still be unread
                if w.ended():
                    self.drain()
                    if self.first is None and not self.all_done():
                        self.fail_first(
                            None,
                            "",
                            f"mlx.launch exited (code {w.proc.returncode}) before every rank "
                            "finished: see the job log",
                        )
                    if self.first is not None:
                        self.teardown()
                    break
                now = time.monotonic()
                if now - last_control >= CONTROL_EVERY_S:
                    last_control = now
                    self.control()
                    self.standby()
                    self.host.chores()  # files dropped in inbox/ are queued now, not after the job
                self.heartbeat()
                self.watchdog(now)
            self.drain()  # what was said before a kill still counts (a checkpoint written)
        finally:
            self.host.report.training_ended(self.job)
        code = w.finish()
        self.tb.close()
        self.trackers.close()
        self.finish(code)

    def hear(self, h: P.Heard) -> None:
        # a bug or a stranger, not a reason to drop the attempt: say it, keep watching
        if h.problem:
            rank = "" if h.rank is None or self.world == 1 else f" rank {h.rank}"
            self.host.say(
                f"job {self.job}{rank}: {h.problem}", "warn" if h.rank is None else "error"
            )
            return
        r = self.ranks.setdefault(h.rank, Rank(h.rank))
        if h.connected:
            pid, where_ = self.w.who(h.rank)
            self.host.log(f"job {self.job}: rank {h.rank} connected (pid {pid} on {where_})")
        elif h.closed:
            r.closed = True
            if not r.done or r.error:
                self.candidates.append((1 if r.error else 0, self.died(r)))
        else:
            self.on_message(r, h.message)

    def died(self, r: Rank) -> Failure:
        """What a rank's channel closing without its final word (or after an error) means."""
        pid, host = self.w.who(r.rank)
        if self.world == 1:  # the exit status says it
            return Failure(None, "", "")
        if r.error:
            what = f"rank {r.rank} failed: {r.error.category}: {detail_of(r.error.message)}"
        else:
            what = f"rank {r.rank} (pid {pid} on {host}) died: its connection closed without a final message"
        return Failure(r.rank, host, what)

    def settle(self) -> None:
        """The first failure of those seen in one pass: a rank that died unannounced caused the others'
        errors (they saw their peer vanish), not the reverse."""
        if self.candidates:
            _, f = min(self.candidates, key=lambda c: (c[0], c[1].rank or 0))
            self.fail_first(f.rank, f.host, f.what)
            self.candidates = []

    def fail_first(self, rank: int | None, host: str, what: str) -> None:
        if self.first is None:
            self.first = Failure(rank, host, what)

    def all_done(self) -> bool:
        """Every rank said its final word, and none of them was an error."""
        return (
            len(self.ranks) == self.world
            and all(r.done for r in self.ranks.values())
            and not any(r.error for r in self.ranks.values())
        )

    def drain(self) -> None:
        """Read what the ranks still have to say (a checkpoint written just before a kill still
        counts), until every channel is closed, nothing more comes, or DRAIN_S passed."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            if len(self.ranks) == self.world and all(r.closed for r in self.ranks.values()):
                break
            heard = self.w.poll(max(0.0, deadline - time.monotonic()))
            if not heard:  # nothing within the time left, or nothing left to read (a killed group)
                break
            for h in heard:
                self.hear(h)
        self.settle()

    def teardown(self) -> None:
        """Kill the whole group at once: nothing of it may go on without the rank that failed."""
        self.w.kill_group()
        if self.world > 1 and self.first is not None:
            self.torn_down_s = time.monotonic() - self.first.at
            self.host.say(
                f"job {self.job}: {self.first.what}; the whole group was killed "
                f"{self.torn_down_s * 1000:.0f} ms after it was seen",
                "error",
            )

    def control(self) -> None:
        self.health.check()  # an alert may ask for a pause: it is carried out below, as the user's
        L, stop = self.host.ledger, self.host.stop
        L.refresh()
        j = L.state.jobs[self.job]
        want = None
        if j.requested in ("pause", "cancel"):
            want = j.requested
        elif stop.why or L.state.daemon.shutdown_requested:
            want = "shutdown"
        if want == "cancel" and self.stop_reason != "cancel":
            self.stop_reason = "cancel"
            self.host.say(f"job {self.job}: cancel requested, stopping the worker")
            self.w.kill_group()
        elif want == "pause" and self.stop_reason == "guard":
            # the guard's stop in flight checkpoints where a pause would: the job pauses, as asked
            self.stop_reason = "pause"
            self.host.say(f"job {self.job}: pause requested; the guard's stop checkpoints for it")
        elif want:
            self.ask_stop(want, f"{want} requested, checkpointing at the current step")
        if stop.force:
            self.w.kill_group()

    def ask_stop(self, reason: str, said: str, level: str = "info") -> None:
        """Ask the worker to stop with a checkpoint at the current step, once, for ``reason``: "pause",
        "shutdown" (the control pass: the user's request, an alert's, the daemon's stop) or "guard"
        (a guard's trip on a report). ``finish`` records what the reason calls for."""
        if self.stop_sent is not None:
            return
        self.stop_reason, self.stop_sent = reason, time.monotonic()
        self.host.say(f"job {self.job}: {said}", level)
        self.w.send(P.encode(P.Stop()))

    def standby(self) -> None:
        """Keep a spare worker (control/standby.py) once a single worker has trained for
        ``Standby.after_loads`` times as long as it took to load (its imports would slow that load, and
        the training after it, on a small machine: a short job never pays for a spare), and report the
        spare's memory. A group has none: its ranks are started by mlx.launch."""
        sb, first = self.host.standby, self.first_step_at
        if (
            self.world == 1
            and self.cfg.standby
            and first is not None
            and time.monotonic() - first >= sb.after_loads * (first - self.started)
            and self.stop_sent is None
            and not self.host.stop.why
        ):
            sb.ensure(blas.choose(self.cfg.blas).env)
        sb.report()

    def heartbeat(self) -> None:
        """The attempt's progress is its slowest rank's: a stopped rank stalls everyone at the next
        all-reduce."""
        if self.ranks and len(self.ranks) == self.world:
            self.last_progress = min(r.last_seen for r in self.ranks.values())

    def watchdog(self, now: float) -> None:
        """No progress for hang_s (eval_hang_s while loading or evaluating) is a hang: the group is
        killed. A stopped process gets hang_s even then: a stopped evaluation is not a slow one."""
        t = self.cfg.timeouts
        quiet = now - self.last_progress
        if not self.hung and quiet > t.hang_s:
            halted = self.w.stopped_ranks()
            limit = t.eval_hang_s if (self.in_eval or self.loading) and not halted else t.hang_s
            if quiet > limit:
                self.hung = True
                self.host.say(
                    f"job {self.job}: no progress for {limit:g} s: killing the worker group (hang)",
                    "error",
                )
                self.fail_first(*self.hang(halted, limit))
                self.teardown()
        if self.stop_sent is not None and now - self.stop_sent > t.stop_s:
            self.host.say(
                f"job {self.job}: worker did not stop within {t.stop_s:g} s: killing it", "error"
            )
            self.stop_forced, self.stop_sent = True, float("inf")
            self.fail_first(*self.not_stopped(self.w.stopped_ranks()))
            self.teardown()

    def _name(self, rank: int) -> str:
        pid, host = self.w.who(rank)
        return (
            f"the worker (pid {pid})" if self.world == 1 else f"rank {rank} (pid {pid} on {host})"
        )

    def hang(self, halted: list[int], limit: float) -> tuple[int | None, str, str]:
        """Who the watchdog blames: a rank stopped by a signal, else the one heard from last."""
        group = "the worker" if self.world == 1 else "the group"
        if halted:
            r = halted[0]
            return (
                r,
                self.w.who(r)[1],
                (
                    f"{self._name(r)} was stopped by a signal (SIGSTOP/SIGTSTP) and "
                    f"{'it' if self.world == 1 else 'the group'} made no progress"
                ),
            )
        slow = min(self.ranks.values(), key=lambda r: (r.last_seen, r.rank), default=None)
        if self.world == 1 or slow is None:
            return None, "", f"{group} made no progress for {limit:g} s"
        last = f"rank {slow.rank} was heard from last at step {slow.step}"
        return slow.rank, self.w.who(slow.rank)[1], f"the group made no progress; {last}"

    def not_stopped(self, halted: list[int]) -> tuple[int | None, str, str]:
        r = halted[0] if halted else None
        stopped = f" ({self._name(r)} was stopped by a signal)" if r is not None else ""
        who = "the worker" if self.world == 1 else "the group"
        return (
            r,
            self.w.who(r)[1] if r is not None else "",
            (
                f"asked to stop ({self.stop_reason}), {who} did not within timeouts.stop_s = "
                f"{self.cfg.timeouts.stop_s:g} s{stopped}, so ftctl killed it"
            ),
        )

    # ------------------------------------------------------------------ messages
    def on_message(self, r: Rank, msg: P.WorkerMessage) -> None:
        """The one place a worker message becomes an event (or a metrics row). Every rank's message is
        its heartbeat; the leader's (rank 0) are the job's events."""
        r.last_seen = time.monotonic()
        match msg:
            case P.Step(step=step):
                r.step = step
            case P.Report(local_tokens_per_s=rate, metrics=m):
                r.tokens_per_s, r.report_step = rate, m.step
            case P.Failed():
                r.error = r.error or msg
                self.error = self.error or msg
                r.done = True
            case P.Completed() | P.Stopped() | P.Finished():
                r.done = True
        if r.rank == 0:
            self.lead(msg)
            self.host.report.progress(self.job, msg)
        if isinstance(msg, P.Report) and self.report_due is not None:
            self.ranks_reported()

    def lead(self, msg: P.WorkerMessage) -> None:
        """The leader's message: the job's events."""
        L, job, host = self.host.ledger, self.job, self.host
        self.last_progress = time.monotonic()
        match msg:
            case P.Loaded(step=step):
                self.step, self.loading = step, False
                ms = {n: t for n, t in (msg.blas_ms or {}).items() if t is not None}
                L.commit(
                    self.stream,
                    ev.WorkerLoaded(
                        job=job,
                        step=step,
                        load_s=round(msg.load_s or 0.0, 3),
                        blas_threads=msg.blas_threads,
                        blas_ms=ms,
                        blas_others=msg.blas_others,
                    ),
                )
                if ms:
                    busy = (
                        ""
                        if msg.blas_others is None
                        else f"; {msg.blas_others:g} other thread(s) running"
                    )
                    host.log(
                        f"job {job}: {msg.blas_threads} BLAS thread(s), measured: "
                        + ", ".join(f"{n} -> {t:.2f} ms" for n, t in ms.items())
                        + busy
                    )
            case P.Step(step=step):
                if self.first_step_at is None:  # the new worker is up: the clock for a spare starts
                    self.first_step_at = time.monotonic()
                    self.standby()
                self.step = step
            case P.Report(metrics=m):
                L.journal.record_metric(job, m)
                self.tb.report(m)  # after the journal has it: a view of what is recorded
                self.trackers.report(m)
                trip = self.guard.report(m)
                if trip is not None:
                    self.ask_stop("guard", trip.said(), "warn")
                if self.log_due.due(m.step):
                    host.log(progress_line(job, m, self.cfg.iters))
                    if self.world > 1:
                        self.report_due = m.step
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
                self.trackers.val(gstep, step, val, pref)
                host.log(f"job {job} step {step}: val loss {_num(val, '.4f')}")
            case P.CheckpointStarted(step=step, global_step=gstep):
                L.commit(self.stream, ev.CheckpointStarted(job=job, step=step, global_step=gstep))
            case P.CheckpointWritten(checkpoint=c):
                crash_point("daemon_before_commit", c.step)
                c = msgspec.structs.replace(c, path=host.ws.rel(c.path))  # recorded relative
                L.commit(self.stream, ev.CheckpointCommitted(job=job, checkpoint=c))
                host.log(f"job {job}: checkpoint step {c.step} committed ({c.bytes / 1e6:.1f} MB)")
                self.retention()
            case P.Completed():
                self.completed(msg)
            case P.Stopped(step=step):
                self.finished, self.stopped_step = "stopped", step

    def completed(self, msg: P.Completed) -> None:
        """The leader's completion, journalled in one transaction with what decided it: early stopping's
        reason (``early_stopped``), the head or branch decision, the test split's scores."""
        # the last reports' alerts before the completion: the job's story in order (an alert after
        # `completed` read as if the finished job were still being watched)
        self.health.check(force=True, ending=True)
        L, job, host = self.host.ledger, self.job, self.host
        L.refresh()  # the head as it is now: decided, and recorded with the completion
        j = L.state.jobs[job]
        lin = L.state.lineages.get(j.lineage)
        branch = branch_reason(j, lin) if lin is not None else ""
        done = ev.Completed(
            job=job,
            step=msg.step,
            global_step=msg.global_step,
            adapter_path=host.ws.rel(msg.adapter_path),
            adapter_sha256=msg.adapter_sha256,
            checkpoint=host.ws.rel(msg.checkpoint),
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
            msgspec.structs.replace(e, data_path=host.ws.rel(e.data_path))  # recorded relative
            for e in ([msg.evaluated] if msg.evaluated else [])
        ]
        L.commit(self.stream, *early, done, *scored)
        self.finished = "completed"
        if msg.stopped_early:
            host.say(f"job {job}: {msg.stopped_early}", "ok")
        host.say(
            f"job {job} completed at step {msg.step} (global {msg.global_step}): "
            f"adapter {msg.adapter_path} sha256 {msg.adapter_sha256[:16]}…, "
            f"{describe_result(msg)}"
            + (f", also published at {msg.exported_to}" if msg.exported_to else ""),
            "ok",
        )
        if msg.export_refused:
            host.say(f"job {job}: adapter_path not written: {msg.export_refused}", "warn")
        if msg.evaluated:
            e = msg.evaluated
            host.say(
                f"job {job} test split: loss {_num(e.adapter_loss, '.4f')} (base model "
                f"{_num(e.base_loss, '.4f')}), perplexity {_num(e.adapter_ppl, '.2f')}"
            )
        if branch:
            host.say(f"job {job} is {branch}", "warn")

    def ranks_reported(self) -> None:
        """Journal every rank's tokens/s for the step whose report was due, once all have reported it."""
        step = self.report_due
        if self.finished == "completed":
            # the leader's completion can arrive (on its own connection) before another rank's last
            # report: the job is no longer active, so that report is not journalled (it would be
            # illegal in `completed`; seen once in a loaded suite run)
            self.report_due = None
            return
        if len(self.ranks) < self.world or any(r.report_step < step for r in self.ranks.values()):
            return
        self.report_due = None
        rates = [self.ranks[i].tokens_per_s for i in range(self.world)]
        self.host.ledger.commit(
            self.stream, ev.RanksReported(job=self.job, step=step, tokens_per_s=rates)
        )
        shown = ", ".join(
            f"rank {i} {'-' if t is None else format(t, '.0f')}" for i, t in enumerate(rates)
        )
        self.host.log(f"job {self.job} step {step}: tok/s per rank: {shown}")

    def retention(self) -> None:
        r = retention.checkpoints(self.host.ws, self.host.ledger.state.jobs[self.job])
        if r is not None:
            apply(self.host.ledger, [r])

    # ------------------------------------------------------------------ the end
    def finish(self, code: int | None) -> None:
        """How the attempt ended, recorded: completed (already), stopped as asked, interrupted, cancelled,
        or crashed. ``code``: the worker's exit status (None for a group's ranks: mlx.launch's children)."""
        self.health.check(force=True)  # the last reports too
        host, L, j = self.host, self.host.ledger, self.host.ledger.state.jobs[self.job]
        if self.finished == "completed":
            return
        clean = self.first is None and not self.hung and self.all_done() and code in (0, None)
        if self.finished == "stopped" and clean:
            if self.stop_reason == "guard" and j.requested == "pause":
                self.stop_reason = "pause"  # asked for after the last control pass: it wins too
            if self.stop_reason == "guard":
                event, said = self.guard.outcome(self.stopped_step)
                L.commit(self.stream, event)
                return host.say(said, "warn" if isinstance(event, ev.Paused) else "info")
            if self.stop_reason == "pause":
                L.commit(
                    self.stream,
                    ev.Paused(
                        job=self.job,
                        reason=f"paused by {j.requested_by or 'user'} at step {self.stopped_step}",
                    ),
                )
            else:
                L.commit(
                    self.stream,
                    ev.Interrupted(
                        job=self.job,
                        step=self.stopped_step,
                        reason=f"graceful stop ({host.stop.why or 'shutdown'}): checkpointed at "
                        f"step {self.stopped_step}",
                    ),
                )
            host.say(
                f"job {self.job}: stopped at step {self.stopped_step} with a checkpoint; nothing lost"
            )
            return
        if host.stop.force:  # asked to stop twice: an interrupt, not a crash, whatever the exit
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
                        f"stopped by the user ({host.stop.why}, asked twice): the worker was killed "
                        f"before it could checkpoint; it resumes from {from_step}"
                    ),
                ),
            )
            host.say(
                f"job {self.job}: stopped at once (asked twice); it resumes from {from_step}",
                "warn",
            )
            return
        # the user's act: no crash record, no red tick on the curve
        if self.stop_reason == "cancel":
            L.commit(
                self.stream,
                ev.Cancelled(
                    job=self.job,
                    reason=f"cancelled by user while training (step {self.step}); its worker was "
                    "stopped",
                ),
            )
            host.say(f"job {self.job} cancelled")
            return
        self.crashed(code)

    def evidence(self, code: int | None) -> Evidence:
        oom_after = system.oom_kill_count()
        oom = None if self.oom_before is None or oom_after is None else oom_after - self.oom_before
        first = self.first or Failure(
            None, "", "" if self.world == 1 else "the group ended without every rank finishing"
        )
        rank = first.rank if self.world > 1 else None
        err = self.ranks[rank].error if rank in self.ranks else self.error
        torn = (
            f"; group of {self.world} torn down {self.torn_down_s * 1000:.0f} ms after"
            if self.torn_down_s is not None
            else ""
        )
        what = first.what + torn
        if (
            self.guard.on_cuda
        ):  # a GPU worker died: what the driver logged (NVRM Xid lines) is evidence too
            xid = system.kernel_xids(since=self.guard.started)
            if xid:
                what += ("; " if what else "") + "kernel log: " + " | ".join(xid)
        return Evidence(
            exit_code=code,
            stderr_tail=process.tail(self.w.log_path, since=self.w.log_offset),
            reported=err.category if err else None,
            message=err.message if err else "",
            oom_kills=oom,
            hung=self.hung or self.stop_forced,
            vanished=rank is not None and err is None,
            # the last step the job reached: a group's ranks pass each step's all-reduce together,
            # so a rank's Step is the group's even when the leader's was cut off by the teardown
            step=max([self.step, *(r.step for r in self.ranks.values())]),
            loading=self.loading,
            what=what,
            rank=rank,
            host=(first.host or None) if self.world > 1 else None,
            steps_seen=", ".join(f"rank {r.rank} step {r.step}" for r in _by_rank(self.ranks))
            if self.world > 1
            else "",
            stop_reason=self.stop_reason,
            log_path=self.host.ws.rel(self.w.log_path),
            fix=(err.fix or "") if err else "",
        )

    def crashed(self, code: int | None) -> None:
        """Classify the death, record it and what follows it in one transaction."""
        host, L = self.host, self.host.ledger
        j = L.state.jobs[self.job]
        e = self.evidence(code)
        category = classify(e)
        err = self.ranks[e.rank].error if e.rank in self.ranks else self.error
        if category == "corrupt_checkpoint" and err and err.path:
            bad = host.ws.rel(err.path)
            c = next((c for c in j.good_checkpoints() if c.path == bad), None)
            if c is not None:
                apply(L, [mark_corrupt(self.job, c, err.message)])
                j = L.state.jobs[self.job]
        replayed = None
        if category in DETERMINISTIC and self.world == 1 and not host.stop.why and not j.requested:
            # a crash that can be a property of the run is replayed before any restart
            # (control/reproduce.py; one process: a group's run is not replayed)
            replayed = reproduce.after_crash(
                host.ws,
                L,
                j,
                category,
                self.step,
                detail_of(e.message),
                self.replay_cancelled,
                host.say,
            )
            j = L.state.jobs[self.job]
            if replayed is not None:
                host.say(
                    f"job {self.job}: crash {replayed.crash} {replayed.summary}",
                    "warn" if replayed.verdict == "reproduced" else "info",
                )
        d = decide(e, j, time.time(), replayed)
        # one transaction: a crashed job is never left without its decision (nor its reproduction)
        L.commit(self.stream, d.crashed, *([replayed] if replayed else []), d.follow)
        c = d.crashed
        on = f" on rank {c.rank} ({c.host})" if c.rank is not None else ""
        exit_ = f", exit {code}" if code is not None else ""
        host.say(
            f"job {self.job} crashed ({c.category}{exit_}){on} {where(c)}: {c.suggestion}", "error"
        )
        kind = type(d.follow).kind()
        host.say(
            f"job {self.job} {kind}: {getattr(d.follow, 'reason', '')}",
            {"requeued": "info", "paused": "warn"}.get(kind, "error"),
        )

    def replay_cancelled(self) -> str:
        """Why the daemon's replay of a crash must stop now ("" to go on): the daemon is stopping, or the
        user asked to pause or cancel the job or to shut down — the daemon stays responsive meanwhile."""
        L = self.host.ledger
        if self.host.stop.why:
            return "the daemon is stopping"
        L.refresh()
        if L.state.daemon.shutdown_requested:
            return "`ftctl shutdown` was requested"
        want = L.state.jobs[self.job].requested
        return f"{want} of job {self.job} was requested" if want else ""


def _by_rank(ranks: dict[int, Rank]) -> list[Rank]:
    return [ranks[k] for k in sorted(ranks)]


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)
