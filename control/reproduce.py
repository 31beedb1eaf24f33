"""`ftctl reproduce`: re-run a crash deterministically and point at the data that caused it.

Training is a pure function of the checkpoint and the step (batches, RNG, optimizer state: see
adapters/trainer.py), so the crash is re-executed with the very training loop the daemon runs, in a
worker subprocess (an abort, a segfault or a hang of the replay is observed, never fatal here), from
the last committed, verified checkpoint before the crash up to the crash step:
  - on a scratch copy: run/reproduce-<job>-<pid>/ holds copies of the checkpoint and of the job's data
    (sha256 checked against the job's record) and whatever the replay writes; it is removed at the end.
    Nothing of the job's (checkpoints, adapters, state, log) is written;
  - under the BLAS and environment the daemon would choose, compared with the crashed attempt's
    fingerprint (a mismatch is stated: bit-exactness holds only within one fingerprint);
  - traced: per step the loss, gradient norm, lr, tokens and batch (--trace writes them as JSON lines).
The verdict (core/reproduction.py) and the failing batch (example indices, their lines in the job's
data, token lengths, first characters) go into one ``crash_reproduced`` event: the only thing recorded.
The daemon calls ``after_crash`` for the crashes that can be properties of the run (core/crash.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from ftctl.adapters import blas, process, system
from ftctl.adapters import checkpoint as ck
from ftctl.adapters import protocol as P
from ftctl.adapters.fs import write_durable
from ftctl.adapters.model import model_problem
from ftctl.adapters.workspace import SCRATCH_MARKER, Workspace
from ftctl.control.ledger import Ledger
from ftctl.core.config import features
from ftctl.core.crash import Evidence, classify
from ftctl.core.dataset import record_lines, validate_jsonl
from ftctl.core.reproduction import (
    NONFINITE,
    Outcome,
    Step,
    Verdict,
    describe_groups,
    first_line,
    judge,
)
from ftctl.core.state import JobState, job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.types import CheckpointRecord, ExampleRef

from .jobs import find_job
from .reporter import Note, quiet
from .submit import held_lines

HEAD = 120  # first characters of each example shown


class ReproduceRefused(UserError):
    """The reproduction cannot be run as asked; nothing was run or recorded."""


class Interrupted(Exception):
    """The caller asked to stop (the daemon shutting down, a pause or cancel of the job): the replay worker
    was killed, nothing recorded."""


@dataclass
class Crash:
    """The crash to reproduce, as the journal recorded it."""

    number: int  # 1 = the job's first crash
    category: str
    step: int  # the last step the crashed worker completed
    message: str  # what it said, first line ("" if not recorded)
    attempt: ev.TrainingStarted | None  # the attempt that crashed


@dataclass
class Result:
    job: str
    crash: Crash | None
    target: int  # the last step the replay would run
    from_step: int
    checkpoint: str | None  # the job's checkpoint it replayed from (None: from the start)
    warm_start: str | None  # from the start of a warm-started job: the parent adapter's checkpoint
    outcome: Outcome
    verdict: Verdict | None  # None for --step (no crash to compare with)
    summary: str
    examples: list[ExampleRef]
    trace: list[P.Traced]
    env: dict[str, str]
    env_changed: list[str]
    bit_exact: list[int]
    mismatch: list[int]
    notes: list[str] = field(default_factory=list)
    data_path: str = ""  # the job's copy of its training data: the lines of ``examples``
    source_path: str | None = None  # the submitted file, when ``examples`` name its lines too
    seconds: float = 0.0
    event: ev.CrashReproduced | None = None
    seq: int | None = None  # the recorded event's seq
    log_tail: str = ""


# --------------------------------------------------------------------------- entry points


def reproduce(
    ws: Workspace,
    ledger: Ledger,
    job: str,
    *,
    crash: int | None = None,
    step: int | None = None,
    until_crash: bool = False,
    trace_path: Path | None = None,
    note: Note = quiet,
) -> Result:
    """`ftctl reproduce`: replay crash number ``crash`` (default: the job's last) or, with ``step``, the
    run up to that step; record the verdict of a crash as ``crash_reproduced``."""
    j = find_job(ledger, job)
    if j.config is None:
        raise ReproduceRefused(
            f"job {j.job} was rejected at submission: it never trained, nothing to reproduce"
        )
    events = list(ledger.journal.read(stream=job_stream(j.job)))
    crashes = _crashes(events)
    target_crash = None
    if step is not None:
        if not 1 <= step <= j.iters:
            raise ReproduceRefused(
                f"--step {step} is outside job {j.job}'s {j.iters} iterations (1..{j.iters})"
            )
        target = step
    else:
        if not crashes:
            raise ReproduceRefused(
                f"job {j.job} has no recorded crash: nothing to reproduce (`ftctl crashes` lists "
                f"them). `ftctl reproduce {j.job} --step S` replays its training up to step S"
            )
        n = len(crashes) if crash is None else crash
        if not 1 <= n <= len(crashes):
            raise ReproduceRefused(
                f"job {j.job} has {len(crashes)} crash(es): --crash takes 1..{len(crashes)} "
                "(the # column of `ftctl crashes`)"
            )
        target_crash = crashes[n - 1]
        if target_crash.step is None:
            raise ReproduceRefused(
                f"crash {n} of job {j.job} recorded no step: pass --step S to replay up to a step"
            )
        target = j.iters if until_crash else min(target_crash.step + 1, j.iters)
    r = replay(ws, j, events, target_crash, target, note=note, until_crash=until_crash)
    if trace_path is not None:
        write_trace(trace_path, r.trace)
    if r.event is not None:
        rec = ledger.commit(job_stream(j.job), r.event)
        r.seq = rec[-1].seq
    return r


def after_crash(
    ws: Workspace,
    ledger: Ledger,
    j: JobState,
    category: str,
    step: int,
    message: str,
    cancelled: Callable[[], str],
    note: Note = quiet,
) -> ev.CrashReproduced | None:
    """The daemon's reproduction of the crash it is about to record (it will be the job's crash number
    len(j.crashes) + 1, committed together with the returned event). None when it could not be run (it says
    why): the restart policy then decides as it would without one."""
    events = list(ledger.journal.read(stream=job_stream(j.job)))
    started = [r.event for r in events if isinstance(r.event, ev.TrainingStarted)]
    crash = Crash(
        len(j.crashes) + 1, category, step, first_line(message), started[-1] if started else None
    )
    try:
        r = replay(
            ws,
            j,
            events,
            crash,
            min(step + 1, j.iters),
            note=note,
            cancelled=cancelled,
            by="daemon",
        )
    except Interrupted as e:
        note(
            f"job {j.job}: the replay of the crash was stopped ({e}); it decides without a verdict",
            "info",
        )
        return None
    except Exception as e:  # noqa: BLE001 - never a reason to lose the crash itself: say it, decide without it
        note(
            f"job {j.job}: the crash could not be replayed ({type(e).__name__}: {e}); the restart policy decides "
            "without a verdict",
            "warn",
        )
        return None
    return r.event


# --------------------------------------------------------------------------- the replay


def replay(
    ws: Workspace,
    j: JobState,
    events: list[ev.Recorded],
    crash: Crash | None,
    target: int,
    *,
    note: Note = quiet,
    cancelled: Callable[[], str] = lambda: "",
    until_crash: bool = False,
    by: str = "user",
) -> Result:
    """Re-run job ``j`` up to step ``target`` on a scratch copy and judge it against ``crash``."""
    cfg = ws.located(j.config)  # the model where the workspace is now
    problem = model_problem(cfg.model)
    if problem:
        raise ReproduceRefused(
            f"the job's base model cannot load: {problem}. Nothing was run or recorded"
        )
    attempt = crash.attempt if crash else _last_attempt(events)
    # replay at least one step: from a checkpoint before this
    limit = crash.step + 1 if crash else target
    _sweep(ws)
    scratch = ws.reproduce_scratch(j.job, os.getpid())
    if scratch.exists():
        shutil.rmtree(scratch)
    t0 = time.monotonic()
    scratch.mkdir(parents=True, mode=0o700)
    try:
        write_durable(
            scratch / SCRATCH_MARKER, b"made by `ftctl reproduce`: removed when it ends\n"
        )
        notes: list[str] = []
        data = _copy_data(ws, j, scratch, notes)
        start = _checkpoint(
            ws,
            j,
            events,
            limit,
            scratch / "job",
            notes,
            "the crash step" if crash else f"step {target}",
        )
        warm = None
        if start is None:
            warm = attempt.warm_start_from if attempt else j.warm_start_from
            if warm:
                try:
                    ck.verify_checkpoint(ws.abs(warm))
                except ck.CheckpointCorrupt as e:
                    raise ReproduceRefused(
                        f"no checkpoint of job {j.job} before step {limit} is left, and the adapter it "
                        f"warm-started from is unusable ({e.reason}): the start of the job cannot be "
                        "rebuilt. Nothing was run or recorded"
                    ) from None
        from_step = start.step if start else 0
        lib = blas.choose(cfg.blas)
        # the crashed attempt's thread count (the bits depend on it), else the job's as it would be now
        threads = blas.job_threads(
            lib, cfg.blas_threads, (attempt.env if attempt else j.env).get("blas_threads")
        )
        fingerprint = blas.fingerprint(lib, threads)
        env_changed = (
            blas.fingerprint_diff(attempt.env, fingerprint) if attempt and attempt.env else []
        )
        if crash and not (attempt and attempt.env):
            notes.append(
                "the crashed attempt recorded no environment fingerprint: the environments were not compared"
            )
        base = attempt.global_step_base if attempt else j.global_step_base
        plan = P.TrainPlan(
            job_id=j.job,
            job_dir=str(scratch / "job"),
            config=cfg,
            train_path=str(data["train.jsonl"]),
            valid_path=str(data["valid.jsonl"]) if "valid.jsonl" in data else None,
            resume_from=str(scratch / "job" / "checkpoints" / Path(start.path).name)
            if start
            else None,
            warm_start_from=str(ws.abs(warm)) if warm else None,
            global_step_base=base,
            until_step=target,
            trace=True,
            blas_threads=threads,
        )
        what = (
            f"crash {crash.number} ({crash.category} after step {crash.step})"
            if crash
            else f"the run up to step {target}"
        )
        note(
            f"job {j.job}: replaying {what} from "
            f"{'checkpoint step ' + str(from_step) if start else 'the start of the job'}"
            f"{' (warm start from ' + warm + ')' if warm else ''} to step {target}, in {scratch}"
        )
        run = _run_worker(ws, j, plan, scratch / "replay.log", lib.env, cancelled, until_crash)
        trace, outcome, written, log_tail = run
        verdict = (
            judge(crash.category, crash.step, crash.message, outcome, [_step(t) for t in trace])
            if crash
            else None
        )
        failing = (
            verdict.failing_step if verdict else (outcome.step + 1 if outcome.category else None)
        )
        examples = _examples(ws, j, data["train.jsonl"], trace, failing)
        exact, mismatch = _compare(ws, j, written)
        result = Result(
            job=j.job,
            crash=crash,
            target=target,
            from_step=from_step,
            checkpoint=start.path if start else None,
            warm_start=warm,
            outcome=outcome,
            verdict=verdict,
            summary="",
            examples=examples,
            trace=trace,
            env=fingerprint,
            env_changed=env_changed,
            bit_exact=exact,
            mismatch=mismatch,
            notes=notes,
            seconds=time.monotonic() - t0,
            log_tail=log_tail,
            data_path=str(ws.job_dir(j.job) / "data" / "train.jsonl"),
            source_path=str(ws.abs(j.data_path))
            if examples and examples[0].source_line is not None
            else None,
        )
        result.summary = summarize(result)
        if crash is not None:
            result.event = ev.CrashReproduced(
                job=j.job,
                crash=crash.number,
                crash_category=crash.category,
                crash_step=crash.step,
                verdict=verdict.verdict,
                summary=result.summary,
                from_step=from_step,
                target_step=target,
                category=outcome.category,
                step=outcome.step,
                message=outcome.message,
                first_nonfinite_step=verdict.first_nonfinite_step,
                first_nonfinite=verdict.first_nonfinite,
                groups=verdict.groups,
                group_count=verdict.group_count,
                failing_step=verdict.failing_step,
                examples=examples,
                env_changed=env_changed,
                bit_exact=exact,
                mismatch=mismatch,
                notes=notes,
                by=by,
            )
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_worker(
    ws: Workspace,
    j: JobState,
    plan: P.TrainPlan,
    log: Path,
    env: dict,
    cancelled,
    until_crash: bool,
):
    """Spawn the worker on ``plan`` and watch it to the end: (trace, outcome, checkpoints it wrote, log tail).
    The worker never outlives this call: its group is killed on the way out, whatever the way."""
    t = j.config.timeouts
    oom_before = system.oom_kill_count()
    trace: list[P.Traced] = []
    written: list[CheckpointRecord] = []
    failed: P.Failed | None = None
    done = hung = False
    last_step, w = 0, None
    try:
        w = process.spawn_worker(P.encode(plan), log, env, label=(j.job, str(ws.home)))
        seen, waiting = time.monotonic(), True  # loading (or evaluating): eval_hang_s, else hang_s
        while True:
            heard = w.poll(0.25)
            for msg in (h.message for h in heard if h.message is not None):
                seen = time.monotonic()
                match msg:
                    case P.Loaded(step=step) | P.Step(step=step):
                        last_step, waiting = step, False
                    case P.Traced():
                        trace.append(msg)
                    case P.EvalStarted():
                        waiting = True
                    case P.Evaluated():
                        waiting = False
                    case P.CheckpointWritten(checkpoint=c):
                        written.append(c)
                    case P.Failed():
                        failed = msg
                    case P.Stopped() | P.Completed():
                        done = True
            if any(h.closed for h in heard):
                break  # the worker exited
            if why := cancelled():  # why it must stop now ("" to go on)
                w.kill_group()
                raise Interrupted(why)
            if not hung and time.monotonic() - seen > (t.eval_hang_s if waiting else t.hang_s):
                hung = True
                w.kill_group()
        code = w.proc.wait()
    finally:
        if w is not None:
            w.dismiss()
    tail = process.tail(log, limit=3000)
    if done and code == 0:
        return trace, Outcome(category=None, step=last_step), written, tail
    oom_after = system.oom_kill_count()
    oom = None if oom_before is None or oom_after is None else oom_after - oom_before
    category = classify(
        Evidence(
            exit_code=code,
            stderr_tail=tail,
            reported=failed.category if failed else None,
            oom_kills=oom,
            hung=hung,
        )
    )
    return (
        trace,
        Outcome(
            category=category,
            step=last_step,
            message=first_line(failed.message) if failed else f"exit code {code}",
        ),
        written,
        tail,
    )


# --------------------------------------------------------------------------- pieces


def _attempts(events: list[ev.Recorded]):
    """Each event with the attempt it belongs to: its ``training_started``, whose fingerprint carries the
    BLAS threads its ``worker_loaded`` recorded once the worker had measured them."""
    attempt = None
    for r in events:
        e = r.event
        if isinstance(e, ev.TrainingStarted):
            attempt = e
        elif isinstance(e, ev.WorkerLoaded) and attempt is not None and e.blas_threads is not None:
            env = {**attempt.env, "blas_threads": str(e.blas_threads)}
            attempt = msgspec.structs.replace(attempt, env=env)
        yield e, attempt


def _crashes(events: list[ev.Recorded]) -> list[Crash]:
    out = []
    for e, attempt in _attempts(events):
        if isinstance(e, ev.Crashed):
            out.append(Crash(len(out) + 1, e.category, e.step, first_line(e.message), attempt))
    return out


def _last_attempt(events: list[ev.Recorded]) -> ev.TrainingStarted | None:
    last = None
    for _, attempt in _attempts(events):
        last = attempt
    return last


def _sweep(ws: Workspace) -> None:
    """Remove the scratch folders of reproductions that died without cleaning up (recovery does too)."""
    for d in ws.abandoned_scratch():
        shutil.rmtree(d, ignore_errors=True)


def _copy_data(ws: Workspace, j: JobState, scratch: Path, notes: list[str]) -> dict[str, Path]:
    """Copy the job's data into the scratch folder and check the copies against the job's record: a replay
    on other data proves nothing, so a changed file is refused."""
    src = ws.job_dir(j.job) / "data"
    out = {}
    for name in ("train.jsonl", "valid.jsonl"):
        if not (src / name).exists():
            if name == "train.jsonl" or name in j.copies:
                raise ReproduceRefused(
                    f"the job's data file {src / name} is gone: the replay cannot train on what the "
                    "job trained on. Nothing was run or recorded"
                )
            continue
        dst = scratch / "data" / name
        dst.parent.mkdir(exist_ok=True, mode=0o700)
        shutil.copyfile(src / name, dst)
        sha = hashlib.sha256(dst.read_bytes()).hexdigest()
        want = j.copies.get(name)
        if want is None and name == "train.jsonl" and j.valid_sha256 is not None:
            # submitted with --valid: the copy is the submitted file, byte for byte
            want = j.data_sha256
        if want is None:
            notes.append(
                f"the job recorded no sha256 of its {name} (an older ftctl): that file was not checked"
            )
        elif sha != want:
            raise ReproduceRefused(
                f"the job's data file {src / name} changed since the job was submitted (sha256 {want[:12]}… recorded, "
                f"{sha[:12]}… now): a replay on other data would prove nothing, so it was refused. Nothing was run or "
                "recorded. Restore the file (the submitted original is "
                f"{j.data_path}), or submit the new data as a new job"
            )
        out[name] = dst
    return out


def _checkpoint(
    ws: Workspace,
    j: JobState,
    events: list[ev.Recorded],
    limit: int,
    job_dir: Path,
    notes: list[str],
    before: str,
) -> CheckpointRecord | None:
    """Copy the last committed checkpoint before step ``limit`` that is still there and verifies into
    ``job_dir``/checkpoints/ (the copy's manifest hashed against the journal's record, every file against
    the manifest); saying so when it is not the last one the job ever committed there."""
    ever = [
        r.event.checkpoint
        for r in events
        if isinstance(r.event, ev.CheckpointCommitted) and r.event.checkpoint.step < limit
    ]
    best = max((c.step for c in ever), default=None)
    pruned = {r.event.path for r in events if isinstance(r.event, ev.CheckpointPruned)}
    dest = ck.checkpoints_dir(job_dir)
    dest.mkdir(parents=True, mode=0o700)
    chosen = None
    for c in sorted(
        (c for c in j.good_checkpoints() if c.step < limit), key=lambda c: c.step, reverse=True
    ):
        copy = dest / Path(c.path).name
        try:
            shutil.copytree(ws.abs(c.path), copy)
            if ck.sha256((copy / ck.MANIFEST).read_bytes()) != c.manifest_sha256:
                raise ck.CheckpointCorrupt(
                    c.path, "its manifest is not the one the journal recorded"
                )
            ck.verify_checkpoint(copy)
        except (OSError, ck.CheckpointCorrupt) as e:
            why = e.reason if isinstance(e, ck.CheckpointCorrupt) else f"cannot be copied: {e}"
            notes.append(f"checkpoint step {c.step} failed verification ({why}): not used")
            shutil.rmtree(copy, ignore_errors=True)
            continue
        chosen = c
        break
    if best is not None and (chosen is None or chosen.step < best):
        lost = [c for c in ever if c.step == best][-1]
        why = (
            "was pruned by retention"
            if lost.path in pruned
            else "is corrupt"
            if lost.path in j.corrupt
            else "is not usable"
        )
        instead = (
            f"checkpoint step {chosen.step}, the previous one retained"
            if chosen
            else "the start of the job"
        )
        notes.append(
            f"the last checkpoint before {before}, step {best}, {why}: replaying from {instead} "
            f"({best - (chosen.step if chosen else 0)} more steps to replay, the same result)"
        )
    return chosen


def _step(t: P.Traced) -> Step:
    return Step(
        step=t.step,
        loss=t.loss,
        grad_norm=t.grad_norm,
        nonfinite_groups=t.nonfinite_groups,
        group_count=t.group_count,
    )


def _examples(
    ws: Workspace, j: JobState, train: Path, trace: list[P.Traced], step: int | None
) -> list[ExampleRef]:
    """The batch of ``step``: each example's line in the job's copy and, when the submitted file is unchanged,
    in that file; its token length and first characters. A preference pair is one line (prompt,
    chosen and rejected): the pair's line; its length the longer side's. The lines are counted as the
    trainer reads the file: under the job's feature keys (mlx-lm's *_feature, mlx-lm-lora's)."""
    t = next((t for t in trace if t.step == step), None)
    if t is None:
        return []
    data = train.read_bytes()
    lines, raw = record_lines(data, features(j.config)), data.split(b"\n")
    source = _source_lines(ws, j)
    out = []
    for i, n in zip(t.examples, t.lengths):
        line = lines[i]
        head = raw[line - 1].decode("utf-8", errors="replace").strip()
        out.append(
            ExampleRef(
                index=i,
                line=line,
                source_line=source[line - 1] if source and line <= len(source) else None,
                tokens=n,
                head=head[:HEAD] + ("…" if len(head) > HEAD else ""),
            )
        )
    return out


