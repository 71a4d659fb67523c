"""qcow2 reference counts: how many tables point at each host cluster, and allocation.

The refcount table (in memory, written through) points at refcount blocks (in the refcount
cache, written back). A cluster is free when its count is 0. The allocator makes QEMU's
choices, so that the same requests leave the same bytes in the file as QEMU's driver:

* a search for ``n`` free clusters starts at the free index and takes the first run of ``n``
  in a row, leaving the index after it (smaller holes on the way wait for a free below the
  index, which moves it back);
* a refcount block is allocated when a count needs it, in the first free cluster; the counts
  changed so far are given back and the search starts again (the block may sit where the
  caller meant to put its data), and a block in the range it covers counts itself;
* a table too small for a new block is replaced by self-describing refcount structures built
  past the last refcount range in use (blocks first, then a table half as large again), the
  header switched to them in one 12-byte write, the old table freed.

A cluster that still has data I/O in flight (``busy``) is never handed out again, so a read
or write that looked up a mapping before a discard freed the cluster cannot land in a cluster
that meanwhile belongs to another guest range. The file grows ahead of the allocations in
steps (:meth:`Refcounts._cover`); :attr:`Refcounts.image_end` keeps the length QEMU's file
would have, and :meth:`Refcounts.trim` cuts the file back to it on close.
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
# struct codes of the big-endian cells of whole bytes, by refcount order (narrower cells
# share bytes and are changed one at a time)
_CELL_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
_REFTABLE_HEADER = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
REFTABLE_HEADER_AT = 48
MAX_REFTABLE_ENTRIES = (8 << 20) // 8  # QEMU's QCOW_MAX_REFTABLE_SIZE
# Why a cluster is freed, for whether its discard reaches the file (QEMU's QCOW2_DISCARD_*,
# the pass-discard-* options). Metadata freed (old tables) is DISCARD_OTHER.
DISCARD_REQUEST, DISCARD_SNAPSHOT, DISCARD_OTHER, DISCARD_ALWAYS = range(4)
DISCARD_NEVER = -1  # a cluster a write replaced: QEMU never passes that discard on


class RefcountError(OSError):
    """A refcount that would go below 0 or past its width: QEMU's EINVAL (the request
    fails; freeing reports it and leaks the clusters, see :meth:`Refcounts.free`)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class _Again(Exception):
    """A refcount block was allocated while counts changed: the clusters the caller chose
    may be taken by it, so it searches again (QEMU's -EAGAIN from update_refcount)."""


