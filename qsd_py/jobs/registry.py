"""Every job of a daemon by id: ids unique across job kinds, lookups with QEMU's texts.

``query-jobs`` and ``query-block-jobs`` list jobs newest first, as QEMU does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from qsd_py.block.graph import id_wellformed
from qsd_py.errors import QMPError
from qsd_py.jobs.blockjob import BlockJob
from qsd_py.jobs.job import Job

log = logging.getLogger(__name__)


class JobRegistry:
    """The jobs of one daemon, in creation order."""

    def __init__(self, emit_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.emit_event = emit_event
        self._jobs: dict[str, Job] = {}

    def __iter__(self):
        return iter(list(self._jobs.values()))

    def check_new_id(self, job_id: str) -> None:
        if not id_wellformed(job_id):
            raise QMPError(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise QMPError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> None:
        """List a new job and announce it (``created``); the caller starts it."""
        self.check_new_id(job.id)
        self._jobs[job.id] = job
        job.transition("created")

    def remove(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def find(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise QMPError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> BlockJob:
        job = self._jobs.get(job_id)
        if not isinstance(job, BlockJob):
            raise QMPError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    def query(self) -> list[dict[str, Any]]:
        return [job.info() for job in reversed(list(self._jobs.values()))]

    def query_block(self) -> list[dict[str, Any]]:
        jobs = reversed(list(self._jobs.values()))
        return [job.block_info() for job in jobs if isinstance(job, BlockJob)]

    async def drain_all_section(self, nodes: list[Any], every: bool = True) -> Callable[[], Any]:
        """Begin a drained section of every node for the block jobs (the graph's
        ``drain_all`` hook, given the nodes in creation order): each running one pauses;
        the coroutine returned ends the section.

        QEMU drains node by node in creation order and ends the sections the other way
        round; a job pauses with the first of its nodes and goes on with the last one to
        end. So jobs pause in the order of their oldest node, and go on in reverse.
        ``every`` False: the nodes are one drained node and those above it; only the jobs
        using one of them pause."""
        jobs = _by_oldest_node(self, nodes, every)
        paused = [job for job in jobs if await job.drain_begin()]

        async def end() -> None:
            for job in reversed(paused):
                await job.drain_end()

        return end

    async def cancel_all(self, timeout: float = 10.0) -> None:
        """Shutdown: cancel every job and wait for it to end (QEMU's job_cancel_sync_all);
        a job left concluded is dismissed."""
        for job in self:
            try:
                await job.cancel(force=True)
                await asyncio.wait_for(job.wait_finished(), timeout)
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("error while cancelling job %s", job.id)
            if job.status == "concluded":
                job.user_dismiss()


def _by_oldest_node(jobs: JobRegistry, nodes: list[Any], every: bool) -> list[BlockJob]:
    """The block jobs, ordered by the oldest node each uses (a user whose ``quiesce`` is
    the job's, or one keyed by the job: a mirror's source, drained through its filter);
    jobs using none last, oldest first (``every`` False: left out)."""
    by_id = {job.id: job for job in jobs}
    rank: dict[BlockJob, int] = {}
    for index, node in enumerate(nodes):
        for key, user in node.users.items():
            job = getattr(user.quiesce, "__self__", None)
            if job is None and key.startswith("job:"):
                job = by_id.get(key.split(":")[1])
            if isinstance(job, BlockJob) and job not in rank:
                rank[job] = index
    block_jobs = [job for job in jobs if isinstance(job, BlockJob) and (every or job in rank)]
    return sorted(block_jobs, key=lambda job: rank.get(job, len(nodes)))