def _source_lines(ws: Workspace, j: JobState) -> list[int] | None:
    """Line k of the job's train.jsonl is line out[k - 1] of the submitted file; None when that file changed
    (its sha256 no longer matches the record) or is gone."""
    try:
        data = ws.abs(j.data_path).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != j.data_sha256:
        return None
    n = len(data.splitlines())
    if j.valid_sha256 is not None:  # submitted with --valid: the copy is the file itself
        return list(range(1, n + 1))
    held = held_lines(data, validate_jsonl(data, features(j.config)), j.config.batch_size)
    return [i for i in range(1, n + 1) if i not in held]


def _compare(
    ws: Workspace, j: JobState, written: list[CheckpointRecord]
) -> tuple[list[int], list[int]]:
    """Steps where the replay's checkpoint holds the same adapter weights and optimizer state as the job's own
    committed one (by the sha256 in both manifests), and steps where it does not."""
    mine = {c.step: c for c in j.good_checkpoints()}
    same, differ = [], []
    for w in written:
        c = mine.get(w.step)
        if c is None:
            continue
        try:
            a = json.loads((ws.abs(c.path) / ck.MANIFEST).read_bytes())["files"]
            b = json.loads((Path(w.path) / ck.MANIFEST).read_bytes())["files"]
        except (OSError, ValueError, KeyError):
            continue
        keys = (ck.ADAPTERS, ck.OPTIMIZER)
        (same if all(a[k]["sha256"] == b[k]["sha256"] for k in keys) else differ).append(w.step)
    return same, differ


