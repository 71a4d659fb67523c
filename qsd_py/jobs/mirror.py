"""The ``mirror`` block job (blockdev-mirror, drive-mirror): copy a node while it is written,
then let its users carry on with the copy.

As QEMU's, the job puts a ``mirror_top`` filter node above the source
(qsd_py/block/drivers/mirror_top.py) and moves the source's exports onto it; the job's
bitmap is on the filter (``self.top``), which the exports' fast path sees through to the
source. The pivot moves the filter's users to the target; any other end moves them back.

The job keeps a :class:`~qsd_py.block.dirty.DirtyBitmap` on the source from its creation on,
so every write the source takes marks its chunks. In ``background`` copy mode the bitmap is
a shared one (qsd_py/block/shared_bits.py), as a user's: the exports' fast paths (NBD, FUSE
and its queue workers) keep writing around the node's coroutines and mark it themselves,
after their data write and before their reply. The copy loop takes the first dirty run of
chunks, clears it, reads it from the source and writes it to the target (or zeroes the
target where the source reads as zeroes); a write landing meanwhile marks the chunks again,
since marks come after a write has finished, and a run dirtied again while its copy is in
flight waits for that copy before it is copied anew (:meth:`MirrorJob._conflicts`).

Before the final catch-up (``job-complete``) the job *seals* the source: its fast plans are
closed to writes and the fast writes already past their plan's check are waited for
(:meth:`BlockNode.settle_fast_writes`: the queue workers take a new plan, the daemon's queues
and connections finish their transfers), so from then on every write passes through the node
(counted in flight, marked by it) and the catch-up's "nothing dirty, nothing in flight" is
final. The seal lasts until the pivot moved the users, or the job ends otherwise.

What is dirty at the start: every chunk (``sync`` full), the chunks the top layer holds
(``top``), nothing (``none``).

Once nothing is dirty the job is ``ready`` (``BLOCK_JOB_READY``) and keeps copying what new
writes dirty. ``job-complete`` seals the source and ends the loop after one more pass over
what is dirty, then the target is flushed (a pass, not "until clean": writers that never
pause would keep it going); :meth:`MirrorJob.commit` quiesces the exports that will follow
(``NodeUser.quiesce``: NBD connections and FUSE queues start no request and finish theirs),
catches up until nothing is dirty and nothing is in flight, then moves every user of the
replaced node that can follow (exports, through ``NodeUser.repoint``) and every parent node
(``Child.replace``) to the target, with no await between the last check and the move: no
write is lost. (The filter's users cannot be other nodes or jobs: the source was a root node. QEMU
drains the whole node, which is why it emits ``standby``/``ready`` where qsd-py does not.)
A soft cancel in ``ready`` (``block-job-cancel`` without force)
completes the same way without the move, as QEMU's does.

``copy-mode`` ``write-blocking``: a write the source takes is also written to the target
before it completes (the chunks are still marked, so the loop copies them once more: that
keeps the loop's reads race-free at the cost of a second copy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qsd_py.block.child import replace_node
from qsd_py.block.copybuf import BufferPool
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.drivers import mirror_top
from qsd_py.block.node import STATUS_ALLOCATED, STATUS_ZERO
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.errors import QMPError
from qsd_py.jobs import state as st
from qsd_py.jobs.blockjob import BlockJob
from qsd_py.jobs.inflight import CopiesInFlight

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry

log = logging.getLogger(__name__)

GRANULARITY_MIN = 512
GRANULARITY_MAX = 64 << 20
DEFAULT_BUF_SIZE = 16 << 20  # QEMU's DEFAULT_MIRROR_BUF_SIZE
COPY_MAX = 1 << 20  # bytes per read/write of the copy loop
MAX_IN_FLIGHT = 16  # copies at once (QEMU's MAX_IN_FLIGHT)
IDLE_WAIT = 1.0  # ready and clean: wait this long for a write (a write wakes the job)
IDLE_POLL = 0.1  # the same with a shared bitmap, whose fast-path marks wake nobody


def default_granularity(target: BlockNode) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the target's cluster size within
    [4 KiB, 64 KiB], else 64 KiB."""
    cluster = getattr(target, "cluster_size", 0)
    if cluster:
        return min(65536, max(4096, cluster))
    return 65536


