"""The daemon's training-health watch: core/health.py's detectors over a training job's curves as
the journal has them, every ``WATCH_S`` from the supervisor's loop — never in the worker, so nothing
is added to the training loop's path.

A finding not recorded yet becomes a ``training_alert`` event with its evidence (the value, the
median or best it was compared with, the steps of those points); the notifier sends it to the
``notify:`` targets that list ``alert``. A loss spike with ``alerts.on_spike: pause`` then asks for
a pause exactly as `ftctl pause` does (``control_requested``, by the alert), and the supervisor
carries it out as it does the user's: a checkpoint at the current step, then ``paused``; `ftctl
resume` continues bit-exact. What was recorded is known by (kind, global step): a daemon that dies
between a finding and its event finds it again, and a curve trained again after a resume does not
alert (or pause) twice for the same step.
"""

from __future__ import annotations

import time
from typing import Callable

from ftctl.control.ledger import Ledger
from ftctl.core import health as H
from ftctl.core.config import Alerts
from ftctl.core.machine import ACTIVE
from ftctl.core.state import JobState, job_stream
from ftctl.events import types as ev

from . import jobs
from .metrics import Series, series

WATCH_S = 2.0  # how often a training job's curve is looked at (and once more when its attempt ends)


def findings(cfg: Alerts, s: Series) -> list[H.Finding]:
    """Every finding the job's effective curve holds, oldest first."""
    reports = [p for p in s.points if p["id"] is not None]
    out: list[H.Finding] = []
    if cfg.spike_factor is not None:
        out += H.loss_spikes(
            [(p["step"], p["loss"]) for p in reports], cfg.spike_factor, cfg.spike_window
        )
    if cfg.plateau_evals is not None:
        evals = [(p["step"], p["val_loss"]) for p in s.points if p["val_loss"] is not None]
        out += H.plateaus(evals, cfg.plateau_evals, cfg.plateau_min_delta)
    if cfg.throughput_factor is not None:
        out += H.throughput_drops(
            [(p["step"], p["tokens_per_s"]) for p in reports],
            cfg.throughput_factor,
            cfg.throughput_window,
            cfg.throughput_reports,
        )
    return sorted(out, key=lambda f: f.step)


def new_alerts(j: JobState, s: Series, can_pause: bool = True) -> list[ev.TrainingAlert]:
    """The training_alert events the curve calls for that the job has not recorded yet (``can_pause``
    False: the job has finished training, so a spike is recorded, not acted on)."""
    if j.config is None:
        return []
    cfg = j.config.alerts
    seen = {(a.kind, a.global_step) for a in j.alerts}
    offset = {p["step"]: p["global_step"] - p["step"] for p in s.points}
    out = []
    for f in findings(cfg, s):
        gstep = f.step + offset.get(f.step, j.global_step_base)
        if (f.kind, gstep) in seen:
            continue
        seen.add((f.kind, gstep))
        pause = can_pause and f.kind == H.SPIKE and cfg.on_spike == "pause"
        out.append(
            ev.TrainingAlert(
                job=j.job,
                alert=f.kind,
                step=f.step,
                global_step=gstep,
                value=f.value
                if f.value == f.value
                else None,  # NaN (a non-finite last val) -> null
                baseline=f.baseline,
                compared=list(f.compared),
                text=f.text + ("; pausing the job (alerts.on_spike: pause)" if pause else ""),
                action="pause" if pause else "recorded",
            )
        )
    return out


class Watch:
    """One training job's watch, owned by its supervisor (control/supervise.py)."""

    def __init__(self, ledger: Ledger, job: str, say: Callable[[str, str], None]):
        self.ledger, self.job, self.say = ledger, job, say
        self.due = 0.0
        self.metric_id = -1  # the newest metrics row at the last look: nothing new, nothing to do
        self.evals = -1

    def check(
        self, now: float | None = None, force: bool = False, ending: bool = False
    ) -> list[ev.TrainingAlert]:
        """Look at the curve if it is time (or ``force``) and it moved; record what is new. Returns
        the alerts recorded. ``ending``: the job's training is over (its completion is about to be
        committed): what the last reports show is recorded before it, and nothing is paused."""
        now = time.monotonic() if now is None else now
        if not force and now < self.due:
            return []
        self.due = now + WATCH_S
        L = self.ledger
        L.refresh()
        j = L.state.jobs[self.job]
        moved = (L.journal.last_metric_id(), j.last_val_step)
        if moved == (self.metric_id, self.evals):
            return []
        self.metric_id, self.evals = moved
        found = new_alerts(j, series(L.journal, j), can_pause=not ending)
        for a in found:
            L.commit(job_stream(self.job), a)
            self.say(f"job {self.job}: {a.text}", "warn")
            now_j = L.state.jobs[self.job]
            if a.action == "pause" and now_j.state in ACTIVE and now_j.requested is None:
                jobs.request(L, self.job, "pause", by=f"the loss-spike alert at step {a.step}")
        return found