def summarize(r: Result) -> str:
    """One line: the verdict, what the replay found, and the failing batch."""
    o, v, c = r.outcome, r.verdict, r.crash
    where = (
        f"replayed from step {r.from_step}"
        if r.checkpoint
        else "replayed from the start of the job"
    )
    found = ""
    if v is not None and v.first_nonfinite_step is not None:
        found = (
            f"; the {v.first_nonfinite} first became non-finite at step {v.first_nonfinite_step}"
            + (f" (the gradient of {describe_groups(v.groups, v.group_count)})" if v.groups else "")
        )
    batch = ""
    if r.examples:
        lines = ", ".join(str(e.line) for e in r.examples)
        src = [e.source_line for e in r.examples]
        batch = (
            f"; failing batch at step {v.failing_step if v else o.step + 1}: the job's train.jsonl lines {lines}"
            + (
                f" (lines {', '.join(map(str, src))} of the submitted file)"
                if all(s is not None for s in src)
                else ""
            )
        )
    if c is None:
        if o.category is None:
            return f"ran cleanly to step {r.target}, {where}{found}"
        return f"failed: {o.category} after step {o.step} ({o.message}), {where}{found}{batch}"
    if v.verdict == "reproduced":
        what = c.message if c.category not in NONFINITE and c.message else c.category
        return f"reproduced: {what} after step {c.step} again, {where}{found}{batch}"
    if v.verdict == "not reproduced":
        return (
            f"not reproduced: {where}, the replay ran cleanly past step {c.step} to step {o.step}: the {c.category} "
            f"crash came from the environment, not from the run{found}"
        )
    return (
        f"different: {where}, the replay failed with {o.category} after step {o.step} ({o.message}), not "
        f"{c.category} after step {c.step}{found}{batch}"
    )


def write_trace(path: Path, trace: list[P.Traced]) -> None:
    """--trace: one JSON object per replayed step."""
    rows = [msgspec.json.encode(msgspec.structs.asdict(t)) for t in trace]
    Path(path).write_bytes(b"".join(r + b"\n" for r in rows))