def check_granularity(granularity: int) -> None:
    if not GRANULARITY_MIN <= granularity <= GRANULARITY_MAX:
        raise QMPError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise QMPError("Parameter 'granularity' expects a power of 2")


class MirrorJob(BlockJob):
    """One mirror from ``source`` to ``target``; ``replaces`` is the node whose users move."""

    job_type = "mirror"
    creation_drains = (2, 2)
    end_drains = (4, 4)  # a pivot not measured

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        replaces: BlockNode,
        sync: str,
        granularity: int,
        buf_size: int,
        on_source_error: str = "report",
        on_target_error: str = "report",
        copy_mode: str = "background",
        unmap: bool = True,
        target_is_zero: bool = False,
        filter_node_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(registry, job_id, **kwargs)
        self.target_is_zero = target_is_zero
        self.filter_node_name = filter_node_name
        self.filter: mirror_top.MirrorTopNode | None = None
        self.top: BlockNode = source  # where the job's bitmap is: the filter once inserted
        self.graph = graph
        self.source = source
        self.target = target
        self.replaces = replaces
        self.sync = sync
        self.granularity = granularity
        self.copy_size = max(granularity, min(buf_size, COPY_MAX))
        self.buffers = BufferPool(self.copy_size)
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.copy_mode = copy_mode
        self.unmap = unmap
        self.should_complete = False
        self.bitmap = DirtyBitmap(source.length(), granularity, on_mark=self._on_mark)
        self._idle = False
        self._final = False  # commit's catch-up: errors fail, no speed limit, no pause
        self._ops = CopiesInFlight()  # copies in flight
        self._in_flight_bytes = 0
        self._cursor = 0
        self._failed: Exception | None = None  # an error of a copy in flight, to raise
        self._seal_key = object()  # the source's fast writes closed for the end: _seal
        self._sealed = False

    # --- nodes ----------------------------------------------------------------------------
    def take_nodes(self) -> None:
        """Put the ``mirror_top`` filter above the source (its exports move to it), hold
        the source and the target, and start tracking the filter's writes."""
        src, tgt = self.source, self.target
        name = self.filter_node_name if self.uses_filter else None
        fil = name or self.graph.generate_name()
        if any(u.perm & Perm.RESIZE for u in src.users.values()):
            raise QMPError(
                f"Permission conflict on node '{fil}': permissions 'resize' are both required "
                f"by an unnamed block device (uses node '{fil}' as 'root' child) and unshared "
                f"by {self.job_type} job '{self.id}' (uses node '{fil}' as 'main node' child)."
            )
        if self.uses_filter:
            self.filter = self.top = mirror_top.insert(self.graph, src, fil, self.filter_reads)
            self._hold(self.filter, Perm.CONSISTENT_READ, "main node", parent=False)
            self._hold(src, Perm(0), "source", parent=True, quiesce=False)
        else:
            self._hold(src, Perm.CONSISTENT_READ, "source", parent=True)
        desc = f"an unnamed block device (uses node '{tgt.node_name}' as 'root' child)"
        try:
            perm, shared = self.target_perms()
            tgt.set_user(NodeUser(self._user_key(tgt), perm, shared, desc, quiesce=self._quiesce))
        except BaseException:
            self.release_nodes()
            raise
        self._used.append(tgt)
        if self.filter is not None:
            edge = f"{self.job_type} job '{self.id}' (uses node '{tgt.node_name}' as 'target' "
            edge += "child)"
            tgt.set_user(NodeUser(self._target_edge, Perm(0), PERM_ALL, edge, is_parent=True))
            mirror_top.put_above(self.filter)
        busy = f"block device is in use by block job: {self.job_type}"
        src.blockers[self.id] = busy
        tgt.blockers[self.id] = busy
        if self.copy_mode != "write-blocking":  # that one needs every write through the node
            self.bitmap.share()
        self.top.add_dirty_bitmap(self.bitmap)
        if self.filter is not None:
            self.filter.job_bitmap = self.bitmap
        if self.copy_mode == "write-blocking":
            self.top.write_mirrors.append(self.target)

    def _hold(
        self, node: BlockNode, perm: Perm, role: str, parent: bool, quiesce: bool = True
    ) -> None:
        """A use of ``node`` that lets others do all but resize, as QEMU's mirror; the
        source under a filter is held as QEMU's job does (no permission, a parent for
        blockdev-del), the drain reaching the job through the filter above it."""
        desc = f"{self.job_type} job '{self.id}' (uses node '{node.node_name}' as '{role}' child)"
        user = NodeUser(
            self._user_key(node),
            perm,
            PERM_ALL & ~Perm.RESIZE,
            desc,
            is_parent=parent,
            quiesce=self._quiesce if quiesce else None,
        )
        node.set_user(user)
        self._used.append(node)

    #: Whether the job puts QEMU's ``mirror_top`` filter above its source, and whether the
    #: filter passes its parents' consistent read on to the source.
    uses_filter = True
    filter_reads = True

    @property
    def _target_edge(self) -> str:
        """The key of the job's own link to the target (QEMU's ``target`` child, beside the
        BlockBackend it writes through), which the graph shows."""
        return f"job:{self.id}:{self.target.node_name}:target"

    def target_perms(self) -> tuple[Perm, Perm]:
        """What the job takes on the target and lets others do there: it writes, others
        may only write unchanged (an active commit's target, in the chain, shares more)."""
        return Perm.WRITE, Perm.WRITE_UNCHANGED

    def release_nodes(self) -> None:
        """Let go of the nodes; a filter nobody uses any more (its exports moved back to
        the source, or on to the target) leaves the graph."""
        top = self.top
        top.remove_dirty_bitmap(self.bitmap)
        top.open_fast_writes(self._seal_key)
        if self.target in top.write_mirrors:
            top.write_mirrors.remove(self.target)
        self.source.blockers.pop(self.id, None)
        self.target.blockers.pop(self.id, None)
        self.target.remove_user(self._target_edge)
        super().release_nodes()
        if self.filter is not None and not self.filter.users:
            mirror_top.discard(self.filter)
            self.filter = None

    def _on_mark(self) -> None:
        """A write dirtied the source: wake the job if it idles in ready (not if paused:
        waking a pause point would end the pause)."""
        if self._idle and not self.paused:
            self.enter()

    # --- the copy -------------------------------------------------------------------------
    async def run(self) -> None:
        await self.check_lengths()
        await self._initial_dirty()
        try:
            await self._loop()
        finally:
            await self._wait_ops()

    async def _loop(self) -> None:
        """Up to ``MAX_IN_FLIGHT`` copies at once, as QEMU's mirror; every pause point is
        reached with none in flight (a drain waits for the job's pause point, and must then
        find the source and the target idle)."""
        while True:
            if self.pause_count > 0 or self.is_cancelled:
                await self._wait_ops()
            await self.checkpoint()
            if self._failed is not None:
                await self._wait_ops()
                raise self._failed
            if self.cancelled or (self.should_complete and self.is_ready):
                await self._wait_ops()
                if self.should_complete and not self.cancelled:
                    await self._seal()
                    await self._catch_up()
                    await self.target.flush()
                return
            run = self._next_run()
            if run is not None:
                if len(self._ops) >= MAX_IN_FLIGHT or self._conflicts(*run):
                    await self._wait_one()
                else:
                    await self._dispatch(*run)
                continue
            if self._ops:
                await self._wait_one()
                continue
            if not self.is_ready:
                self.transition_to_ready()
                continue
            self._idle = True
            try:  # fast paths mark a shared bitmap without waking the job: look again soon
                await self.sleep(IDLE_POLL if self.bitmap.shared is not None else IDLE_WAIT)
            finally:
                self._idle = False

    def _next_run(self) -> tuple[int, int] | None:
        """The next dirty run from where the last one ended, wrapping round (QEMU's dirty
        iterator): a write behind the cursor waits for the next pass."""
        run = self.bitmap.next_dirty(self._cursor, self.copy_size)
        if run is None and self._cursor:
            run = self.bitmap.next_dirty(0, self.copy_size)
        if run is not None:
            self._cursor = run[0] + run[1]
        return run

    def _conflicts(self, offset: int, length: int) -> bool:
        """Whether a copy in flight overlaps the run (its chunks were dirtied again while
        it ran): the new copy must not overtake the old one's write."""
        end = offset + length
        hit = any(s < end and offset < e for s, e in self._ops.ranges())
        if hit:
            self._cursor = offset  # come back to it once the old copy is done
        return hit

    async def _dispatch(self, offset: int, length: int) -> None:
        """Clear the run and start its copies: one per block-status answer (data or
        zeroes); the speed limit counts the data as it is sent off (zeroes cost nothing)."""
        self.bitmap.clear(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            status = await self.source.block_status_above(pos, end - pos)
            n = status.length
            zero = bool(status.flags & STATUS_ZERO)
            self._ops.start(self._op(pos, n, zero), pos, pos + n)
            self._in_flight_bytes += n
            pos += n
            if not zero:
                delay = self.limit.delay(n)
                if delay:
                    await self._wait_ops()
                    await self.sleep(delay)

    async def _op(self, pos: int, n: int, zero: bool) -> None:
        """One copy in flight; a failure the policy survives leaves its chunks dirty, one
        it does not is kept for the job's loop to raise."""
        try:
            if zero:
                await self._zero(pos, n)
            else:
                await self._copy_data(pos, n)
        except _Retry:
            self.bitmap.mark(pos, n)
            return
        except Exception as err:  # noqa: BLE001 - handed to the job's loop
            if self._failed is None:
                self._failed = err
            return
        finally:
            self._in_flight_bytes -= n
        self.progress_update(n)
        self.set_remaining(self.bitmap.count + self._in_flight_bytes)

    async def _wait_one(self) -> None:
        await self._ops.wait_one()

    async def _wait_ops(self) -> None:
        """Until no copy is in flight."""
        await self._ops.wait_all()

    async def check_lengths(self) -> None:
        """Source and target must be as long (an active commit grows its base instead)."""
        if self.source.length() != self.target.length():
            raise QMPError("Source and target image have different sizes")

    async def _initial_dirty(self) -> None:
        """Mark what the copy starts with (QEMU 11.1's mirror_dirty_init). ``sync`` full
        onto a target that reads as zeroes marks only what the source's chain holds, as
        QEMU does: the rest reads as zeroes on both sides, so the job's ``len`` counts
        only the held bytes (0 for a fresh qcow2); onto any other target, everything."""
        if self.sync == "full" and not await self._target_is_zero():
            self.bitmap.mark_all()
        elif self.sync == "full":
            await self._mark_allocated(self._chain_allocated)
        elif self.sync == "top":
            await self._mark_allocated(self.top_allocated)
        self.set_remaining(self.bitmap.count)

    async def _mark_allocated(self, allocated_at: Any) -> None:
        """Mark every range ``allocated_at(offset, length)`` says is held."""
        length = self.source.length()
        offset = 0
        while offset < length:
            n, allocated = await allocated_at(offset, length - offset)
            if allocated:
                self.bitmap.mark(offset, n)
            offset += n
            await self.checkpoint()

    async def _target_is_zero(self) -> bool:
        """Whether the whole target reads as zeroes (``target-is-zero``, or its block
        status says so throughout: QEMU's bdrv_co_is_all_zeroes)."""
        if self.target_is_zero:
            return True
        length = self.target.length()
        offset = 0
        while offset < length:
            status = await self.target.block_status_above(offset, length - offset)
            if not status.flags & STATUS_ZERO:
                return False
            offset += status.length
        return True

    async def _chain_allocated(self, offset: int, length: int) -> tuple[int, bool]:
        """For ``sync`` full: whether some node of the source's chain holds the range."""
        status = await self.source.block_status_above(offset, length)
        return status.length, bool(status.flags & STATUS_ALLOCATED)

    async def top_allocated(self, offset: int, length: int) -> tuple[int, bool]:
        """For ``sync`` top: how much from ``offset`` has one answer, and whether the top
        layer holds it (an active commit asks the whole chain above its base)."""
        status = await self.source.block_status(offset, length)
        return status.length, bool(status.flags & STATUS_ALLOCATED)

    async def _copy(self, offset: int, length: int) -> None:
        """Copy one dirty run: zeroes where the source reads as zeroes, else data."""
        self.bitmap.clear(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            try:
                status = await self.source.block_status_above(pos, end - pos)
                n = status.length
                if status.flags & STATUS_ZERO:
                    await self._zero(pos, n)
                else:
                    await self._copy_data(pos, n)
            except _Retry:
                self.bitmap.mark(pos, end - pos)
                break
            pos += n
            self.progress_update(n)
            self.set_remaining(self.bitmap.count)
            if not self._final and not status.flags & STATUS_ZERO:  # zeroes cost no speed
                await self.ratelimit(n)

    async def _copy_data(self, offset: int, length: int) -> None:
        """Read from the source into an aligned buffer of the job's, write it out."""
        mm, buf = self.buffers.take(length)
        try:
            await self._source_read(offset, buf)
            await self._target_io(self.target.write(offset, buf))
        finally:
            self.buffers.give(mm, buf)

    async def _zero(self, offset: int, length: int) -> None:
        """Zero the target's range, unless it reads as zeroes already (a fresh target stays
        sparse, as QEMU's does)."""
        status = await self.target.block_status_above(offset, length)
        if status.flags & STATUS_ZERO and status.length >= length:
            return
        await self._target_io(self.target.write_zeroes(offset, length, unmap=self.unmap))

    async def _source_read(self, offset: int, buf: memoryview) -> None:
        try:
            await self.source.read(offset, buf)
        except OSError as err:
            self._io_error(err, "read", self.on_source_error)
            raise _Retry from err

    async def _target_io(self, coro: Any) -> None:
        try:
            await coro
        except OSError as err:
            self._io_error(err, "write", self.on_target_error)
            raise _Retry from err

    def _io_error(self, err: OSError, operation: str, policy: str) -> None:
        """The error policy (:meth:`BlockJob.io_error`); errors in the final catch-up,
        run while finalizing, always fail the job."""
        self.io_error(err, operation, "report" if self._final else policy)

    # --- user verbs -----------------------------------------------------------------------
    def can_complete(self) -> bool:
        return True

    def user_complete(self) -> None:
        st.check_verb(self.id, self.status, "complete")
        if not self.is_ready:
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        super().user_complete()

    def do_complete(self) -> None:
        self.should_complete = True
        self._on_mark()

    def cancel_hook(self, force: bool) -> bool:
        """A soft cancel of a ready mirror completes it without the pivot."""
        return force or not self.is_ready

    def type_info(self) -> dict[str, Any]:
        return {"actively-synced": self.copy_mode == "write-blocking" and self.is_ready}

    def drop_filter(self) -> None:
        """The filter's users go back to the source (a pivot moved them on already); the
        filter leaves the graph with :meth:`release_nodes`."""
        if self.filter is not None:
            mirror_top.take_away(self.filter, self.source)

    async def clean(self) -> None:
        """Take the filter away (its exports go back to the source unless a pivot moved
        them on), let go of the nodes; a target drive-mirror opened and nobody uses is
        closed."""
        self.drop_filter()
        self.release_nodes()
        await self.graph.drop_orphan(self.target)

    # --- the end --------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Before the pivot: ``run`` ended caught up and flushed; writes that came since (a
        job finalized by hand) are copied and flushed here, where a failure still fails the
        job."""
        if self.cancelled:
            return
        await self._seal()
        if await self._catch_up():
            await self.target.flush()

    async def commit(self) -> None:
        """Pivot, unless soft-cancelled. Nothing awaits between ``prepare`` and this, so the
        source is still caught up; the check and the move run with no await between them,
        so no write lands on the source afterwards unseen."""
        if self.cancelled:
            return
        resumes = await self._quiesce_followers()
        try:
            if self.bitmap.count or self.top.in_flight.count:  # writes since prepare
                try:
                    await self._catch_up(drained=True)
                    await self.target.flush()
                except OSError:
                    log.exception("mirror %s: no pivot, the last copy failed", self.id)
                    return
            self._pivot()
        finally:
            for resume in reversed(resumes):
                resume()

    async def _quiesce_followers(self) -> list[Any]:
        """Drain the users that will follow the pivot (exports): a request of theirs that
        started before the move, on an iothread, would otherwise reach the source after it."""
        resumes = []
        for user in list(self.top.users.values()):
            if user.repoint is not None and user.quiesce is not None and not user.is_parent:
                resumes.append(await user.quiesce())
        return resumes

    async def _seal(self) -> None:
        """From now on every write of the source passes through it: close its fast plans to
        writes and wait for the fast writes already started (they mark the shared bitmap
        once done), so that the catch-up's check sees every write. Undone by
        :meth:`release_nodes` (after the pivot moved the users, or when the job ends)."""
        if self._sealed:
            return
        self._sealed = True
        self.top.close_fast_writes(self._seal_key)
        await self.top.settle_fast_writes()

    async def _catch_up(self, drained: bool = False) -> bool:
        """Copy what is dirty (errors fail the job now, no speed limit); whether anything had
        to be done. ``drained`` (the pivot, its writers quiesced): until nothing is dirty and
        no request is in flight on the source. Else one pass from the start, which ends even
        under writes that never pause (the pivot's drained catch-up copies the rest)."""
        self._final = True
        worked = False
        pos = 0
        while self.bitmap.count or (drained and self.top.in_flight.count):
            worked = True
            run = self.bitmap.next_dirty(0 if drained else pos, self.copy_size)
            if run is not None:
                await self._copy(*run)
                pos = run[0] + run[1]
            elif drained:
                await self.top.in_flight.wait_idle()
            else:
                break
        return worked

    def _pivot(self) -> None:
        """Every parent and every user that can follow (those of the filter) now uses the
        target (no await)."""
        old, new = self.top, self.target
        # Removing the bitmap must not let an export write around ``old`` before it moved
        # (a FUSE queue worker, an iothread's NBD connection): closed until the end.
        old.close_fast_writes(self)
        try:
            fil = self.filter
            self.release_nodes()
            if fil is not None:
                mirror_top.take_away(fil, new)
                mirror_top.discard(fil)
                self.filter = None
            else:
                replace_node(old, new)
        finally:
            old.open_fast_writes(self)


class _Retry(Exception):
    """An I/O error that the job's policy lets it survive: the chunks stay dirty."""


# --- starting a mirror (blockdev-mirror, drive-mirror) ---------------------------------------
def lookup_source(graph: BlockGraph, jobs: JobRegistry, name: str) -> BlockNode:
    """The node to mirror: a root node (QEMU's qmp_get_root_bs). A node some mirror copies
    has its filter above it; the filter has the job as a parent in QEMU (a job's child is
    no root link), so it is no root either."""
    node = graph.lookup_device(name)
    held = any(isinstance(j, MirrorJob) and node in (j.source, j.filter) for j in jobs)
    if node.parents() or held:
        raise QMPError("Need a root block node")
    return node


def format_of(node: BlockNode) -> str:
    return node.driver


async def start(
    graph: BlockGraph, jobs: JobRegistry, source: BlockNode, target: BlockNode, args: dict
) -> MirrorJob:
    """Check the arguments as QEMU does, create the job (``created``), take the nodes (a
    refusal ends the job at once: ``null``) and start it."""
    sync = args["sync"]
    if sync in ("incremental", "bitmap"):
        raise QMPError(f"Sync mode '{sync}' not supported")
    for reason in source.blockers.values():
        raise QMPError(f"Node '{source.node_name}' is busy: {reason}")
    for reason in target.blockers.values():
        raise QMPError(f"Node '{target.node_name}' is busy: {reason}")
    granularity = args.get("granularity", 0)
    if granularity:
        check_granularity(granularity)
    else:
        granularity = default_granularity(target)
    buf_size = args.get("buf-size", 0)
    if buf_size < 0:
        raise QMPError("Invalid parameter 'buf-size'")
    replaces = source
    if "replaces" in args:
        replaces = graph.find(args["replaces"])  # type: ignore[assignment]
        if replaces is None:
            raise QMPError(f"Failed to find node with node-name='{args['replaces']}'")
        if replaces is not source:
            raise QMPError(
                f"Cannot replace '{replaces.node_name}' by a node mirrored from "
                f"'{source.node_name}', because it cannot be guaranteed that doing so would "
                "not lead to an abrupt change of visible data"
            )
    if source is target:
        raise QMPError("Can't mirror node into itself")
    name = args.get("filter-node-name")
    if name is not None:  # QEMU names the filter after these checks, before the job exists
        graph.check_new_name(name)
    job = MirrorJob(
        jobs,
        args.get("job-id", ""),  # no devices in a storage daemon: QEMU's default is ''
        graph=graph,
        source=source,
        target=target,
        replaces=replaces,
        sync=sync,
        granularity=granularity,
        buf_size=buf_size or DEFAULT_BUF_SIZE,
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        copy_mode=args.get("copy-mode", "background"),
        unmap=args.get("unmap", True),
        target_is_zero=args.get("target-is-zero", False),
        filter_node_name=name,
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
    )
    await job.launch_drained(args.get("speed", 0))
    return job
