"""The ``copy-before-write`` filter: before a write overwrites clusters of the filter's
``file`` node, their old bytes are copied to the ``target`` node, as QEMU's filter does.
The target then holds, with what was never overwritten read from the file, the file's
contents at the filter's creation: what ``snapshot-access`` reads (image fleecing) and what
the backup job completes into a full copy (qsd_py/jobs/backup.py).

The copy is made in the file node's write path, by a gate of the file node
(``node.write_gates``, rangelock.py's interface), so that every write of the file takes it:
the writes that come through this filter, and those of users that stay on the file node
(an io_uring FUSE export cannot follow the graph change that puts the filter above it).
While the filter exists the file node's fast plans are closed to writes for the same reason.
The copies themselves are :class:`~qsd_py.block.blockcopy.BlockCopy`'s, shared with the
backup job. A write then waits for snapshot reads still reading the old bytes of its range
from the file.

``on-cbw-error``: ``break-guest-write`` fails the write with the copy's error;
``break-snapshot`` lets writes go on, copies nothing more and fails every snapshot read
(EACCES) from then on. ``cbw-timeout`` turns a copy slower than that into an error (ETIMEDOUT).
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

from qsd_py.block.blockcopy import BlockCopy, cluster_size_for
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.node import STATUS_ZERO, BlockNode, BlockStatus, Buffer
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

PERM_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
FROZEN_POLL_S = 0.0005  # how often a write looks whether snapshot reads of it are done


class _CbwGate:
    """The file node's write gate: copy first, then let the write go on."""

    def __init__(self, owner: CopyBeforeWriteNode) -> None:
        self.owner = owner

    async def enter(self, offset: int, length: int) -> None:
        await self.owner.before_write(offset, length)

    def leave(self, token: None) -> None:
        pass


