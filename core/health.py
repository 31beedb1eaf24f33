"""Training health: what a person watching the curves would notice, as pure functions of the points.

* a **loss spike**: a train loss above ``factor`` times the median of the reports before it;
* a **plateau**: ``patience`` evaluations in a row without a new best validation loss;
* a **throughput drop**: ``sustain`` reports in a row under 1/``factor`` of the median tokens/s of
  the reports before the first of them (thermal throttling, swapping: not one slow report).

Each takes the points in step order — ``(step, value)``, ``value`` None where it was not finite — and
returns every ``Finding`` the series holds, oldest first. The daemon's watch (control/watch.py) runs
them over the journal's curves and records what it has not recorded yet; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Sequence

SPIKE = "loss_spike"
PLATEAU = "plateau"
SLOWDOWN = "throughput_drop"
KINDS = (SPIKE, PLATEAU, SLOWDOWN)
MIN_HISTORY = 3  # reports a median needs before a spike or a drop can be judged against it

Point = tuple[int, float | None]


@dataclass(frozen=True)
class Finding:
    kind: str  # SPIKE | PLATEAU | SLOWDOWN
    step: int  # the point that fired it
    value: float  # its loss / the last val loss / its tokens/s
    baseline: float  # the median compared with / the best val loss / the median tokens/s
    compared: tuple[int, ...]  # the steps of the points it was compared with
    text: str  # one line, for people: what was seen and against what


def _known(points: Sequence[Point]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if v is not None]


def _span(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _num(x: float) -> str:
    return f"{x:.4g}"


def loss_spikes(
    points: Sequence[Point], factor: float, window: int, min_history: int = MIN_HISTORY
) -> list[Finding]:
    """Every train loss above ``factor`` x the median of the ``window`` finite losses before it (at
    least ``min_history`` of them). A loss that was not finite is NaN's business (the trainer stops on
    it), not a spike: it is skipped, here and in the medians."""
    pts = _known(points)
    out = []
    for i, (step, loss) in enumerate(pts):
        before = pts[max(0, i - window) : i]
        if len(before) < min(min_history, window):
            continue
        base = median(v for _, v in before)
        if base > 0 and loss > factor * base:
            steps = tuple(s for s, _ in before)
            out.append(
                Finding(
                    SPIKE,
                    step,
                    loss,
                    base,
                    steps,
                    f"loss spike at step {step}: train loss {_num(loss)} is {loss / base:.1f}x the "
                    f"median {_num(base)} of the {len(before)} reports before it ({_span(steps)}; "
                    f"alerts.spike_factor = {factor:g})",
                )
            )
    return out


def plateaus(points: Sequence[Point], patience: int, min_delta: float = 0.0) -> list[Finding]:
    """The evaluation at which ``patience`` evaluations in a row have not improved on the best
    validation loss by more than ``min_delta``: once per stretch (the next one only after a new
    best). The first evaluation sets the best; one that was not finite does not improve it."""
    out = []
    best: tuple[int, float] | None = None
    since: list[int] = []
    for step, val in points:
        if best is None:
            if val is not None:
                best = (step, val)
            continue
        if val is not None and val < best[1] - min_delta:
            best, since = (step, val), []
            continue
        since.append(step)
        if len(since) == patience:
            last = val if val is not None else float("nan")
            out.append(
                Finding(
                    PLATEAU,
                    step,
                    last,
                    best[1],
                    tuple(since),
                    f"plateau at step {step}: no validation improvement for {patience} evaluations "
                    f"({_span(since)}); the best is still {_num(best[1])} at step {best[0]}"
                    + (f" (by more than {min_delta:g})" if min_delta else "")
                    + f" (alerts.plateau_evals = {patience})",
                )
            )
    return out


def throughput_drops(
    points: Sequence[Point],
    factor: float,
    window: int,
    sustain: int,
    min_history: int = MIN_HISTORY,
) -> list[Finding]:
    """Every stretch of at least ``sustain`` reports in a row whose tokens/s are all under the median
    of the ``window`` reports before the stretch divided by ``factor``: one finding per stretch, at its
    ``sustain``-th report. The median is the one before the stretch began, so a long slowdown does not
    become its own baseline."""
    pts = _known(points)
    out = []
    run: list[int] = []  # indices of the current stretch
    base = 0.0
    for i, (step, rate) in enumerate(pts):
        if not run:
            before = pts[max(0, i - window) : i]
            if len(before) < min(min_history, window):
                continue
            base = median(v for _, v in before)
            if base > 0 and rate < base / factor:
                run = [i]
        elif rate < base / factor:
            run.append(i)
        else:
            run = []
            continue
        if len(run) == sustain:
            first = run[0]
            steps = tuple(s for s, _ in pts[max(0, first - window) : first])
            rates = ", ".join(f"{pts[k][1]:.0f}" for k in run)
            out.append(
                Finding(
                    SLOWDOWN,
                    step,
                    rate,
                    base,
                    steps,
                    f"throughput drop at step {step}: {sustain} report(s) in a row under 1/{factor:g} of "
                    f"the median {base:.0f} tok/s of the {len(steps)} reports before them "
                    f"({_span(steps)}): {rates} tok/s (alerts.throughput_factor = {factor:g})",
                )
            )
    return out
