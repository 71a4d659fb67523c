"""The ``create`` job of blockdev-create: runs a block driver's image creation.

As in QEMU the job is no block job (no ``BLOCK_JOB_*`` events, not in query-block-jobs), is
finalized by itself and dismissed by the user; its progress goes from 0 to 1 of 1, and every
problem with the options is the job's error rather than the command's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd_py.jobs.job import Job

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.jobs.registry import JobRegistry

Creator = Callable[["BlockGraph", dict[str, Any]], Awaitable[None]]


class CreateJob(Job):
    job_type = "create"

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        graph: BlockGraph,
        create: Creator,
        options: dict[str, Any],
    ) -> None:
        super().__init__(registry, job_id, auto_finalize=True, auto_dismiss=False)
        self.graph = graph
        self.create = create
        self.options = options

    async def run(self) -> None:
        self.set_remaining(1)
        try:
            await self.create(self.graph, self.options)
        finally:
            self.progress_update(1)