class CopyBeforeWriteNode(BlockNode):
    driver = "copy-before-write"
    format_name = "copy-before-write"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.on_cbw_error: str = opts.get("on-cbw-error", "break-guest-write")
        self.cbw_timeout: int = opts.get("cbw-timeout", 0)
        self.bcs: BlockCopy | None = None
        self.access: DirtyBitmap | None = None  # clusters snapshot reads may still read
        self.copied_first: DirtyBitmap | None = None
        self.snapshot_error: OSError | None = None
        self._frozen: list[tuple[int, int]] = []  # snapshot reads of the file under way
        self._gate = _CbwGate(self)

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    @property
    def target(self) -> BlockNode:
        return self.children["target"].node

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        min_cluster = self.opts.get("min-cluster-size", 0)
        if min_cluster & (min_cluster - 1):
            raise QMPError(
                "Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
            )
        file = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", file, *self._file_perms(Perm(0), PERM_ALL))
        target = await self.graph.open_child(self, self.opts["target"])
        self.attach_child("target", target, Perm.WRITE, PERM_ALL & ~Perm.RESIZE)
        self.bcs = BlockCopy(file, target, cluster_size_for(target, min_cluster))
        self.access = DirtyBitmap(file.length(), self.bcs.cluster_size)
        self.access.mark_all()
        # Clusters a write found copied (by itself or earlier): QEMU's done bitmap.
        self.copied_first = DirtyBitmap(file.length(), self.bcs.cluster_size)
        if "bitmap" in self.opts:
            self._copy_only(self.opts["bitmap"])
        file.write_gates.append(self._gate)  # type: ignore[arg-type]
        file.close_fast_writes(self)

    def _copy_only(self, ref: dict[str, str]) -> None:
        """Option ``bitmap``: only its dirty chunks are copied."""
        node = self.graph.find(ref["node"])
        if node is None:
            raise QMPError(f"Node '{ref['node']}' not found")
        bitmap = node.dirty_bitmap(ref["name"])
        if bitmap is None:
            raise QMPError(f"Dirty bitmap '{ref['name']}' not found")
        assert self.bcs is not None
        self.bcs.todo.clear(0, self.bcs.length)
        copy_dirty_chunks(bitmap, self.bcs.todo)

    def close(self) -> None:
        file = self.child_node("file")
        if file is not None:
            if self._gate in file.write_gates:
                file.write_gates.remove(self._gate)  # type: ignore[arg-type]
            file.open_fast_writes(self)

    # --- permissions ----------------------------------------------------------------------
    def _file_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """The users' read/write/resize pass through; the filter reads for its copies."""
        keep = PERM_ALL & ~PERM_PASSTHROUGH
        return (perm & PERM_PASSTHROUGH) | Perm.CONSISTENT_READ, (shared & PERM_PASSTHROUGH) | keep

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "file" in self.children:
            self.attach_child("file", self.file, *self._file_perms(perm, shared))

    # --- the copy before a write ----------------------------------------------------------
    async def before_write(self, offset: int, length: int) -> None:
        """Copy the old bytes of the clusters ``[offset, +length)`` touches (unless done or
        the snapshot is broken), then wait for snapshot reads of them from the file."""
        if self.snapshot_error is not None or self.bcs is None:
            return
        try:
            await self._copy(offset, length)
        except OSError as err:
            if self.on_cbw_error == "break-guest-write":
                raise
            if self.snapshot_error is None:
                self.snapshot_error = err
        else:
            assert self.copied_first is not None
            cs = self.bcs.cluster_size
            start = offset // cs * cs
            self.copied_first.mark(start, -(-(offset + length) // cs) * cs - start)
        await self._wait_frozen(offset, length)

    async def _copy(self, offset: int, length: int) -> None:
        assert self.bcs is not None
        if not self.cbw_timeout:
            await self.bcs.copy(offset, length)
            return
        try:
            await asyncio.wait_for(self.bcs.copy(offset, length), self.cbw_timeout)
        except TimeoutError as err:
            raise OSError(errno.ETIMEDOUT, "copy-before-write timed out") from err

    async def _wait_frozen(self, offset: int, length: int) -> None:
        """Polls: the reads may run on another loop (an export in an iothread)."""
        while any(s < offset + length and offset < s + n for s, n in list(self._frozen)):
            await asyncio.sleep(FROZEN_POLL_S)

    # --- the snapshot (snapshot-access) -----------------------------------------------------
    def _check_snapshot(self, offset: int, length: int) -> None:
        assert self.access is not None
        if self.snapshot_error is not None:
            raise OSError(errno.EACCES, "the snapshot is broken")
        if length and not self._all_set(self.access, offset, length):
            raise OSError(errno.EACCES, "the range was discarded from the snapshot")

    @staticmethod
    def _all_set(bitmap: DirtyBitmap, offset: int, length: int) -> bool:
        pos, end = offset >> bitmap.shift << bitmap.shift, offset + length
        while pos < end:
            run = bitmap.next_dirty(pos, end - pos)
            if run is None or run[0] != pos:
                return False
            pos = run[0] + run[1]
        return True

    def _done_run(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether the cluster at ``offset`` was copied, and how far (within ``length``)
        the clusters from it share that answer."""
        assert self.bcs is not None
        done = self.bcs.done
        shift = done.shift
        end = offset + length
        first_done = done.next_dirty(offset >> shift << shift, end - offset)
        if first_done is not None and first_done[0] <= offset:
            return True, min(first_done[0] + first_done[1], end) - offset
        stop = end if first_done is None else min(first_done[0], end)
        return False, stop - offset

    async def snapshot_read(self, offset: int, buf: memoryview) -> None:
        """Read the point-in-time bytes: copied clusters from the target, the others from
        the file while writes of them wait (the look and the registration are one step under
        the copy state's lock: a write copies, marks done, then looks for such reads)."""
        self._check_snapshot(offset, len(buf))
        assert self.bcs is not None
        pos, end = offset, offset + len(buf)
        while pos < end:
            with self.bcs.lock:
                done, n = self._done_run(pos, end - pos)
                claim = (pos, n)
                if not done:
                    self._frozen.append(claim)
            part = buf[pos - offset : pos - offset + n]
            if done:
                await self.target.read(pos, part)
            else:
                try:
                    await self.file.read(pos, part)
                finally:
                    self._frozen.remove(claim)
            pos += n

    async def snapshot_block_status(self, offset: int, length: int) -> BlockStatus:
        self._check_snapshot(offset, length)
        done, n = self._done_run(offset, length)
        node = self.target if done else self.file
        st = await node.block_status_above(offset, n)
        if st.depth == 0 and not st.flags & STATUS_ZERO:
            st = st._replace(flags=st.flags | STATUS_ZERO)
        return st

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """The snapshot's reader needs ``[offset, +length)`` no more (whole clusters): drop
        it from the snapshot and the target, and copy nothing of it any more."""
        assert self.bcs is not None and self.access is not None
        cluster = self.bcs.cluster_size
        start = -(-offset // cluster) * cluster
        end = (offset + length) // cluster * cluster
        if offset + length >= self.bcs.length:
            end = self.bcs.length
        if end <= start:
            return
        self.access.clear(start, end - start)
        self.bcs.reset(start, end - start)
        await self.target.discard(start, end - start)

    # --- the filter's own I/O: passed to the file (whose gate copies) ----------------------
    def length(self) -> int:
        return self.file.length()

    async def do_truncate(self, length: int, prealloc: str) -> None:
        raise OSError(errno.ENOTSUP, "copy-before-write cannot be resized")

    async def do_allocated_size(self) -> int:
        return await self.file.allocated_size()

    def allocated_size_now(self) -> int | None:
        return 0

    async def do_read(self, offset: int, buf: memoryview) -> None:
        await self.file.read(offset, buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        await self.file.write(offset, data)

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        await self.file.write_zeroes(offset, length, unmap, no_fallback)

    async def do_discard(self, offset: int, length: int) -> None:
        await self.file.discard(offset, length)

    async def do_flush(self) -> None:
        await self.file.flush()

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        st = await self.file.block_status_above(offset, length)
        if st.depth == 0 and not st.flags & STATUS_ZERO:
            return st._replace(flags=st.flags | STATUS_ZERO)
        return st

    # --- introspection --------------------------------------------------------------------
    def dirty_bitmaps_info(self) -> list[dict[str, Any]]:
        """``dirty-bitmaps`` of query-named-block-nodes: QEMU's filter lists its three
        internal bitmaps, newest first: what snapshot reads may read, what writes had
        copied first, what is still to copy."""
        assert self.bcs is not None and self.access is not None
        assert self.copied_first is not None
        return [
            {
                "recording": False,
                "persistent": False,
                "busy": False,
                "granularity": self.bcs.cluster_size,
                "count": bitmap.count,
            }
            for bitmap in (self.access, self.copied_first, self.bcs.todo)
        ]

    def filename(self) -> str:
        """A filter shows its file's name (QEMU's bdrv_refresh_filename for filters)."""
        return self.file.filename()

    def full_options(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "file": self.file.full_options(),
            "target": self.target.full_options(),
        }

    def image_extra(self) -> dict[str, Any]:
        return {"dirty-flag": False}


def copy_dirty_chunks(bitmap: Any, into: DirtyBitmap) -> None:
    """Mark in ``into`` every range dirty in ``bitmap`` (a node's dirty bitmap, read through
    ``next_dirty``)."""
    pos = 0
    while True:
        run = bitmap.next_dirty(pos)
        if run is None:
            return
        into.mark(*run)
        pos = run[0] + run[1]


NODE = CopyBeforeWriteNode
