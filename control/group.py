"""Supervising a data-parallel job: mlx.launch and its ranks, watched like one worker.

Every rank reports over its own connection (adapters/group.py): the leader's messages become events
exactly as a single worker's do (supervise.py); every rank's messages are its heartbeat, its tokens/s
and its errors. The first rank to die (its connection closes without a final message) or to fail
(a Failed message) ends the attempt: the whole group is killed at once (its process group, then every
connection), and the crash is recorded with that rank, its host, the category and the evidence,
followed by the restart policy's decision, as for one worker. A group that makes no progress (a rank
stopped, a cable pulled) is killed by the same watchdog; a local rank stopped by a signal is named.

The warm spare (standby.py) is not used: the ranks are started by mlx.launch, possibly on other hosts.
"""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING

import msgspec

from ftctl.adapters import group as G
from ftctl.adapters import process, system
from ftctl.adapters import protocol as P
from ftctl.core.policy import Evidence, after_crash, classify, follow_up, suggestion
from ftctl.core.state import CrashRecord, JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.journal import utc_now
from ftctl.recovery.reconcile import apply, mark_corrupt

from .supervise import CONTROL_EVERY_S, POLL_S, Supervision, _evidence_tail, _first_line

if TYPE_CHECKING:
    from ftctl.events.types import CheckpointRecord

    from .daemon import Daemon

FINAL = (P.Completed, P.Stopped, P.Finished)


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


