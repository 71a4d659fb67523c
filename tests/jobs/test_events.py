"""Event order of a job's life, as QEMU 11.1 sends it (recorded with real-qsd's mirror jobs:
manual finalize and dismiss, cancel of a paused job, a ready job paused, completed, and
soft-cancelled), plus drain and the speed limit a block job obeys."""

from __future__ import annotations

import pytest
from jobkit import StepJob, new_daemon, reply, until

from qsd_py.jobs.ratelimit import RateLimit

S = "JOB_STATUS_CHANGE"


def progress(job, **extra):
    return {
        "type": "mirror",
        "device": "j",
        "len": job.total_progress,
        "offset": job.current_progress,
        "speed": job.speed,
        **extra,
    }


@pytest.mark.parametrize("auto", [True, False])
async def test_success_auto_and_manual_finalize_dismiss(auto: bool) -> None:
    daemon, events = await new_daemon()
    job = StepJob(daemon.jobs, "j", auto_finalize=auto, auto_dismiss=auto)
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.status in ("null", "pending"))
    done = [(S, "waiting"), (S, "pending")]
    if auto:
        want = [
            (S, "created"),
            (S, "running"),
            *done,
            ("BLOCK_JOB_COMPLETED", progress(job)),
            (S, "concluded"),
            (S, "null"),
        ]
        assert events.take() == want
        assert await reply(daemon, "query-jobs") == []
        return
    assert events.take() == [
        (S, "created"),
        (S, "running"),
        *done,
        ("BLOCK_JOB_PENDING", {"type": "mirror", "id": "j"}),
    ]
    assert (await reply(daemon, "query-block-jobs"))[0]["status"] == "pending"
    assert await reply(daemon, "job-finalize", {"id": "j"}) == {}
    assert events.take() == [("BLOCK_JOB_COMPLETED", progress(job)), (S, "concluded")]
    info = await reply(daemon, "query-jobs")
    assert info == [
        {
            "id": "j",
            "type": "mirror",
            "status": "concluded",
            "current-progress": 4 * 65536,
            "total-progress": 4 * 65536,
        }
    ]
    assert await reply(daemon, "job-dismiss", {"id": "j"}) == {}
    assert events.take() == [(S, "null")]
    assert await reply(daemon, "query-jobs") == []


async def test_cancel_of_paused_job_resumes_then_aborts() -> None:
    daemon, events = await new_daemon()
    job = StepJob(daemon.jobs, "j", auto_finalize=False, auto_dismiss=False)
    daemon.jobs.add(job)
    job.gate.clear()
    job.start()
    await reply(daemon, "job-pause", {"id": "j"})
    job.gate.set()
    await until(lambda: job.status == "paused")
    assert (await reply(daemon, "query-block-jobs"))[0]["paused"] is True
    events.take()
    assert await reply(daemon, "job-cancel", {"id": "j"}) == {}
    await until(lambda: job.status == "concluded")
    assert events.take() == [
        (S, "running"),
        (S, "aborting"),
        ("BLOCK_JOB_CANCELLED", progress(job)),
        (S, "concluded"),
    ]
    info = (await reply(daemon, "query-block-jobs"))[0]
    assert info["error"] == "Operation canceled" and info["paused"] is False
    assert await reply(daemon, "job-finalize", {"id": "j"}) == (
        "error",
        "GenericError",
        "Job 'j' in state 'concluded' cannot accept command verb 'finalize'",
    )


async def test_ready_standby_complete() -> None:
    daemon, events = await new_daemon()
    job = StepJob(daemon.jobs, "j", ready=True, auto_finalize=False, auto_dismiss=False)
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.status == "ready")
    assert events.take() == [
        (S, "created"),
        (S, "running"),
        (S, "ready"),
        ("BLOCK_JOB_READY", progress(job)),
    ]
    await reply(daemon, "block-job-pause", {"device": "j"})
    await until(lambda: job.status == "standby")
    assert await reply(daemon, "block-job-pause", {"device": "j"}) == (
        "error",
        "GenericError",
        "Job is already paused",
    )
    await reply(daemon, "block-job-resume", {"device": "j"})
    await until(lambda: job.status == "ready")
    assert events.take() == [(S, "standby"), (S, "ready")]
    assert await reply(daemon, "job-dismiss", {"id": "j"}) == (
        "error",
        "GenericError",
        "Job 'j' in state 'ready' cannot accept command verb 'dismiss'",
    )
    assert await reply(daemon, "block-job-complete", {"device": "j"}) == {}
    await until(lambda: job.status == "pending")
    assert events.take() == [
        (S, "waiting"),
        (S, "pending"),
        ("BLOCK_JOB_PENDING", {"type": "mirror", "id": "j"}),
    ]
    await reply(daemon, "block-job-finalize", {"id": "j"})
    await reply(daemon, "block-job-dismiss", {"id": "j"})
    assert events.take() == [("BLOCK_JOB_COMPLETED", progress(job)), (S, "concluded"), (S, "null")]


