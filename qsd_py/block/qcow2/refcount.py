"""qcow2 reference counts: how many tables point at each host cluster, and allocation.

The refcount table (in memory, written through) points at refcount blocks (in the refcount
cache, written back). A cluster is free when its count is 0. New clusters are found by a
first-fit scan from a hint, as QEMU does; the file grows when nothing before its end is free.
A cluster that still has data I/O in flight (``busy``) is never handed out again, so a read
or write that looked up a mapping before a discard freed the cluster cannot land in a cluster
that meanwhile belongs to another guest range.

Growing the table when the image outgrows it places the new table and the refcount blocks it
needs at the end of the file, each block counting itself, writes them, then switches the
header to the new table in one 12-byte write and frees the old table: a crash before the
switch leaves only leaked clusters.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from qsd_py.block.qcow2.cache import MetaCache
from qsd_py.block.qcow2.entries import (
    REFT_OFFSET_MASK,
    get_refcount,
    refblock_unaligned_text,
    set_refcount,
)

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode

_U64 = struct.Struct(">Q")
_REFTABLE_HEADER = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
REFTABLE_HEADER_AT = 48
MAX_REFTABLE_ENTRIES = (8 << 20) // 8  # QEMU's QCOW_MAX_REFTABLE_SIZE
# Why a cluster is freed, for whether its discard reaches the file (QEMU's QCOW2_DISCARD_*,
# the pass-discard-* options). Metadata freed (old tables) is DISCARD_OTHER.
DISCARD_REQUEST, DISCARD_SNAPSHOT, DISCARD_OTHER, DISCARD_ALWAYS = range(4)


class RefcountError(OSError):
    """A refcount that would go below 0 or past its width: QEMU's EINVAL (the request
    fails; freeing reports it and leaks the clusters, see :meth:`Refcounts.free`)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class Refcounts:
    """The refcount table and blocks of one image, and its cluster allocator."""

    def __init__(
        self,
        file: Callable[[], BlockNode],
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table: list[int],
        cache: MetaCache,
    ) -> None:
        self._file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        # Entries per refcount block: cluster bits + 3 - refcount order.
        self.block_bits = cluster_bits + 3 - refcount_order
        self.table_offset = table_offset
        self.table = table
        self.version = 0  # bumped whenever the table changes (the overlap checks cache by it)
        self.cache = cache
        self.free_hint = 0  # no free cluster below this index
        self.high_water = 0  # no cluster at or past this index is in use (set at open)
        self.file_end = 0  # bytes the image file has at least (set at open)
        self.busy: dict[int, int] = {}  # host cluster index -> data requests in flight
        # Called with (offset, bytes, discard type) for clusters whose count went to 0.
        self.on_free: Callable[[int, int, int], Awaitable[None]] | None = None
        # Told about a refcount block found misplaced before the access fails (EIO).
        self.on_corruption: Callable[[str], Awaitable[None]] | None = None

    # --- reading ------------------------------------------------------------------------
    def _block_of(self, index: int) -> tuple[int, int]:
        """Which table slot covers cluster ``index``, and the cell in that block."""
        return index >> self.block_bits, index & ((1 << self.block_bits) - 1)

    async def get(self, index: int) -> int:
        slot, cell = self._block_of(index)
        if slot >= len(self.table):
            return 0
        block_off = self.table[slot] & REFT_OFFSET_MASK
        if not block_off:
            return 0
        if block_off & (self.cluster_size - 1):
            raise await self._misplaced(block_off, slot)
        block = await self.cache.get(block_off)
        return get_refcount(block, cell, self.order)

    async def _misplaced(self, block_off: int, slot: int) -> OSError:
        """A refcount block not at a cluster boundary (QEMU marks the image corrupt)."""
        text = refblock_unaligned_text(block_off, slot)
        if self.on_corruption is not None:
            await self.on_corruption(text)
        return OSError(errno.EIO, text)

    # --- changing -----------------------------------------------------------------------
    async def update(self, index: int, addend: int) -> int:
        """Add ``addend`` to cluster ``index``'s count; returns the new count. Refuses to go
        below 0 or past the width's maximum (RefcountError)."""
        block_off = await self._block_for(index)
        block = await self.cache.get(block_off)
        cell = index & ((1 << self.block_bits) - 1)
        value = get_refcount(block, cell, self.order) + addend
        if value < 0 or value > self.max_refcount:
            raise RefcountError(
                f"refcount of cluster {index} would become {value} (width {1 << self.order} bits)"
            )
        set_refcount(block, cell, self.order, value)
        self.cache.mark_dirty(block_off)
        if value == 0 and index < self.free_hint:
            self.free_hint = index
        return value

    async def _block_for(self, index: int) -> int:
        """The refcount block covering ``index``, allocated (and the table grown) if needed."""
        slot = index >> self.block_bits
        if slot >= len(self.table):
            if slot >= MAX_REFTABLE_ENTRIES:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))  # as QEMU refuses
            await self._grow_table(slot)
        block_off = self.table[slot] & REFT_OFFSET_MASK
        if not block_off:
            block_off = await self._new_block(slot)
        elif block_off & (self.cluster_size - 1):
            raise await self._misplaced(block_off, slot)
        return block_off

    async def _new_block(self, slot: int) -> int:
        """Allocate the refcount block for table ``slot``: in the first free cluster (which
        may lie in the range the block itself covers, then it counts itself)."""
        index = await self._find_free(1)
        self.hold(index)  # a block allocated by the update below must not take it too
        try:
            block = bytearray(self.cluster_size)
            own_slot, own_cell = self._block_of(index)
            if own_slot == slot:
                set_refcount(block, own_cell, self.order, 1)
            else:
                await self.update(index, 1)  # its count lives in another (maybe new) block
        finally:
            self.release(index)
        self.high_water = max(self.high_water, index + 1)
        offset = index << self.cluster_bits
        await self._cover(index + 1)
        # The block reaches the disk before the table entry that points at it.
        file = self._file()
        await self.cache.flush()
        await file.write(offset, block)
        await file.flush()
        self.table[slot] = offset
        self.version += 1
        await file.write(self.table_offset + 8 * slot, _U64.pack(offset))
        await file.flush()
        await self.cache.put(offset, block, dirty=False)
        return offset

    async def _grow_table(self, need_slot: int) -> None:
        """Move the table past the last used cluster, large enough for ``need_slot`` and
        for the new blocks that count the new table and themselves."""
        await self.cache.flush()
        start = self.high_water
        entries = max(need_slot + 1, 2 * len(self.table))
        new_slots: list[int] = []
        while True:
            table_clusters = -(-entries * 8 // self.cluster_size)
            area_end = start + table_clusters + len(new_slots)
            wanted = [
                s
                for s in range(start >> self.block_bits, ((area_end - 1) >> self.block_bits) + 1)
                if s >= len(self.table) or not self.table[s] & REFT_OFFSET_MASK
            ]
            if len(wanted) == len(new_slots) and (not wanted or wanted[-1] < entries):
                break
            new_slots = wanted
            entries = max(entries, wanted[-1] + 1)
        new_table = list(self.table) + [0] * (entries - len(self.table))
        blocks: dict[int, bytearray] = {}
        for i, slot in enumerate(new_slots):
            new_table[slot] = (start + table_clusters + i) << self.cluster_bits
            blocks[slot] = bytearray(self.cluster_size)
        for index in range(start, start + table_clusters + len(new_slots)):
            slot, cell = self._block_of(index)
            if slot in blocks:
                set_refcount(blocks[slot], cell, self.order, 1)
            else:
                await self.update(index, 1)  # a block that exists already
        self.high_water = start + table_clusters + len(new_slots)
        await self._cover(self.high_water)
        file = self._file()
        await self.cache.flush()
        for slot, buf in blocks.items():
            await file.write(new_table[slot], buf)
        table_bytes = b"".join(_U64.pack(e) for e in new_table)
        table_bytes += bytes(table_clusters * self.cluster_size - len(table_bytes))
        new_offset = start << self.cluster_bits
        await file.write(new_offset, table_bytes)
        await file.flush()
        await file.write(REFTABLE_HEADER_AT, _REFTABLE_HEADER.pack(new_offset, table_clusters))
        await file.flush()
        old_offset = self.table_offset
        old_bytes = len(self.table) * 8
        self.table, self.table_offset = new_table, new_offset
        self.version += 1
        for slot, buf in blocks.items():
            await self.cache.put(new_table[slot], buf, dirty=False)
        await self.free(old_offset, old_bytes)

    # --- allocation ---------------------------------------------------------------------
    async def _find_free(self, count: int) -> int:
        """The first index of ``count`` consecutive free clusters (first fit from the hint;
        past the last used cluster everything is free)."""
        index = start = self.free_hint
        first_free = -1
        run = 0
        while run < count:
            if index not in self.busy and (index >= self.high_water or await self.get(index) == 0):
                if run == 0:
                    start = index
                if first_free < 0:
                    first_free = index
                run += 1
            else:
                run = 0
            index += 1
        self.free_hint = first_free  # nothing free below the first free index met
        return start

    async def allocate(self, nbytes: int) -> int:
        """Host offset of ``nbytes`` (rounded up to clusters) of new clusters, counted 1."""
        count = -(-nbytes // self.cluster_size)
        start = await self._find_free(count)
        held = range(start, start + count)
        for index in held:
            self.hold(index)  # refcount blocks allocated by the updates go elsewhere
        try:
            for index in held:
                await self.update(index, 1)
        finally:
            for index in held:
                self.release(index)
        self.high_water = max(self.high_water, start + count)
        if self.free_hint == start:
            self.free_hint = start + count
        await self._cover(start + count)
        return start << self.cluster_bits

    async def _cover(self, end_index: int) -> None:
        """Make the file reach past cluster ``end_index - 1``: a refcount or L2 entry must
        never point past the end of the file (qemu-img check calls that corruption), and a
        fresh cluster may stay unwritten a while. The file grows in steps of 1 MiB (at
        least a cluster) so that this costs a truncate per step, not per cluster."""
        end = end_index << self.cluster_bits
        if end <= self.file_end:
            return
        step = max(self.cluster_size, 1 << 20)
        new_end = -(-end // step) * step
        await self._file().truncate(new_end)
        self.file_end = new_end

    async def free(self, offset: int, nbytes: int, discard_type: int = DISCARD_OTHER) -> None:
        """Drop one reference of every cluster in ``[offset, offset + nbytes)``; clusters
        that become free are reported to ``on_free`` with ``discard_type`` (whether to pass
        the discard on to the file is the format's policy). A count already 0 is QEMU's
        "qcow2_free_clusters failed": the counts dropped so far are restored and the
        clusters stay leaked."""
        first = offset >> self.cluster_bits
        last = (offset + nbytes - 1) >> self.cluster_bits
        freed = []
        for index in range(first, last + 1):
            try:
                value = await self.update(index, -1)
            except OSError as err:
                await self._undo_free(first, index)
                reason = os.strerror(err.errno or errno.EIO)
                print(f"qcow2_free_clusters failed: {reason}", file=sys.stderr, flush=True)
                return
            if value == 0:
                freed.append(index)
        if self.on_free is not None:
            for index in freed:
                await self.on_free(index << self.cluster_bits, self.cluster_size, discard_type)

    async def _undo_free(self, first: int, end: int) -> None:
        """Give back the references a failed free dropped already (best effort, as QEMU)."""
        try:
            for index in range(first, end):
                await self.update(index, 1)
        except OSError:
            pass

    # --- in-flight data -----------------------------------------------------------------
    def hold(self, index: int) -> None:
        self.busy[index] = self.busy.get(index, 0) + 1

    def release(self, index: int) -> None:
        n = self.busy[index] - 1
        if n:
            self.busy[index] = n
        else:
            del self.busy[index]
