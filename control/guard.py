"""The daemon's guards over one attempt's worker: core/guards.py's decisions on the leader's reports as
they arrive (the device readings of adapters/telemetry.py), beside the training-health watch
(control/watch.py), which reads the journal's curves. Both only ask the supervisor to stop the worker
with a checkpoint (control/supervise.py, ``Attempt.ask_stop``); what is recorded then is theirs.

A GPU over ``guards.max_temperature_c``, or memory whose trend reaches the ceiling within
``guards.memory_horizon_steps``, trips the guard once per attempt. Once the worker has checkpointed,
``outcome`` is the event: a planned restart (``restart_planned``: the job continues in a fresh
worker, at once or after ``guards.cooldown_s``; not a crash, no restart budget used), or a pause
that says why and what to do (a fresh worker would start over the ceiling already; a hot GPU with
no cool-down configured).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from ftctl.adapters import system
from ftctl.core import guards as G
from ftctl.core.config import Guards
from ftctl.events import types as ev


class Trip(NamedTuple):
    name: str  # "memory" | "temperature"
    evidence: str
    action: str  # "restart" | "pause"

    def said(self) -> str:
        then = "continuing in a fresh worker" if self.action == "restart" else "pausing"
        return f"{self.name} guard: {self.evidence}; checkpointing at the current step, then {then}"


class Guard:
    """One attempt's guards, owned by its supervisor."""

    def __init__(self, cfg: Guards, job: str):
        self.cfg, self.job = cfg, job
        self.samples: list[tuple[int, dict]] = []  # this attempt's (step, readings)
        self.tripped: Trip | None = None
        self.on_cuda = False  # a report said the worker trains on a CUDA GPU
        self.started = time.time()

    def report(self, m: ev.Metrics) -> Trip | None:
        """The leader's report: a Trip the first time a guard says stop, else None."""
        self.on_cuda = self.on_cuda or (m.device or "").startswith("cuda")
        if self.tripped is not None:
            return None
        g = self.cfg
        r = {k: getattr(m, k) for k in ev.READINGS}
        self.samples.append((m.step, r))
        hot = G.too_hot(r, g.max_temperature_c)
        if hot:
            action = "restart" if g.cooldown_s > 0 else "pause"
            self.tripped = Trip("temperature", f"{hot} at step {m.step}", action)
            return self.tripped
        backend = (m.device or "cpu").split()[0].split(":")[0]
        gauges = G.gauges(
            backend,
            system.total_memory_gb(),
            r["device_mem_total_gb"],
            g.max_memory_pct,
            g.memory_limit_gb,
        )
        t = G.memory_trend(self.samples, gauges, g.memory_horizon_steps)
        if t is None:
            return None
        # a fresh worker that starts over the ceiling would only be stopped again: pause instead
        self.tripped = Trip(
            "memory", t.evidence(), "restart" if t.first_gb < t.limit_gb else "pause"
        )
        return self.tripped

    def outcome(self, step: int) -> tuple[ev.RestartPlanned | ev.Paused, str]:
        """What the trip comes to once the worker checkpointed at ``step``: the event, and the line to
        say."""
        name, evidence, action = self.tripped
        if action == "restart":
            wait = self.cfg.cooldown_s if name == "temperature" else 0.0
            after = f" after a {wait:g} s cool-down" if wait else ""
            return (
                ev.RestartPlanned(
                    job=self.job,
                    step=step,
                    guard=name,
                    evidence=evidence,
                    not_before=time.time() + wait if wait else 0.0,
                ),
                f"job {self.job}: checkpointed at step {step}; it continues{after} in a fresh worker "
                "(a planned restart: nothing lost, no restart budget used)",
            )
        if name == "temperature":
            do = (
                "let the GPU cool (check its fans and airflow, and what else runs on it: nvidia-smi), "
                f"then `ftctl resume {self.job}`; or set guards.cooldown_s to resume by itself"
            )
        else:
            do = (
                "a fresh worker starts over the ceiling already: lower batch_size or max_seq_length, set "
                "grad_checkpoint: true, or raise guards.memory_limit_gb; then "
                f"`ftctl resume {self.job}`"
            )
        return (
            ev.Paused(
                job=self.job,
                reason=f"{name} guard: {evidence}; checkpointed at step {step} and paused: {do}",
            ),
            f"job {self.job}: paused by the {name} guard at step {step}",
        )