def run(
    d: "Daemon",
    j: JobState,
    plan: P.TrainPlan,
    resume: "CheckpointRecord | None",
    warm,
    base: int,
    parent,
) -> None:
    """Launch the job's ranks and supervise them (daemon.run_job's distributed branch)."""
    stream = job_stream(j.job)
    try:
        lay = G.layout(j.config)
    except G.GroupError as e:
        reason = f"{e}: fix the hostfile, then `ftctl resume {j.job}`"
        d.say(f"job {j.job} paused: {reason}", "warn")
        d.ledger.commit(stream, ev.Paused(job=j.job, reason=reason))
        return
    resharded_from = None
    if resume is not None and j.world_size != lay.world_size:
        refusal = world_size_refusal(j, lay.world_size)
        if refusal:
            d.say(f"job {j.job} failed: {refusal}", "error")
            d.ledger.commit(stream, ev.Failed(job=j.job, reason=refusal, category="world_size"))
            return
        resharded_from = j.world_size
    if j.config.batch_size % lay.world_size:
        reason = (
            f"batch_size = {j.config.batch_size} does not split over {lay.world_size} ranks; change the hosts "
            f"so it does, then `ftctl resume {j.job}`"
        )
        d.ledger.commit(stream, ev.Paused(job=j.job, reason=reason))
        return
    plan = msgspec.structs.replace(
        plan,
        world_size=lay.world_size,
        backend=j.config.distributed.backend,
        reshard=resharded_from is not None,
        resume_manifest_sha256=resume.manifest_sha256 if resume else None,
    )
    d.standby.dismiss()
    from ftctl.adapters import blas

    lib, fingerprint = blas.for_worker(j.config.blas)
    env = {**lib.env, **d.env}
    threads = G.blas_threads(lay, fingerprint.get("blas_threads"), env)
    if threads:  # the ranks on this machine share its cores: no oversubscribed BLAS
        env.update({"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads})
        fingerprint = {**fingerprint, "blas_threads": threads}
    oom_before = system.oom_kill_count()
    g = G.launch(plan, j.config, d.ws.job_log(j.job), env, label=(j.job, str(d.ws.home)))
    resume_step, attempt = resume.step if resume else 0, j.attempt + 1
    d.ledger.commit(
        stream,
        ev.TrainingStarted(
            job=j.job,
            attempt=attempt,
            worker_pid=g.id.pid,
            worker_started_at=g.id.started_at,
            resume_step=resume_step,
            resume_checkpoint=resume.path if resume else None,
            warm_start_from=warm,
            parent_job=parent,
            global_step_base=base,
            base_model=j.config.model,
            env=fingerprint,
            env_changed=blas.fingerprint_diff(j.env, fingerprint) if resume else [],
            world_size=lay.world_size,
            hosts=lay.hosts,
            backend=j.config.distributed.backend,
            resharded_from=resharded_from,
        ),
    )
    how = (
        f"resuming from step {resume_step}"
        if resume
        else ("warm start from " + warm if warm else "fresh adapter")
    )
    if resharded_from is not None:
        how += f", resharded from {resharded_from} to {lay.world_size} ranks (not bit-exact with the earlier attempts)"
    d.say(
        f"job {j.job} ({j.name}): training on {lay.world_size} ranks ({', '.join(lay.hosts)}), attempt {attempt}, "
        f"mlx.launch pid {g.id.pid}, {how}"
    )
    GroupSupervision(d, j, g, oom_before, resume_step).watch()


class GroupSupervision(Supervision):
    def __init__(self, d: "Daemon", j: JobState, g: G.Group, oom_before: int | None, step: int):
        super().__init__(d, j, g, oom_before, step)
        self.g = g
        self.first: tuple[int, str, str] | None = None  # (rank, host, what) of the first failure
        self.first_at: float | None = None
        self.torn_down_s: float | None = None
        self.pending_buf: dict = {}
        self.rank_error: dict[int, P.Failed] = {}
        self.report_due: int | None = None  # a step whose per-rank tokens/s are to be journaled
        self.candidates: list = []  # (priority, rank, host, what): failures seen in one pass of the loop

    # ------------------------------------------------------------------ loop
    def watch(self) -> None:
        g = self.g
        last_control = 0.0
        try:
            while not g_killed(self):
                socks = [
                    g.listener,
                    *g.pending,
                    *(r.sock for r in g.ranks.values() if not r.closed),
                ]
                try:
                    ready, _, _ = select.select(socks, [], [], POLL_S)
                except (OSError, ValueError):
                    break  # a socket closed under us: the group was torn down
                for s in ready:
                    if s is g.listener:
                        G.accept(g)
                    elif s in g.pending:
                        self.read_pending(s)
                    else:
                        self.read_rank(next(r for r in g.ranks.values() if r.sock is s))
                if (
                    self.candidates
                ):  # a rank that died unannounced caused the others' errors, not the reverse
                    self.fail_first(*min(self.candidates, key=lambda c: (c[0], c[1]))[1:])
                    self.candidates = []
                if self.first is not None:
                    self.teardown()
                    break
                if len(g.ranks) == g.layout.world_size and all(r.closed for r in g.ranks.values()):
                    break  # every rank ended with its final message
                if g.proc.poll() is not None and self.first is None:
                    self.drain()  # the ranks' last lines and EOFs may still be unread
                    if (
                        len(g.ranks) == g.layout.world_size
                        and all(r.closed and r.done for r in g.ranks.values())
                        and not self.rank_error
                    ):
                        break
                    if self.first is None:
                        self.fail_first(
                            None,
                            "",
                            f"mlx.launch exited (code {g.proc.returncode}) before every rank "
                            "finished: see the job log",
                        )
                    self.teardown()
                    break
                now = time.monotonic()
                if now - last_control >= CONTROL_EVERY_S:
                    last_control = now
                    self.control()
                    self.d.standby.report()
                    self.d.scan_inbox()
                self.heartbeat()
                self.watchdog(now)
        finally:
            self.d.report.training_ended(self.job)
        try:
            code = g.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a launcher that outlives its ranks is killed below
            code = None
        g.close()  # nothing of the group may outlive it
        if code is None:
            code = g.proc.wait()
        clean = (
            self.first is None
            and not self.hung
            and len(g.ranks) == g.layout.world_size
            and all(r.done for r in g.ranks.values())
        )
        self.finish(0 if clean else (code if code not in (0, None) else 1))

    def drain(self, limit_s: float = 2.0) -> None:
        """Read what the ranks still have to say, until each connection is closed or ``limit_s`` passes."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            open_ = [r for r in self.g.ranks.values() if not r.closed]
            if not open_:
                break
            ready, _, _ = select.select(
                [r.sock for r in open_], [], [], max(0.0, deadline - time.monotonic())
            )
            for s in ready:
                self.read_rank(next(r for r in open_ if r.sock is s))
        if self.candidates:
            self.fail_first(*min(self.candidates, key=lambda c: (c[0], c[1]))[1:])
            self.candidates = []

    def read_pending(self, s) -> None:
        try:
            chunk = s.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf = self.pending_buf.get(s, b"") + chunk
        if not chunk or b"\n" in buf:
            self.g.pending.remove(s)
            self.pending_buf.pop(s, None)
            line, _, rest = buf.partition(b"\n")
            got = G.hello(self.g, s, line) if chunk else "closed before saying which rank it is"
            if isinstance(got, str):
                self.d.say(f"job {self.job}: refused a connection: {got}", "warn")
                s.close()
                return
            got.buf = rest
            self.d.log(f"job {self.job}: rank {got.rank} connected (pid {got.pid} on {got.host})")
            self.lines(got)
        else:
            self.pending_buf[s] = buf

    def read_rank(self, r: G.Rank) -> None:
        try:
            chunk = r.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            r.closed = True
            if not r.done or r.rank in self.rank_error:
                err = self.rank_error.get(r.rank)
                self.candidates.append(
                    (
                        1 if err else 0,
                        r.rank,
                        r.host,
                        f"rank {r.rank} failed: {err.category}: {_first_line(err.message)}"
                        if err
                        else f"rank {r.rank} (pid {r.pid} on "
                        f"{r.host}) died: its connection closed without a final message",
                    )
                )
            return
        r.buf += chunk
        self.lines(r)

    def lines(self, r: G.Rank) -> None:
        *lines, r.buf = r.buf.split(b"\n")
        for line in filter(bytes.strip, lines):
            try:
                msg = P.decode_message(line)
            except P.ProtocolError as e:
                self.d.say(f"job {self.job} rank {r.rank}: {e}", "error")
                continue
            r.last_seen = time.monotonic()
            match msg:
                case P.Step(step=step):
                    r.step = step
                case P.Report(local_tokens_per_s=rate, metrics=m):
                    r.tokens_per_s, r.report_step = rate, m.step
                case P.Failed():
                    self.rank_error.setdefault(r.rank, msg)
                    if self.error is None:
                        self.error = msg
                    r.done = True
                case P.Completed() | P.Stopped() | P.Finished():
                    r.done = True
            if r.rank == 0 and not isinstance(msg, P.Failed):
                self.on_message(msg)
                if isinstance(msg, P.Report) and self.log_due.last_step == msg.metrics.step:
                    self.report_due = msg.metrics.step
            if isinstance(msg, P.Report) and self.report_due is not None:
                self.ranks_reported()

    def ranks_reported(self) -> None:
        """Journal the tokens/s of every rank for the step whose report was due, once all have reported it."""
        ranks, step = self.g.ranks, self.report_due
        if self.finished == "completed":
            # the leader's completion can arrive (on its own connection) before another rank's last
            # report: the job is no longer active, so that report is not journalled (it would be
            # illegal in `completed`; seen once in a loaded suite run)
            self.report_due = None
            return
        if len(ranks) < self.g.layout.world_size or any(
            r.report_step < step for r in ranks.values()
        ):
            return
        self.report_due = None
        rates = [ranks[i].tokens_per_s for i in range(self.g.layout.world_size)]
        self.d.ledger.commit(
            self.stream, ev.RanksReported(job=self.job, step=step, tokens_per_s=rates)
        )
        shown = ", ".join(
            f"rank {i} {'-' if t is None else format(t, '.0f')}" for i, t in enumerate(rates)
        )
        self.d.log(f"job {self.job} step {step}: tok/s per rank: {shown}")

    def heartbeat(self) -> None:
        """The group's progress is its slowest rank's: a stopped rank stalls everyone at the next all-reduce."""
        ranks = self.g.ranks.values()
        if len(ranks) == self.g.layout.world_size:
            self.last_progress = min(r.last_seen for r in ranks)

    def fail_first(self, rank: int | None, host: str, what: str) -> None:
        if self.first is None:
            self.first, self.first_at = (rank, host, what), time.monotonic()

    def teardown(self) -> None:
        self.g.kill_group()
        if self.first_at is not None:
            self.torn_down_s = time.monotonic() - self.first_at
        rank, host, what = self.first
        self.d.say(
            f"job {self.job}: {what}; the whole group was killed "
            f"{self.torn_down_s * 1000:.0f} ms after it was seen",
            "error",
        )

    def stopped(self) -> list[int]:
        """Local ranks stopped by a signal: a stopped rank stalls everyone at the next all-reduce."""
        return G.stopped_ranks(self.g)

    def watchdog(self, now: float) -> None:
        was = self.hung
        t0 = time.monotonic()
        super().watchdog(now)
        if self.hung and not was:
            if self.halted:  # found before the group was killed
                r = self.g.ranks[self.halted[0]]
                self.fail_first(
                    r.rank,
                    r.host,
                    f"rank {r.rank} (pid {r.pid} on {r.host}) was stopped by a signal "
                    "and the group made no progress",
                )
            else:
                slow = (
                    min(self.g.ranks.values(), key=lambda r: (r.last_seen, r.rank))
                    if self.g.ranks
                    else None
                )
                self.fail_first(
                    slow.rank if slow else None,
                    slow.host if slow else "",
                    "the group made no progress"
                    + (
                        f"; rank {slow.rank} was heard from last at step {slow.step}"
                        if slow
                        else ""
                    ),
                )
            self.first_at = t0
            self.teardown()

    def standby(self) -> None:
        self.d.standby.report()

    # ------------------------------------------------------------------ the end
    def crashed(self, j: JobState, code: int) -> None:
        d, L = self.d, self.d.ledger
        oom_after = system.oom_kill_count()
        oom = None if self.oom_before is None or oom_after is None else oom_after - self.oom_before
        tail = process.tail(self.g.log_path, since=self.g.log_offset)
        if self.stop_forced and self.first is None:
            halted = f" (rank {self.halted[0]} was stopped by a signal)" if self.halted else ""
            r = self.g.ranks.get(self.halted[0]) if self.halted else None
            self.first = (
                r.rank if r else None,
                r.host if r else "",
                f"asked to stop ({self.stop_reason}), the group "
                f"did not within timeouts.stop_s = {self.cfg.timeouts.stop_s:g} s{halted}, so ftctl killed it",
            )
        rank, host, what = self.first or (None, "", "the group ended without every rank finishing")
        err = self.rank_error.get(rank) if rank is not None else self.error
        if self.hung or self.stop_forced:
            category = "hang"
        elif err is not None:
            category = err.category
        elif (oom or 0) > 0:
            category = "oom"
        elif rank is not None:
            category = "killed"  # its connection closed unannounced: a signal (the exit status is mlx.launch's)
        else:
            category = classify(Evidence(exit_code=code, stderr_tail=tail, oom_kills=oom))
        world = self.g.layout.world_size
        torn = (
            f"; group of {world} torn down {self.torn_down_s * 1000:.0f} ms after"
            if self.torn_down_s is not None
            else ""
        )
        seen = ", ".join(
            f"rank {r.rank} step {r.step}"
            for r in sorted(self.g.ranks.values(), key=lambda r: r.rank)
        )
        evidence = (
            f"{what}{torn}; last steps seen: {seen or 'no rank connected'}"
            + (f"; rank said: {err.message}" if err else "")
            + f"; log {self.d.ws.rel(self.g.log_path)}\n"
            + _evidence_tail(tail)
        )
        detail = _first_line(err.message) if err else ""
        fix = (
            (err.fix or "") if err else ""
        )  # the recorded config is the cause: `retry --set` fixes it
        good = j.good_checkpoints()
        advice = suggestion(category, good[-1].step if good else None, fix).replace("JOB", self.job)
        if detail and category in ("exception", "load_error"):
            advice = f"{detail} — {advice}"
        if category == "corrupt_checkpoint" and err is not None and err.path:
            c = next((c for c in j.good_checkpoints() if c.path == self.d.ws.rel(err.path)), None)
            if c is not None:
                apply(L, [mark_corrupt(self.job, c, err.message)])
                j = L.state.jobs[self.job]
                good = j.good_checkpoints()
                advice = suggestion(category, good[-1].step if good else None).replace(
                    "JOB", self.job
                )
        step = self.g.ranks[0].step if 0 in self.g.ranks and self.g.ranks[0].step else self.step
        crash = ev.Crashed(
            job=self.job,
            category=category,
            step=step,
            exit_code=None,
            evidence=evidence,
            suggestion=advice,
            rank=rank,
            host=host or None,
            fix=fix,
        )
        now = time.time()
        record = CrashRecord(
            ts=utc_now(), category=category, step=step, rank=rank, host=host or None
        )
        dec = after_crash(
            j.crashes[j.budget_from :] + [record],
            now,
            resume_step=j.step,
            policy=self.cfg.restart,
            detail=detail,
            fix=fix,
        )
        nxt = follow_up(
            self.job,
            dec,
            j.requested or (self.stop_reason if self.stop_reason == "pause" else None),
            category,
            now,
        )
        L.commit(self.stream, crash, nxt)
        where = f" on rank {rank} ({host})" if rank is not None else ""
        d.say(f"job {self.job} crashed ({category}){where} at step {step}: {advice}", "error")
        d.say(
            f"job {self.job} {type(nxt).kind()}: {getattr(nxt, 'reason', '')}",
            {"requeued": "info", "paused": "warn"}.get(type(nxt).kind(), "error"),
        )


def g_killed(s: GroupSupervision) -> bool:
    return s.g.killed
