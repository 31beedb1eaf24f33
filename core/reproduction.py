"""The verdict of a reproduction: did re-running the job from a checkpoint fail as the crash did? No I/O.

control/reproduce.py re-runs the job on a scratch copy, collects what the replay did (its outcome and
a trace of every step) and asks ``judge``; the daemon's restart policy (core/crash.py) acts on it.

- ``reproduced``: the replay failed with the crash's category at the crash's step (for an exception,
  with the same exception type and message too): a property of the run; retrying repeats it.
- ``not reproduced``: the replay ran cleanly past the crash step: the crash came from the environment
  (a kill, the OOM killer, a hang, a flaky device), not from the run.
- ``different``: the replay failed some other way, or at another step.
"""

from __future__ import annotations

import math

import msgspec

# Crashes that can be properties of the run itself (a batch that makes the loss NaN, an exception on one
# example): the daemon reproduces these before it decides on a restart (core/crash.py).
DETERMINISTIC = frozenset({"nan", "inf", "exception"})
NONFINITE = frozenset({"nan", "inf"})


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One replayed step (the worker's Traced message). Floats that are not finite are text: "nan", "inf"."""

    step: int
    loss: float | str | None  # None: not finite either
    grad_norm: float | str | None
    nonfinite_groups: list[str] = []
    group_count: int = 0  # the model's parameter groups


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """How the replay ended: ``category`` None when it ran to its target step cleanly."""

    category: str | None
    step: int  # its last completed step (the crash's step is counted the same way)
    message: str = ""  # its failure, first line


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    verdict: str  # reproduced | not reproduced | different
    first_nonfinite_step: int | None = None
    first_nonfinite: str = ""  # loss | gradient norm | loss and gradient norm
    groups: list[str] = []  # the groups whose gradient was not finite at that step
    group_count: int = 0  # of how many
    failing_step: int | None = None  # the step whose batch is to blame (None: none is)


def finite(x: float | str | None) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def judge(
    crash_category: str, crash_step: int, crash_message: str, outcome: Outcome, trace: list[Step]
) -> Verdict:
    """Compare the replay with the crash. ``crash_message`` "" (not recorded) compares categories and steps only."""
    bad = next((t for t in trace if not finite(t.loss) or not finite(t.grad_norm)), None)
    found = {}
    if bad is not None:
        what = [
            w for w, x in (("loss", bad.loss), ("gradient norm", bad.grad_norm)) if not finite(x)
        ]
        found = {
            "first_nonfinite_step": bad.step,
            "first_nonfinite": " and ".join(what),
            "groups": list(bad.nonfinite_groups),
            "group_count": bad.group_count,
        }
    if outcome.category is None:
        return Verdict(verdict="not reproduced", **found)
    same = outcome.category == crash_category and outcome.step == crash_step
    if same and crash_category not in NONFINITE and crash_message:
        same = first_line(outcome.message) == first_line(crash_message)
    # The batch to blame: where the loss or a gradient first went bad, else the step that failed (the one
    # after the last completed step)
    failing = bad.step if bad is not None else outcome.step + 1
    return Verdict(verdict="reproduced" if same else "different", failing_step=failing, **found)


def describe_groups(groups: list[str], total: int = 0) -> str:
    """Where the gradient first stopped being finite: '3 parameter groups, first layers.0.self_attn.q_proj'."""
    if not groups:
        return "no parameter group's gradient"
    if total and len(groups) >= total:
        return f"every parameter group ({total}) at once"
    if len(groups) == 1:
        return f"parameter group {groups[0]}"
    return f"{len(groups)} parameter groups, first (in model order) {groups[0]}"