def refblocks_needed(clusters: int, cluster_bits: int, order: int, generous: bool) -> int:
    """How many refcount blocks cover ``clusters`` clusters plus the blocks and the table
    that count them (the fixed point QEMU's qcow2_refcount_metadata_size finds; ``generous``
    leaves room for a table half as large again)."""
    per_block = (1 << (cluster_bits + 3)) >> order
    per_table_cluster = (1 << cluster_bits) // 8
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
        if n == last:
            return blocks


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
        self.free_index = 0  # where the search for free clusters starts (QEMU's rules)
        self.high_water = 0  # no cluster at or past this index is in use (set at open)
        self.file_end = 0  # bytes the image file has at least (set at open)
        # How long QEMU's file would be: the end of everything written (set at open). The
        # file itself grows in steps ahead of that and is trimmed back on close.
        self.image_end = 0
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
        below 0 or past the width's maximum (RefcountError). A refcount block it needs is
        allocated (first free cluster) and the change made again."""
        while True:
            try:
                await self._change(index, 1, addend)
            except _Again:
                continue
            return await self.get(index)

    async def _change(self, first: int, count: int, addend: int) -> None:
        """Add ``addend`` to the counts of ``count`` clusters from ``first`` (QEMU's
        update_refcount). Allocating a missing refcount block raises :class:`_Again` after
        the counts changed so far are given back and the free-cluster search is sent back
        to ``first``: the caller's clusters may have been taken by the new block."""
        done = 0
        if addend > 0:  # counted from here on: no longer free for a search (a new block's)
            self.high_water = max(self.high_water, first + count)
        per_block = 1 << self.block_bits
        try:
            index = first
            while index < first + count:  # a block's part of the run at a time
                block_off = await self._block_for(index)
                block = await self.cache.get(block_off)
                cell = index & (per_block - 1)
                n = min(first + count - index, per_block - cell)
                changed = self._add(block, cell, n, addend)
                if changed:
                    self.cache.mark_dirty(block_off)
                done += changed
                if changed < n:
                    value = get_refcount(block, cell + changed, self.order) + addend
                    raise RefcountError(
                        f"refcount of cluster {index + changed} would become {value} "
                        f"(width {1 << self.order} bits)"
                    )
                if addend <= 0:
                    self._note_freed(block, index, cell, n)
                index += n
        except _Again:
            self.free_index = min(self.free_index, first)
            if done:
                await self._change(first, done, -addend)
            raise
        except RefcountError:
            if done:
                await self._change(first, done, -addend)
            raise

    def _add(self, block: bytearray, cell: int, n: int, addend: int) -> int:
        """Add ``addend`` to ``n`` cells of ``block`` from ``cell``, stopping before the
        first that would leave ``[0, max_refcount]``; returns how many changed. Cells of
        whole bytes are changed in one unpack and pack (a 1 MiB write's 16 clusters)."""
        code = _CELL_CODES.get(self.order)
        if code is None:
            for k in range(n):
                value = get_refcount(block, cell + k, self.order) + addend
                if not 0 <= value <= self.max_refcount:
                    return k
                set_refcount(block, cell + k, self.order, value)
            return n
        width = 1 << (self.order - 3)
        values = [v + addend for v in struct.unpack_from(f">{n}{code}", block, cell * width)]
        good = n
        if not 0 <= min(values) or max(values) > self.max_refcount:
            good = next(k for k, v in enumerate(values) if not 0 <= v <= self.max_refcount)
        if good:
            struct.pack_into(f">{good}{code}", block, cell * width, *values[:good])
        return good

    def _note_freed(self, block: bytearray, index: int, cell: int, n: int) -> None:
        """Move the free-cluster search back to the first of the ``n`` clusters from
        ``index`` (cells from ``cell``) whose count is now 0, if it lies before it."""
        for k in range(min(n, self.free_index - index)):
            if get_refcount(block, cell + k, self.order) == 0:
                self.free_index = index + k
                return

    async def _block_for(self, index: int) -> int:
        """The refcount block covering ``index``; a missing one is allocated and
        :class:`_Again` raised (QEMU's alloc_refcount_block)."""
        slot = index >> self.block_bits
        if slot >= MAX_REFTABLE_ENTRIES:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))  # as QEMU refuses
        block_off = self.table[slot] & REFT_OFFSET_MASK if slot < len(self.table) else 0
        if block_off & (self.cluster_size - 1):
            raise await self._misplaced(block_off, slot)
        if block_off:
            return block_off
        await self._new_block(index, slot)
        raise _Again

    async def _new_block(self, index: int, slot: int) -> None:
        """A refcount block for table ``slot`` in the first free cluster: it counts itself
        when it lies in the range it covers, else its count goes into another block (which
        may need allocating first: then :class:`_Again` comes from here). A table too small
        for ``slot`` is replaced by a larger one (:meth:`_refcount_area`)."""
        new = await self._find_free(1)
        block = bytearray(self.cluster_size)
        own_slot, own_cell = self._block_of(new)
        if own_slot == slot:
            set_refcount(block, own_cell, self.order, 1)
        else:
            await self._change(new, 1, 1)
            await self.cache.flush()
        offset = new << self.cluster_bits
        self.high_water = max(self.high_water, new + 1)
        await self._cover(new + 1)
        # The block reaches the disk before the table entry that points at it.
        await self.cache.put(offset, block)
        await self.cache.flush()
        self.note_end(offset + self.cluster_size)
        if slot < len(self.table):
            file = self._file()
            self.table[slot] = offset
            self.version += 1
            await file.write(self.table_offset + 8 * slot, _U64.pack(offset))
            await file.flush()
            return
        # The area for the new table starts past the refcount range of both the cluster
        # being counted and the new block.
        per_block = 1 << self.block_bits
        blocks_used = -(-max(index + 1, new + 1) // per_block)
        await self.refcount_area(blocks_used * per_block, 0, False, slot, offset)

    async def refcount_area(
        self, start: int, additional: int, exact: bool, new_slot: int = 0, new_block: int = 0
    ) -> int:
        """New refcount structures from cluster ``start`` on (past every cluster in use):
        the refcount blocks missing for the range up to their own end plus ``additional``
        clusters, then a new table (``exact`` size, else half as large again), all counted
        in themselves; the header switches to the table in one write and the old table is
        freed. ``new_block`` goes into the new table at ``new_slot``. Returns the cluster
        index past the area (QEMU's qcow2_refcount_area)."""
        per_block = 1 << self.block_bits
        total = refblocks_needed(start + additional, self.cluster_bits, self.order, not exact)
        entries = total if exact else total + -(-total // 2)
        per_cluster = self.cluster_size // 8
        entries = -(-entries // per_cluster) * per_cluster
        if entries > MAX_REFTABLE_ENTRIES:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        table_clusters = entries // per_cluster
        new_table = (list(self.table) + [0] * entries)[:entries]
        if new_block:
            new_table[new_slot] = new_block
        area_slot = start // per_block
        missing = [s for s in range(area_slot, total) if not new_table[s]]
        table_at = start + len(missing)
        end = table_at + table_clusters
        self.high_water = max(self.high_water, end)
        await self._cover(end)
        next_block = start
        for slot in range(area_slot, total):
            if new_table[slot]:
                block = await self.cache.get(new_table[slot] & REFT_OFFSET_MASK)
            else:
                new_table[slot] = next_block << self.cluster_bits
                block = await self.cache.put(new_table[slot], bytes(self.cluster_size))
                next_block += 1
            first_covered = slot * per_block
            for cell in range(max(start, first_covered) - first_covered,
                              min(end - first_covered, per_block)):  # fmt: skip
                set_refcount(block, cell, self.order, 1)
            self.cache.mark_dirty(new_table[slot] & REFT_OFFSET_MASK)
        await self.cache.flush()
        file = self._file()
        table_offset = table_at << self.cluster_bits
        await file.write(table_offset, b"".join(_U64.pack(e) for e in new_table))
        await file.flush()
        self.note_end(end << self.cluster_bits)
        await file.write(REFTABLE_HEADER_AT, _REFTABLE_HEADER.pack(table_offset, table_clusters))
        await file.flush()
        old_offset, old_bytes = self.table_offset, len(self.table) * 8
        self.table, self.table_offset = new_table, table_offset
        self.version += 1
        await self.free(old_offset, old_bytes)
        return end

    # --- shrinking --------------------------------------------------------------------
    async def drop_empty_blocks(self) -> None:
        """Refcount blocks that count nothing but themselves leave the table, which is
        written again, and are freed and discarded (QEMU's qcow2_shrink_reftable)."""
        per_block = 1 << self.block_bits
        empty = []
        for slot, entry in enumerate(self.table):
            offset = entry & REFT_OFFSET_MASK
            if not offset:
                continue
            block = bytearray(await self.cache.get(offset))
            own_slot, own_cell = self._block_of(offset >> self.cluster_bits)
            if own_slot == slot:
                set_refcount(block, own_cell, self.order, 0)
            if not any(block):
                empty.append(slot)
        if not empty:
            return
        new_table = [0 if s in empty else e for s, e in enumerate(self.table)]
        file = self._file()
        await file.write(self.table_offset, b"".join(_U64.pack(e) for e in new_table))
        await file.flush()
        for slot in empty:
            offset = self.table[slot] & REFT_OFFSET_MASK
            index = offset >> self.cluster_bits
            covering = self.table[index // per_block] & REFT_OFFSET_MASK
            if covering:
                block = await self.cache.get(covering)
                set_refcount(block, index & (per_block - 1), self.order, 0)
                self.cache.mark_dirty(covering)
            self.free_index = min(self.free_index, index)
            self.cache.discard(offset, offset + self.cluster_size)
            self.table[slot] = 0
            self.version += 1
            if self.on_free is not None:
                await self.on_free(offset, self.cluster_size, DISCARD_ALWAYS)

    async def cut_after_last_used(self) -> None:
        """Shorten the file to end with its last cluster in use, if it reaches further
        (QEMU does after a shrink)."""
        end_index = -(-self.image_end // self.cluster_size)
        last = await self.last_used(end_index)
        end = (last + 1) << self.cluster_bits
        if end >= self.image_end:
            return
        try:
            await self._file().truncate(end)
        except OSError as err:  # a device cannot shrink: QEMU only warns
            from qsd_py.main import PROG

            text = f"Failed to truncate the tail of the image: {err.strerror or err}"
            print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)
            return
        self.image_end = self.file_end = end
        self.high_water = last + 1

    # --- allocation ---------------------------------------------------------------------
    def _taken(self, index: int) -> bool | None:
        """True: in use or busy; False: free; None: ask the refcount (no I/O needed
        past the last cluster ever used)."""
        if index in self.busy:
            return True
        if index >= self.high_water:
            return False
        return None

    def _free_run(self, first: int, count: int) -> int:
        """How many of ``count`` clusters from ``first`` are free without asking a
        refcount (past the last cluster ever used, and not busy)."""
        n = 0
        while n < count and self._taken(first + n) is False:
            n += 1
        return n

    async def _is_free(self, index: int) -> bool:
        taken = self._taken(index)
        if taken is None:
            return await self.get(index) == 0
        return not taken

    async def _find_free(self, count: int) -> int:
        """The first index of ``count`` consecutive free clusters, searched from the free
        index, which ends up past them (QEMU's alloc_clusters_noref: a used cluster
        restarts the count after it; smaller holes on the way are left for later)."""
        run = 0
        while run < count:
            index = self.free_index
            self.free_index += 1
            taken = self._taken(index)  # past the high water mark: no refcount to ask
            free = await self.get(index) == 0 if taken is None else not taken
            run = run + 1 if free else 0
        return self.free_index - count

    async def allocate(self, nbytes: int) -> int:
        """Host offset of ``nbytes`` (rounded up to clusters) of new clusters, counted 1."""
        count = -(-nbytes // self.cluster_size)
        file = self._file()
        if file.graph.debug_nodes:  # QEMU's qcow2_alloc_clusters raises it on its file
            file.debug_event("cluster_alloc")
        while True:
            start = await self._find_free(count)
            try:
                await self._change(start, count, 1)
            except _Again:
                continue
            break
        self.high_water = max(self.high_water, start + count)
        await self._cover(start + count)
        return start << self.cluster_bits

    async def allocate_at(self, offset: int, count: int) -> int:
        """Allocate up to ``count`` clusters at host ``offset``: as many as are free there
        in a row (0 if the first is not); returns how many (QEMU's
        qcow2_alloc_clusters_at, which extends a run that is already allocated)."""
        first = offset >> self.cluster_bits
        while True:
            n = self._free_run(first, count)
            while n < count and await self._is_free(first + n):
                n += 1
            try:
                await self._change(first, n, 1)
            except _Again:
                continue
            break
        self.high_water = max(self.high_water, first + n)
        await self._cover(first + n)
        return n

    async def last_used(self, end_index: int) -> int:
        """The last cluster below ``end_index`` with a count, -1 if none (QEMU's
        qcow2_get_last_cluster)."""
        for index in range(end_index - 1, -1, -1):
            if await self.get(index):
                return index
        return -1

    def note_end(self, end: int) -> None:
        """The image file as QEMU would leave it reaches at least ``end`` (what was written
        there, or a fresh cluster QEMU would have written zeroes to)."""
        self.image_end = max(self.image_end, end)

    async def _cover(self, end_index: int) -> None:
        """Make the file reach past cluster ``end_index - 1``: a refcount or L2 entry must
        never point past the end of the file (qemu-img check calls that corruption), and a
        fresh cluster may stay unwritten a while. The file grows ahead by an eighth of its
        length (1 MiB at least, 64 MiB at most; at least a cluster) so that filling an image
        costs a few dozen truncates, not one per MiB: each is a thread hop that every other
        allocation waits for, since the caller holds the metadata lock."""
        end = end_index << self.cluster_bits
        if end <= self.file_end:
            return
        ahead = min(max(self.file_end // 8, 1 << 20), 64 << 20)
        step = max(self.cluster_size, 1 << 20)
        new_end = -(-(end + ahead - step) // step) * step
        await self._file().truncate(new_end)
        self.file_end = new_end

    async def trim(self) -> None:
        """Cut the file back to :attr:`image_end` where it was grown ahead of it (on close:
        the file is then as long as QEMU's would be)."""
        if self.file_end > self.image_end:
            await self._file().truncate(self.image_end)
            self.file_end = self.image_end

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

    def hold_many(self, indices: list[int]) -> None:
        busy = self.busy
        for index in indices:
            busy[index] = busy.get(index, 0) + 1

    def release_many(self, indices: list[int]) -> None:
        busy = self.busy
        for index in indices:
            n = busy[index] - 1
            if n:
                busy[index] = n
            else:
                del busy[index]

    def release(self, index: int) -> None:
        n = self.busy[index] - 1
        if n:
            self.busy[index] = n
        else:
            del self.busy[index]


async def allocate_bytes(refcounts: Refcounts, size: int, after: int) -> int:
    """Host offset of ``size`` bytes (at most a cluster) for compressed data, as QEMU's
    qcow2_alloc_bytes packs them: right ``after`` the last compressed data (0: none) while
    that cluster has room and its count is below the maximum, else in a new cluster (which
    continues the old one's run when it is the next one); every cluster the bytes touch
    counts one more."""
    cs, bits = refcounts.cluster_size, refcounts.cluster_bits
    offset = after
    if offset and await refcounts.get(offset >> bits) == refcounts.max_refcount:
        offset = 0
    free_in_cluster = cs - (offset & (cs - 1))
    while True:
        if not offset or free_in_cluster < size:
            new = (await refcounts._find_free(1)) << bits
            if not offset or -(-offset // cs) * cs != new:
                offset, free_in_cluster = new, cs
            else:
                free_in_cluster += cs
        first, last = offset >> bits, (offset + size - 1) >> bits
        try:
            await refcounts._change(first, last - first + 1, 1)
        except _Again:
            offset = 0
            continue
        break
    refcounts.high_water = max(refcounts.high_water, last + 1)
    await refcounts._cover(last + 1)
    return offset