async def test_soft_cancel_of_ready_job_completes() -> None:
    daemon, events = await new_daemon()
    job = StepJob(daemon.jobs, "j", ready=True)
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.status == "ready")
    events.take()
    assert await reply(daemon, "block-job-cancel", {"device": "j"}) == {}
    await until(lambda: job.status == "null")
    assert events.take() == [
        (S, "waiting"),
        (S, "pending"),
        ("BLOCK_JOB_COMPLETED", progress(job)),
        (S, "concluded"),
        (S, "null"),
    ]


async def test_failure_reports_error_in_completed_event() -> None:
    daemon, events = await new_daemon()
    job = StepJob(daemon.jobs, "j", fail="Input/output error", auto_dismiss=False)
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.status == "concluded")
    assert events.take() == [
        (S, "created"),
        (S, "running"),
        (S, "aborting"),
        ("BLOCK_JOB_COMPLETED", progress(job, error="Input/output error")),
        (S, "concluded"),
    ]
    assert (await reply(daemon, "query-jobs"))[0]["error"] == "Input/output error"


async def test_cancel_in_pending_aborts_at_once() -> None:
    daemon, events = await new_daemon()
    job = StepJob(daemon.jobs, "j", auto_finalize=False)
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.status == "pending")
    events.take()
    assert await reply(daemon, "job-cancel", {"id": "j"}) == {}
    assert events.take() == [
        (S, "aborting"),
        ("BLOCK_JOB_CANCELLED", progress(job)),
        (S, "concluded"),
        (S, "null"),
    ]


async def test_drain_pauses_the_job_until_the_drained_section_ends(graph) -> None:
    from qsd_py.block.perm import PERM_ALL, Perm

    daemon, events = await new_daemon()
    node = await graph.add({"driver": "null-co", "node-name": "n0", "size": 1 << 20})
    job = StepJob(daemon.jobs, "j", steps=1000)
    job.use_node(node, Perm.CONSISTENT_READ, PERM_ALL, "source")
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.current_progress > 0)
    async with node.drained():
        assert job.status == "paused" and not job.busy
        seen = job.current_progress
        for _ in range(20):
            await until(lambda: True)
        assert job.current_progress == seen  # no step while drained
    await until(lambda: job.current_progress > seen)
    assert [e for e in events.take() if e[0] == S][-2:] == [(S, "paused"), (S, "running")]
    await reply(daemon, "job-cancel", {"id": "j"})
    await until(lambda: job.status == "null")
    assert "job:j:n0" not in node.users  # clean() let go of the node


def test_rate_limit_holds_over_seconds() -> None:
    """10 MiB in 64 KiB pieces at 1 MiB/s: the waits add up to ~10 s of (fake) time,
    whatever the piece size, and no limit means no wait."""
    now = [0.0]
    limit = RateLimit(1 << 20, clock=lambda: now[0])
    for _ in range(160):
        now[0] += limit.delay(65536)
    assert 9.8 <= now[0] <= 10.1
    now[0], big = 0.0, RateLimit(1 << 20, clock=lambda: now[0])
    for _ in range(5):
        now[0] += big.delay(2 << 20)  # pieces larger than a slice's quota
    assert 9.8 <= now[0] <= 10.1
    assert RateLimit(0).delay(1 << 30) == 0


async def test_set_speed_wakes_a_sleeping_job() -> None:
    daemon, _ = await new_daemon()
    job = StepJob(daemon.jobs, "j", speed=1, steps=2)  # 64 KiB at 1 B/s: a long sleep
    daemon.jobs.add(job)
    job.start()
    await until(lambda: job.timer_pending)
    info = (await reply(daemon, "query-block-jobs"))[0]
    assert info["busy"] is False and info["speed"] == 1
    assert await reply(daemon, "block-job-set-speed", {"device": "j", "speed": 0}) == {}
    await until(lambda: job.status == "null")


async def test_shutdown_cancels_every_job() -> None:
    """Daemon.close (quit, SIGTERM): running, paused, pending and concluded jobs all end
    and are gone, as QEMU's job_cancel_sync_all leaves none."""
    daemon, events = await new_daemon()
    jobs = {
        "run": StepJob(daemon.jobs, "run", steps=10**6),
        "paused": StepJob(daemon.jobs, "paused", steps=10**6),
        "pend": StepJob(daemon.jobs, "pend", auto_finalize=False),
        "done": StepJob(daemon.jobs, "done", auto_dismiss=False),
    }
    for job in jobs.values():
        daemon.jobs.add(job)
        job.start()
    await reply(daemon, "job-pause", {"id": "paused"})
    await until(lambda: jobs["pend"].status == "pending" and jobs["done"].status == "concluded")
    await until(lambda: jobs["paused"].status == "paused")
    await daemon.close()
    assert list(daemon.jobs) == []
    ends = [e for e in events.take() if e[0] != S]
    assert ("BLOCK_JOB_CANCELLED", progress(jobs["run"]) | {"device": "run"}) in ends
    assert all(job.status == "null" for job in jobs.values())
