"""Running jobs at other commands' drains (issue 19): the paused/running (standby/ready)
pairs QEMU 11.1's commands give a running block job, held to QEMU's recorded transcript."""

from __future__ import annotations

import json
from pathlib import Path

import drain_jobs_script
import drain_script
import pytest
from jobkit import StepJob, new_daemon, reply, until

S = "JOB_STATUS_CHANGE"


def test_transcript_is_qemus(tmp_path: Path) -> None:
    want = json.loads(drain_script.DATA.read_text())
    assert drain_script.run_script(False, tmp_path) == want


async def test_drain_all_pauses_sleeping_and_ready_jobs_not_user_paused_ones() -> None:
    """Each drained section of all nodes wakes a job sleeping off its speed into a pause
    (paused, then running before the section's end returns), a ready job goes standby and
    ready, a job the user paused says nothing; the sleeping job copies nothing more for it."""
    daemon, events = await new_daemon()
    slow = StepJob(daemon.jobs, "slow", steps=4, speed=1)
    ready = StepJob(daemon.jobs, "ready", steps=1, ready=True)
    held = StepJob(daemon.jobs, "held", steps=4, speed=1)
    for job in (slow, ready, held):
        job.register(job.speed)
        job.start()
    await until(lambda: ready.status == "ready" and slow.current_progress and not slow.busy)
    await until(lambda: held.current_progress > 0 and not held.busy)
    await reply(daemon, "block-job-pause", {"device": "held"})
    await until(lambda: held.status == "paused")
    events.take()
    done = slow.current_progress
    await daemon.graph.drain_all(2)
    pair = [(S, "paused"), (S, "standby"), (S, "ready"), (S, "running")]
    assert events.take() == [(e, s) for e, s in pair] * 2
    assert slow.current_progress == done and slow.status == "running"
    for job in (slow, ready, held):
        await reply(daemon, "block-job-cancel", {"device": job.id, "force": True})
    await until(lambda: not list(daemon.jobs))


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("drain-live") as work:
        real = drain_script.run_script(True, work)
        assert drain_script.run_script(False, work) == real


def test_jobs_created_and_ended_drain_as_qemus(tmp_path: Path) -> None:
    """Another job's creation and end pause and resume a running job as often as QEMU
    11.1's drains do, the new job appearing within one section."""
    want = json.loads(drain_jobs_script.DATA.read_text())
    assert drain_jobs_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_jobs_created_and_ended_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("drain-jobs-live") as work:
        real = drain_jobs_script.run_script(True, work)
        assert drain_jobs_script.run_script(False, work) == real
