"""QEMU 11.1's job states, which state may follow which, and which verb each state accepts.

The tables are QEMU's (``job.c``): a transition outside them is a bug in qsd-py (asserted), a
verb outside them is the user's mistake and refused with QEMU's text.
"""

from __future__ import annotations

from qsd_py.errors import QMPError

CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
READY = "ready"
STANDBY = "standby"
WAITING = "waiting"
PENDING = "pending"
ABORTING = "aborting"
CONCLUDED = "concluded"
NULL = "null"

# From each state, the states a job may move to.
TRANSITIONS: dict[str, frozenset[str]] = {
    CREATED: frozenset({RUNNING, ABORTING, NULL}),
    RUNNING: frozenset({PAUSED, READY, WAITING, ABORTING}),
    PAUSED: frozenset({RUNNING}),
    READY: frozenset({STANDBY, WAITING, ABORTING}),
    STANDBY: frozenset({READY}),
    WAITING: frozenset({PENDING, ABORTING}),
    PENDING: frozenset({ABORTING, CONCLUDED}),
    ABORTING: frozenset({ABORTING, CONCLUDED}),
    CONCLUDED: frozenset({NULL}),
    NULL: frozenset(),
}

# For each verb (QAPI's JobVerb), the states that accept it.
_UNTIL_READY = frozenset({CREATED, RUNNING, PAUSED, READY, STANDBY})
VERBS: dict[str, frozenset[str]] = {
    "cancel": _UNTIL_READY | {WAITING, PENDING},
    "pause": _UNTIL_READY,
    "resume": _UNTIL_READY,
    "set-speed": _UNTIL_READY,
    "complete": frozenset({READY, STANDBY}),
    "finalize": frozenset({PENDING}),
    "dismiss": frozenset({CONCLUDED}),
    "change": _UNTIL_READY,
}


def check_transition(old: str, new: str) -> None:
    """A transition the table forbids is a bug in the job code, never a user error."""
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"job state transition {old} -> {new} is not allowed")


def check_verb(job_id: str, status: str, verb: str) -> None:
    """Refuse ``verb`` in ``status`` with QEMU's text."""
    if status not in VERBS[verb]:
        raise QMPError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
