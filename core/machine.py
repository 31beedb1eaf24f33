"""The state machines, declared once as data (``JOB_TRANSITIONS``, ``LINEAGE_TRANSITIONS``).

A command goes through the declared machine: ``command`` asks the ``transitions`` library
(``may_<trigger>()``) and fires the trigger on a model to get the state it leads to — the ledger
calls it (through core.state.check_command) before it appends anything. Replay uses
``JOB_TABLE``/``LINEAGE_TABLE``, plain dicts derived once from the very same machines, so that
folding a million events costs a dict lookup each rather than a library callback;
tests/test_machine.py checks that the tables and the library agree on every (state, trigger).
"""

from __future__ import annotations

import threading

from transitions import Machine

from ftctl.events.errors import UserError

JOB_STATES = [
    "new",
    "queued",
    "training",
    "checkpointing",
    "paused",
    "crashed",
    "completed",
    "failed",
    "cancelled",
    "rejected",
]
# finished: nothing runs them again…
TERMINAL = frozenset({"completed", "failed", "cancelled", "rejected"})
RETRYABLE = frozenset({"failed"})  # …except `ftctl retry`, which the user asks for explicitly
ACTIVE = frozenset({"training", "checkpointing"})

_LIVE = ["queued", "paused", "crashed", "training", "checkpointing"]

JOB_TRANSITIONS = [
    {"trigger": "submit", "source": "new", "dest": "queued"},
    {"trigger": "reject", "source": "new", "dest": "rejected"},
    {"trigger": "start", "source": "queued", "dest": "training"},
    {"trigger": "checkpoint", "source": "training", "dest": "checkpointing"},
    {"trigger": "committed", "source": "checkpointing", "dest": "training"},
    {"trigger": "complete", "source": "training", "dest": "completed"},
    {"trigger": "crash", "source": ["training", "checkpointing"], "dest": "crashed"},
    {"trigger": "requeue", "source": "crashed", "dest": "queued"},
    {"trigger": "interrupt", "source": ["training", "checkpointing"], "dest": "queued"},
    # a guard's checkpoint-and-continue in a fresh worker (restart_planned): queued again, not crashed
    {"trigger": "plan_restart", "source": ["training", "checkpointing"], "dest": "queued"},
    {"trigger": "fail", "source": ["crashed", "queued"], "dest": "failed"},
    {
        "trigger": "pause",
        "source": ["queued", "crashed", "training", "checkpointing"],
        "dest": "paused",
    },
    {"trigger": "resume", "source": "paused", "dest": "queued"},
    # a paused job too, with a changed config (`ftctl retry JOB --set`): `resume` keeps it as it is
    {"trigger": "retry", "source": ["failed", "paused"], "dest": "queued"},
    {"trigger": "cancel", "source": _LIVE, "dest": "cancelled"},
]

LINEAGE_STATES = ["idle", "consolidating"]
LINEAGE_TRANSITIONS = [
    {"trigger": "consolidate", "source": "idle", "dest": "consolidating"},
    {"trigger": "promote", "source": "consolidating", "dest": "idle"},
    {"trigger": "abort", "source": "consolidating", "dest": "idle"},
]

# Events that record a fact without moving the state, and the states they may be recorded in.
_ANY_JOB = frozenset(JOB_STATES) - {"new"}
FACTS = {
    "evaluated": frozenset(ACTIVE),
    "early_stopped": frozenset(ACTIVE),
    "adapter_evaluated": frozenset({"completed"}),  # only a completed job has an adapter
    "control_requested": frozenset(ACTIVE),
    "ranks_reported": frozenset(ACTIVE),
    "worker_loaded": frozenset(ACTIVE),
    "checkpoint_pruned": _ANY_JOB,
    "checkpoint_corrupt": _ANY_JOB,
    "checkpoint_discarded": _ANY_JOB,
    "crash_reproduced": _ANY_JOB,
    "training_alert": _ANY_JOB,  # read from the journal a little after the fact: the job may have moved on
    "model_removed": frozenset(LINEAGE_STATES),
    "consolidation_requested": frozenset({"idle"}),
    "head_set": frozenset({"idle"}),
}


class IllegalTransition(UserError):
    """A command the machine refuses in the current state; nothing was appended."""

    kept = "nothing was appended"

    def __init__(self, subject: str, state: str, event: str):
        self.subject, self.state, self.event = subject, state, event
        super().__init__(f"{subject} is {state!r}: {event!r} is not allowed in that state")


class _Model:
    pass


def _build(
    states: list[str], transitions: list[dict], initial: str
) -> tuple[Machine, _Model, dict]:
    model = _Model()
    machine = Machine(
        model=model,
        states=states,
        transitions=transitions,
        initial=initial,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )
    table: dict[tuple[str, str], str] = {}
    for trigger, event in machine.events.items():
        for source, ts in event.transitions.items():
            table[(source, trigger)] = ts[0].dest
    return machine, model, table


_JOB_MACHINE, _JOB_MODEL, JOB_TABLE = _build(JOB_STATES, JOB_TRANSITIONS, "new")
_LIN_MACHINE, _LIN_MODEL, LINEAGE_TABLE = _build(LINEAGE_STATES, LINEAGE_TRANSITIONS, "idle")


# one model per machine, shared: a command at a time (the daemon has threads)
_LOCK = threading.Lock()


def may(state: str, trigger: str, *, lineage: bool = False) -> bool:
    """Ask the declared machine whether ``trigger`` is allowed in ``state`` (no side effect)."""
    machine, model = (_LIN_MACHINE, _LIN_MODEL) if lineage else (_JOB_MACHINE, _JOB_MODEL)
    with _LOCK:
        machine.set_state(state, model)
        check = getattr(model, f"may_{trigger}", None)
        return bool(check and check())


def command(state: str, trigger: str, *, lineage: bool = False) -> str | None:
    """The state a command's ``trigger`` leads to from ``state``, by the declared machine itself (the
    library checks it and performs the transition on a model); None if the machine refuses it."""
    machine, model = (_LIN_MACHINE, _LIN_MODEL) if lineage else (_JOB_MACHINE, _JOB_MODEL)
    with _LOCK:
        machine.set_state(state, model)
        allowed = getattr(model, f"may_{trigger}", None)
        if allowed is None or not allowed():
            return None
        getattr(model, trigger)()
        return model.state


def next_state(state: str, trigger: str, *, lineage: bool = False) -> str | None:
    """The replay path: a dict lookup in the table derived from the declaration."""
    return (LINEAGE_TABLE if lineage else JOB_TABLE).get((state, trigger))
