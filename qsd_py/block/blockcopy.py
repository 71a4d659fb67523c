"""Copying a node's clusters to a target once each, by whoever needs them first (QEMU's
block-copy state): the backup job's loop, or a write about to overwrite a cluster on the
source (the copy-before-write filter, drivers/copy_before_write.py).

``todo`` is a :class:`~qsd_py.block.dirty.DirtyBitmap` of the clusters still to copy (all of
them, a bitmap's, or what the source's top layer holds); ``done`` the clusters copied. A run
being copied is marked busy until its copy ends: another caller needing one of its clusters
waits for it and then looks again (a failed copy leaves the cluster to copy), so no cluster
is read twice from the source and no write lands on the source before its cluster's copy has
read the old bytes. Ranges the source reads as zeroes are zeroed on the target (always, as
QEMU's: a fleecing target would otherwise read them through to the source, which may
change); ``compress`` writes whole clusters compressed.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from qsd_py.block.copybuf import BufferPool
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.node import STATUS_ALLOCATED, STATUS_ZERO

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode

CLUSTER_SIZE_DEFAULT = 65536  # QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT
MAX_CHUNK = 1 << 20  # bytes per read/write of a copy
BUSY_POLL_S = 0.0005  # how often a caller looks whether another's copy is done


class CopyError(OSError):
    """A failed copy: ``operation`` says which side failed (``read``: the source,
    ``write``: the target), for the job's on-source-error/on-target-error."""

    def __init__(self, err: OSError, operation: str) -> None:
        super().__init__(err.errno or errno.EIO, err.strerror or str(err))
        self.operation = operation


def cluster_size_for(target: BlockNode, min_cluster_size: int = 0) -> int:
    """QEMU's block_copy_calculate_cluster_size: the target's cluster size, at least 64 KiB
    and at least ``min_cluster_size``."""
    cluster = int(target.image_extra().get("cluster-size", 0) or 0)
    return max(min_cluster_size, CLUSTER_SIZE_DEFAULT, cluster)


class BlockCopy:
    """Clusters of ``source`` to copy to ``target`` at most once each."""

    def __init__(self, source: BlockNode, target: BlockNode, cluster_size: int) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.shift = cluster_size.bit_length() - 1
        # Whole clusters, the last one too: QEMU's progress counts them so.
        self.length = source.length()
        whole = -(-self.length // cluster_size) * cluster_size
        self.todo = DirtyBitmap(whole, cluster_size)
        self.todo.mark_all()
        self.done = DirtyBitmap(whole, cluster_size)
        self.compress = False
        self.discard_source = False
        self.max_chunk = MAX_CHUNK
        self.buffers = BufferPool(MAX_CHUNK)  # aligned: no bounce buffer for O_DIRECT
        #: Called with the bytes of every finished copy (the job's progress).
        self.on_progress: Callable[[int], None] | None = None
        self._busy: dict[int, None] = {}  # clusters being copied
        self.lock = threading.Lock()  # the copy state is shared by callers on any loop

    def reset(self, offset: int, length: int) -> None:
        """Nothing of ``[offset, +length)`` needs copying any more."""
        with self.lock:
            self.todo.clear(offset, length)

    async def reset_unallocated(self) -> None:
        """Drop the clusters the source's top layer does not hold (sync ``top``: the target
        reads them from the same backing chain)."""
        offset = 0
        while offset < self.length:
            st = await self.source.block_status(offset, self.length - offset)
            if not st.flags & STATUS_ALLOCATED:
                first = -(-offset // self.cluster_size) * self.cluster_size
                last = (offset + st.length) // self.cluster_size * self.cluster_size
                if offset + st.length >= self.length:
                    last = self.length
                if last > first:
                    self.reset(first, last - first)
            offset += st.length

    async def copy(self, offset: int, length: int) -> int:
        """Copy what still needs copying of the clusters of ``[offset, +length)``; the data
        bytes copied (zeroes not counted). Raises :class:`CopyError`."""
        pos = offset >> self.shift << self.shift
        end = min(offset + length, self.length)
        copied = 0
        while pos < end:
            claim = self._claim(pos, end)
            if claim is None:
                break
            start, n = claim
            if not n:  # another caller copies the cluster at ``start``: look again after it
                await asyncio.sleep(BUSY_POLL_S)
                pos = start
                continue
            copied += await self._copy_claimed(start, n)
            pos = start + n
        return copied

    def _claim(self, pos: int, end: int) -> tuple[int, int] | None:
        """The next run to copy in ``[pos, end)``, now claimed; ``(start, 0)`` when its first
        cluster is another caller's; None when nothing is left. Callers may run on other
        loops (exports in iothreads): the lock makes the look and the claim one step."""
        with self.lock:
            run = self.todo.next_dirty(pos, min(end - pos, self.max_chunk))
            if run is None or run[0] >= end:
                return None
            start, n = run
            n = min(n, self.max_chunk, self.length - start)
            first = start >> self.shift
            last = (start + n - 1) >> self.shift
            busy = next((i for i in range(first, last + 1) if i in self._busy), None)
            if busy == first:
                return start, 0
            if busy is not None:
                n = (busy << self.shift) - start
            self._busy.update(dict.fromkeys(range(first, ((start + n - 1) >> self.shift) + 1)))
            return start, n

    async def _copy_claimed(self, start: int, n: int) -> int:
        """Copy one claimed run, mark it done, let go of it."""
        clusters = range(start >> self.shift, ((start + n - 1) >> self.shift) + 1)
        try:
            copied = await self._copy_run(start, n)
            with self.lock:
                self.todo.clear(start, n)
                self.done.mark(start, n)
        finally:
            with self.lock:
                for i in clusters:
                    self._busy.pop(i, None)
        if self.on_progress is not None:
            self.on_progress(len(clusters) << self.shift)
        if self.discard_source:
            await self.source.discard(start, n)
        return copied

    async def _copy_run(self, start: int, n: int) -> int:
        end, pos, copied = start + n, start, 0
        while pos < end:
            try:
                st = await self.source.block_status_above(pos, end - pos)
            except OSError as err:
                raise CopyError(err, "read") from err
            step = min(st.length, end - pos)
            if self.compress:
                step = end - pos  # whole clusters, read as data
            if st.flags & STATUS_ZERO and not self.compress:
                await self._zero(pos, step)
            else:
                await self._copy_data(pos, step)
                copied += step
            pos += step
        return copied

    async def _copy_data(self, offset: int, n: int) -> None:
        mm, buf = self.buffers.take(n)
        try:
            try:
                await self.source.read(offset, buf)
            except OSError as err:
                raise CopyError(err, "read") from err
            try:
                if self.compress:
                    await self._write_compressed(offset, buf)
                else:
                    await self.target.write(offset, buf)
            except OSError as err:
                raise CopyError(err, "write") from err
        finally:
            self.buffers.give(mm, buf)

    async def _write_compressed(self, offset: int, buf: memoryview) -> None:
        """Through the target's compressed writes (whole clusters of the target's, but for
        the end of the node)."""
        await self.target.write_compressed(offset, buf)  # type: ignore[attr-defined]

    async def _zero(self, offset: int, n: int) -> None:
        try:
            await self.target.write_zeroes(offset, n)
        except OSError as err:
            raise CopyError(err, "write") from err
