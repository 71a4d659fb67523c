"""Every job verb in every state a job can be found in, with QEMU 11.1's answers.

The texts were settled with real-qsd (a speed-limited blockdev-mirror of null-co nodes gives
QEMU jobs in running, paused, ready, standby, pending and concluded), the tables are QEMU's
job.c (JobSTT, JobVerbTable); ``waiting`` and
``aborting`` are passed through within one step of the loop, and ``null`` means the job is
gone (``Job not found``).
"""

from __future__ import annotations

from typing import Any

import pytest
from jobkit import StepJob, new_daemon, reply, until

from qsd_py.jobs import state as st

OK: dict[str, Any] = {}


def verb_error(status: str, verb: str) -> tuple[str, str, str]:
    return (
        "error",
        "GenericError",
        f"Job 'j' in state '{status}' cannot accept command verb '{verb}'",
    )


NOT_PAUSED = ("error", "GenericError", "Can't resume a job that was not paused")
ALREADY = ("error", "GenericError", "Job is already paused")

# verb command -> state -> expected reply (OK or the error)
COMMANDS = {
    "job-pause": ("pause", {"id": "j"}),
    "job-resume": ("resume", {"id": "j"}),
    "job-cancel": ("cancel", {"id": "j"}),
    "job-complete": ("complete", {"id": "j"}),
    "job-dismiss": ("dismiss", {"id": "j"}),
    "job-finalize": ("finalize", {"id": "j"}),
    "block-job-set-speed": ("set-speed", {"device": "j", "speed": 1 << 20}),
    "block-job-change": ("change", {"id": "j", "type": "mirror", "copy-mode": "background"}),
}
STATES = ["created", "running", "paused", "ready", "standby", "pending", "concluded"]

# QEMU's JobVerbTable, written out here on its own (not read from qsd_py's table).
ACCEPTS = {
    "cancel": {"created", "running", "paused", "ready", "standby", "waiting", "pending"},
    "pause": {"created", "running", "paused", "ready", "standby"},
    "resume": {"created", "running", "paused", "ready", "standby"},
    "set-speed": {"created", "running", "paused", "ready", "standby"},
    "complete": {"ready", "standby"},
    "finalize": {"pending"},
    "dismiss": {"concluded"},
    "change": {"created", "running", "paused", "ready", "standby"},
}


def expected(state: str, command: str) -> Any:
    verb, _ = COMMANDS[command]
    user_paused = state in ("paused", "standby")
    if verb == "resume":
        return OK if user_paused else NOT_PAUSED  # checked before the state
    if state not in ACCEPTS[verb]:
        return verb_error(state, verb)
    if verb == "pause" and user_paused:
        return ALREADY
    return OK


async def job_in(state: str):
    """A daemon with job 'j' in ``state`` (reached by the user's own commands)."""
    daemon, events = await new_daemon()
    job = StepJob(
        daemon.jobs,
        "j",
        ready=state in ("ready", "standby"),
        auto_finalize=state != "pending",
        auto_dismiss=False,
    )
    daemon.jobs.add(job)
    if state == "created":
        return daemon, job
    if state in ("running", "paused"):
        job.gate.clear()  # the job stays in its first step
    job.start()
    if state == "paused":
        assert await reply(daemon, "job-pause", {"id": "j"}) == OK
        job.gate.set()
    if state == "standby":
        await until(lambda: job.status == "ready")
        assert await reply(daemon, "job-pause", {"id": "j"}) == OK
    await until(lambda: job.status == state)
    return daemon, job


@pytest.mark.parametrize("state", STATES)
async def test_every_verb_in_every_state(state: str) -> None:
    for command in COMMANDS:
        daemon, job = await job_in(state)
        got = await reply(daemon, command, COMMANDS[command][1])
        assert got == expected(state, command), (state, command)
        job.gate.set()
        await daemon.jobs.cancel_all()


async def test_gone_job_and_ids() -> None:
    daemon, _ = await new_daemon()
    assert await reply(daemon, "job-pause", {"id": "nojob"}) == (
        "error",
        "GenericError",
        "Job not found",
    )
    for cmd, args in [
        ("block-job-pause", {"device": "nojob"}),
        ("block-job-cancel", {"device": "nojob"}),
        ("block-job-finalize", {"id": "nojob"}),
        ("block-job-change", {"id": "nojob", "type": "commit"}),
    ]:
        assert await reply(daemon, cmd, args) == (
            "error",
            "DeviceNotActive",
            "Block job 'nojob' not found",
        )
    daemon.jobs.add(StepJob(daemon.jobs, "j"))
    with pytest.raises(Exception, match="Job ID 'j' already in use"):
        daemon.jobs.add(StepJob(daemon.jobs, "j"))
    with pytest.raises(Exception, match="Invalid job ID '1j'"):
        daemon.jobs.add(StepJob(daemon.jobs, "1j"))


async def test_block_job_cancel_of_user_paused_job_needs_force() -> None:
    daemon, job = await job_in("paused")
    got = await reply(daemon, "block-job-cancel", {"device": "j"})
    assert got == ("error", "GenericError", "The block job for device 'j' is currently paused")
    assert await reply(daemon, "block-job-cancel", {"device": "j", "force": True}) == OK
    await until(lambda: job.status == "concluded")
    assert job.error == "Operation canceled"


async def test_set_speed_refuses_negative_and_change_reaches_the_job() -> None:
    daemon, job = await job_in("ready")
    got = await reply(daemon, "block-job-set-speed", {"device": "j", "speed": -1})
    assert got == ("error", "GenericError", "Parameter 'speed' expects a non-negative value")
    assert await reply(daemon, "block-job-set-speed", {"device": "j", "speed": 7}) == OK
    assert job.speed == 7 and (await reply(daemon, "query-block-jobs"))[0]["speed"] == 7
    opts = {"id": "j", "type": "mirror", "copy-mode": "write-blocking"}
    assert await reply(daemon, "block-job-change", opts) == OK
    assert job.changes[-1]["copy-mode"] == "write-blocking"
    await daemon.jobs.cancel_all()


def test_verb_table_is_qemus() -> None:
    assert {verb: set(states) for verb, states in st.VERBS.items()} == ACCEPTS


def test_transition_table_is_qemus() -> None:
    """Spot checks of the table against QEMU's job.c (the others are exercised above)."""
    assert st.TRANSITIONS["paused"] == {"running"}
    assert st.TRANSITIONS["standby"] == {"ready"}
    assert st.TRANSITIONS["concluded"] == {"null"}
    assert "concluded" in st.TRANSITIONS["pending"] and "aborting" in st.TRANSITIONS["waiting"]
    with pytest.raises(AssertionError):
        st.check_transition("running", "concluded")
