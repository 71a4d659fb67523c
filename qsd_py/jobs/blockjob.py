"""Block jobs: jobs that work on nodes (mirror, commit, stream, backup), as QEMU's BlockJob.

On top of :class:`~qsd_py.jobs.job.Job` a block job has what ``query-block-jobs`` shows
(``len``/``offset`` are its progress, a speed, an I/O status), sends the ``BLOCK_JOB_*``
events at QEMU's places and obeys a speed limit measured over time slices
(:mod:`qsd_py.jobs.ratelimit`): the work calls :meth:`BlockJob.ratelimit` with the bytes it
moved and sleeps as long as they are worth.

A block job uses nodes as a :class:`~qsd_py.block.perm.NodeUser` whose ``quiesce`` pauses
it: a drain of such a node (a pivot, a graph change, another job) waits until the job sits
in a pause point, and lets it go on afterwards. Graph changes at the end of a job (mirror's
pivot) happen in :meth:`commit` through the block layer's children (``Child.replace``),
never by reaching into an export.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.block.perm import NodeUser, Perm
from qsd_py.errors import QMPError
from qsd_py.jobs import state as st
from qsd_py.jobs.job import Job
from qsd_py.jobs.ratelimit import RateLimit

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry


class BlockJob(Job):
    """A job on nodes: speed, ``query-block-jobs`` and the ``BLOCK_JOB_*`` events."""

    def __init__(
        self, registry: JobRegistry, job_id: str, *, speed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(registry, job_id, **kwargs)
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self.limit = RateLimit(speed)
        self.io_status = "ok"
        self._used: list[BlockNode] = []

    # --- nodes ----------------------------------------------------------------------------
    def use_node(self, node: BlockNode, perm: Perm, shared: Perm, role: str) -> None:
        """Hold ``perm`` on ``node`` (sharing ``shared``) until :meth:`release_nodes`; a
        drain of the node pauses the job."""
        desc = f"block job '{self.id}' (uses node '{node.node_name}' as '{role}' child)"
        node.set_user(NodeUser(self._user_key(node), perm, shared, desc, quiesce=self._quiesce))
        self._used.append(node)

    def nodes_used(self) -> list[BlockNode]:
        """The nodes the job holds, in the order it took them (x-debug-query-block-graph
        lists its edges so)."""
        return list(self._used)

    def release_nodes(self) -> None:
        for node in self._used:
            node.remove_user(self._user_key(node))
        self._used.clear()

    def _user_key(self, node: BlockNode) -> str:
        return f"job:{self.id}:{node.node_name}"

    async def _quiesce(self) -> Callable[[], Awaitable[None]]:
        """Drain: pause the job and wait until it is in a pause point (or done); what is
        returned lets it go on and waits until it has (its ``running`` is sent then)."""
        self.pause()
        await self.wait_paused()
        return self.drain_end

    # --- speed ----------------------------------------------------------------------------
    def set_speed(self, speed: int) -> None:
        """block-job-set-speed: a faster limit wakes a job sleeping off the slower one."""
        st.check_verb(self.id, self.status, "set-speed")
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        old, self.speed = self.speed, speed
        self.limit.set_speed(speed)
        if speed and speed <= old:
            return
        if self.timer_pending:
            self.enter()

    def set_speed_initial(self, speed: int) -> None:
        """The speed a job is created with (checked by the caller, after ``created``)."""
        self.speed = speed
        self.limit.set_speed(speed)

    async def ratelimit(self, nbytes: int) -> None:
        """Account ``nbytes`` moved; sleep (a pause point) when over the limit, again after
        a pause (a drain) cut the sleep short: the bytes are slept off all the same."""
        delay = self.limit.delay(nbytes)
        await self.sleep(delay)
        await self.ratelimit_sleep()

    async def ratelimit_sleep(self) -> None:
        """QEMU's block_job_ratelimit_sleep: sleep off what the bytes accounted so far owe,
        again after a pause cut the sleep short, unless cancelled."""
        while (delay := self.limit.delay(0)) and not self.is_cancelled:
            await self.sleep(delay)

    # --- queries and events ---------------------------------------------------------------
    def block_info(self) -> dict[str, Any]:
        """QAPI's BlockJobInfo (query-block-jobs)."""
        out: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.total_progress,
            "offset": self.current_progress,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.is_ready,
            "status": self.status,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            out["error"] = self.error
        out.update(self.type_info())
        return out

    def type_info(self) -> dict[str, Any]:
        """The members of BlockJobInfo's branch for this job type (mirror: actively-synced)."""
        return {}

    def _progress(self) -> dict[str, Any]:
        """The data of BLOCK_JOB_READY/COMPLETED/CANCELLED, in the order QEMU writes them
        (its QDict's hash buckets: device, len, offset, speed, type, then error)."""
        return {
            "device": self.id,
            "len": self.total_progress,
            "offset": self.current_progress,
            "speed": self.speed,
            "type": self.job_type,
        }

    def on_ready(self) -> None:
        self.registry.emit_event("BLOCK_JOB_READY", self._progress())

    def on_pending(self) -> None:
        self.registry.emit_event("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def on_completed(self) -> None:
        data = self._progress()
        if self.error is not None:
            data["error"] = self.error
        self.registry.emit_event("BLOCK_JOB_COMPLETED", data)

    def on_cancelled(self) -> None:
        self.registry.emit_event("BLOCK_JOB_CANCELLED", self._progress())

    def report_error(self, operation: str, action: str) -> None:
        """BLOCK_JOB_ERROR: an I/O error (``read``/``write``) handled by ``action``
        (``ignore``, ``report``, ``stop``), as on-source-error/on-target-error decide."""
        self.registry.emit_event(
            "BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": action}
        )

    def take_nodes(self) -> None:
        """Become a user of the job's nodes (permissions); a job kind says which."""

    #: QEMU 11.1's drained sections of every node as a job of this kind is created: how
    #: many before the one it is created in, and after that one (measured: the events of
    #: another running job); then as it ends, before its COMPLETED/CANCELLED event, when
    #: its work succeeded and when it is aborted (one more follows once it is gone).
    creation_drains: ClassVar[tuple[int, int]] = (0, 0)
    end_drains: ClassVar[tuple[int, int]] = (0, 0)
    graph: BlockGraph

    async def launch_drained(self, speed: int) -> None:
        """:meth:`launch` within QEMU's drained sections (:attr:`creation_drains`)."""
        await self.register_drained(speed)
        self.start()

    async def register_drained(self, speed: int) -> None:
        """:meth:`register` within QEMU's drained sections, the job created in one."""
        before, after = self.creation_drains
        await self.graph.drain_all(before)
        async with self.graph.drained_all():
            self.register(speed)
        await self.graph.drain_all(after)

    async def ending_drains(self) -> None:
        done, aborted = self.end_drains
        count = done if self.error is None and not self.is_cancelled else aborted
        if count:  # a kind without drains needs no graph
            await self.graph.drain_all(count)

    async def gone_drains(self) -> None:
        if any(self.end_drains):
            await self.graph.drain_all()

    def launch(self, speed: int) -> None:
        """Register the job, then (as QEMU: the job exists first, so a refusal from here on
        is seen as created, then null) check ``speed``, take the nodes and start."""
        self.register(speed)
        self.start()

    def register(self, speed: int) -> None:
        """:meth:`launch` but the start (a transaction starts its jobs in its commit)."""
        self.registry.add(self)
        try:
            if speed < 0:
                raise QMPError("Parameter 'speed' expects a non-negative value")
            self.set_speed_initial(speed)
            self.take_nodes()
        except BaseException:
            self.release_nodes()
            self.drop()
            raise

    def io_error(self, err: OSError, operation: str, policy: str) -> None:
        """QEMU's block_job_error_action: ``report`` fails the job (``err`` is raised),
        ``ignore`` goes on, ``stop`` pauses it as if the user had (io-status says why);
        ``enospc`` and ``auto`` stop on ENOSPC only. BLOCK_JOB_ERROR says which."""
        nospace = err.errno == errno.ENOSPC
        if policy in ("enospc", "auto"):
            policy = "stop" if nospace else "report"
        self.report_error(operation, policy)
        if policy == "report":
            raise err
        if policy == "stop":
            self.io_status = "nospace" if nospace else "failed"
            if not self.user_paused:  # several requests in flight may fail: one pause
                self.user_paused = True
                self.pause()

    def user_resume(self) -> None:
        super().user_resume()
        self.io_status = "ok"

    async def clean(self) -> None:
        self.release_nodes()
