"""The refcount every host cluster should have, counted from the metadata that points at it:
QEMU's ``calculate_refcounts``, the first half of ``qemu-img check`` and of the repair of a
dirty image (repair.py).

Counted are the header cluster, the active L1 table, its L2 tables and their data clusters
(compressed ones by the sectors they span, which may reach into a second cluster), every
internal snapshot's L1 table, L2 tables and data, the snapshot table, the refcount table
and each refcount block, the LUKS header area and the persistent bitmaps (directory, tables,
data clusters). What is wrong on the way is reported in QEMU's words (its ``fprintf`` lines,
printed by the caller) and counted in a :class:`CheckResult`; with ``FIX_ERRORS`` two things
are mended here as QEMU mends them: an unaligned preallocated zero cluster becomes a plain
zero cluster, and a refcount block lying past the end of the file gets the file grown to it.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.bitmaps import BITMAP_TABLE_OFFSET_MASK, bitmap_entry_valid
from qsd_py.block.qcow2.header import MAX_L1_SIZE, Qcow2Header
from qsd_py.block.qcow2.metadata import (
    BitmapDirectoryError,
    Metadata,
    read_bitmap_directory,
    read_bitmap_table,
)

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode

FIX_LEAKS = 1
FIX_ERRORS = 2

_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}  # cells of 8, 16, 32, 64 bits

# How far the file may be grown to reach a refcount block lying past its end: QEMU grows it
# to any length; here a block further than this (past twice the file, or 1 GiB beyond it)
# counts as a resize failure, so a wild offset cannot make a huge sparse file and tally.
GROW_LIMIT = 1 << 30


class ScanError(OSError):
    """The check could not go on (QEMU's negative return: the repair fails with its errno).
    ``context`` is what QEMU reports on its own line first ("ERROR writing refblock")."""

    def __init__(self, code: int, context: str = "") -> None:
        super().__init__(code, os.strerror(code))
        self.context = context


@dataclass
class CheckResult:
    """QEMU's BdrvCheckResult counters."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0


class Tally:
    """Reference counts from the metadata, one per host cluster (QEMU's in-memory refcount
    table, as compact: an array of the refcount width rounded up to a byte); clusters past
    its length count 0."""

    def __init__(self, clusters: int, refcount_order: int) -> None:
        self.counts = array(_TYPECODES[max(3, refcount_order)])
        self.grow(clusters)

    def __len__(self) -> int:
        return len(self.counts)

    def get(self, index: int) -> int:
        return self.counts[index] if index < len(self.counts) else 0

    def set(self, index: int, value: int) -> None:
        self.grow(index + 1)
        self.counts[index] = value

    def grow(self, clusters: int) -> None:
        more = clusters - len(self.counts)
        if more <= 0:
            return
        try:
            self.counts.frombytes(bytes(more * self.counts.itemsize))
        except (MemoryError, OverflowError) as err:
            raise ScanError(12) from err  # ENOMEM, as QEMU's realloc would fail


@dataclass
class ImageFacts:
    """What the scan needs to know of the image besides its files' bytes."""

    header: Qcow2Header
    reftable_offset: int
    reftable: list[int]  # the refcount table's entries, as the driver holds them
    meta: Metadata


# Writes the scan makes to mend L2 entries go through this: (offset, bytes, whether they update
# the active tables) -> False when the overlap check refused the write (OSError: I/O failed).
EntryWriter = Callable[[int, bytes, bool], Awaitable[bool]]


class ReferenceScan:
    """One pass of counting (QEMU's calculate_refcounts), into ``tally``."""

    def __init__(
        self,
        file: BlockNode,
        facts: ImageFacts,
        res: CheckResult,
        fix: int,
        report: Callable[[str], None],
        file_length: int,
        write_entry: EntryWriter,
    ) -> None:
        self.file = file
        self.facts = facts
        self.h = facts.header
        self.res = res
        self.fix = fix
        self.report = report
        self.file_length = file_length
        self.write_entry = write_entry
        self.cb = self.h.cluster_bits
        self.cs = self.h.cluster_size
        self.extended = self.h.extended_l2
        self.data_file = self.h.has_data_file
        self.max_refcount = e.refcount_max(self.h.refcount_order)
        self.tally = Tally(-(-file_length // self.cs), self.h.refcount_order)
        self.rebuild = False

    # --- counting -----------------------------------------------------------------------
    def inc(self, offset: int, size: int) -> None:
        """One more reference to every cluster ``[offset, offset + size)`` touches."""
        if size <= 0:
            return
        if offset + size - self.file_length >= self.cs:
            self.report(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
            )
            self.res.corruptions += 1
            return
        for cluster in range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1):
            count = self.tally.get(cluster)
            if count == self.max_refcount:
                self.report(f"ERROR: overflow cluster offset=0x{cluster << self.cb:x}")
                self.report(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"
                )
                self.res.corruptions += 1
                continue
            self.tally.set(cluster, count + 1)

    async def run(self) -> Tally:
        """Count everything; ``self.rebuild`` then says whether the refcount structure
        itself is broken (a refcount block misplaced or shared)."""
        h, meta = self.h, self.facts.meta
        self.inc(0, self.cs)
        await self.l1(h.l1_table_offset, h.l1_size, active=True)
        if self.data_file and meta.snapshots:
            self.report(f"ERROR {len(meta.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in meta.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.report(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={e.c_hex(sn.l1_table_offset)}"
                    ": L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_SIZE // 8:
                self.report(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_size={e.c_hex(sn.l1_size)}: L1 "
                    "table is too large; snapshot table entry corrupted"
                )
                self.res.corruptions += 1
                continue
            await self.l1(sn.l1_table_offset, sn.l1_size, active=False)
        self.inc(meta.snapshots_offset, meta.snapshots_size)
        self.inc(self.facts.reftable_offset, 8 * len(self.facts.reftable))
        if meta.crypto_header is not None:
            self.inc(*meta.crypto_header)
        await self.bitmaps()
        await self.refblocks()
        return self.tally

    async def _read(self, offset: int, size: int, what: str) -> bytes:
        """File bytes; past its end zeroes (what a read gives, without asking for it:
        a damaged table may name a great many places far out)."""
        buf = bytearray(size)
        if offset >= self.file_length:
            return bytes(buf)
        try:
            await self.file.read(offset, memoryview(buf))
        except OSError as err:
            self.report(f"ERROR: I/O error in {what}")
            self.res.check_errors += 1
            raise ScanError(err.errno or 5) from err
        return bytes(buf)

    # --- L1 and L2 tables ---------------------------------------------------------------
    async def l1(self, offset: int, size: int, active: bool) -> None:
        if not size:
            return
        self.inc(offset, 8 * size)
        raw = await self._read(offset, 8 * size, "check_refcounts_l1")
        for (entry,) in struct.iter_unpack(">Q", raw):
            if not entry:
                continue
            if entry & e.L1E_RESERVED_MASK:
                self.report(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_offset = entry & e.L1E_OFFSET_MASK
            self.inc(l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.report(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry "
                    "corrupted"
                )
                self.res.corruptions += 1
            await self.l2(l2_offset, active)

    async def l2(self, l2_offset: int, active: bool) -> None:
        table = await self._read(l2_offset, self.cs, "check_refcounts_l2")
        if table.count(0) == len(table):
            return  # nothing allocated (nor wrong) in an all-zero table
        pairs = struct.iter_unpack(">QQ" if self.extended else ">Q", table)
        for index, (entry, *rest) in enumerate(pairs):
            bitmap = rest[0] if rest else 0
            if not (entry or bitmap):
                continue
            if not await self.l2_entry(l2_offset, index, entry, bitmap, active):
                return

    async def l2_entry(
        self, l2_offset: int, index: int, entry: int, bitmap: int, active: bool
    ) -> bool:
        """Check and count one L2 entry; False stops the walk of its table (a repair
        that would have written on other metadata)."""
        ctype = e.cluster_type(entry, self.extended, self.data_file)
        if ctype != e.CLUSTER_COMPRESSED and entry & e.L2E_STD_RESERVED_MASK:
            self.report(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            self.res.corruptions += 1
        if ctype == e.CLUSTER_COMPRESSED:
            self.compressed(index, entry, bitmap)
        elif ctype in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC):
            return await self.allocated(l2_offset, index, entry, bitmap, active)
        elif ctype == e.CLUSTER_UNALLOCATED and bitmap & e.BITMAP_ALL_ALLOC:
            self.res.corruptions += 1
            self.report("ERROR: Unallocated cluster has non-zero subcluster allocation map")
        return True

    def compressed(self, index: int, entry: int, bitmap: int) -> None:
        if entry & e.OFLAG_COPIED:
            mask = (1 << e.compressed_shift(self.cb)) - 1
            self.report(
                f"ERROR: coffset=0x{entry & mask:x}: copied flag must never be set for "
                "compressed clusters"
            )
            entry &= ~e.OFLAG_COPIED
            self.res.corruptions += 1
        if self.data_file:
            self.report(f"ERROR compressed cluster {index} with data file, entry=0x{entry:x}")
            self.res.corruptions += 1
            return
        if bitmap:
            self.report(
                f"ERROR compressed cluster {index} with non-zero subcluster allocation "
                f"bitmap, entry=0x{entry:x}"
            )
            self.res.corruptions += 1
            return
        self.inc(*e.compressed_range(entry, self.cb))

    async def allocated(
        self, l2_offset: int, index: int, entry: int, bitmap: int, active: bool
    ) -> bool:
        offset = entry & e.L2E_OFFSET_MASK
        if (bitmap >> 32) & bitmap:
            self.res.corruptions += 1
            self.report(
                f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                "allocation bitmap"
            )
        if offset & (self.cs - 1):
            self.res.corruptions += 1
            if self.extended:
                holds_data = bool(bitmap & e.BITMAP_ALL_ALLOC)
            else:
                holds_data = not entry & e.OFLAG_ZERO
            if holds_data:
                self.report(
                    f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 "
                    "entry corrupted."
                )
            else:
                word = "Repairing" if self.fix & FIX_ERRORS else "ERROR"
                self.report(
                    f"{word} offset={offset:x}: Preallocated cluster is not properly aligned; "
                    "L2 entry corrupted."
                )
                if self.fix & FIX_ERRORS:
                    fixed, go_on = await self.zero_entry(l2_offset, index, bitmap, active)
                    if not go_on:
                        return False
                    if fixed:
                        return True  # the cluster is not used any more
        if not self.data_file:
            self.inc(offset, self.cs)
        return True

    async def zero_entry(
        self, l2_offset: int, index: int, bitmap: int, active: bool
    ) -> tuple[bool, bool]:
        """Make an entry a plain zero cluster: (fixed, whether to go on with the table)."""
        if self.extended:
            new_bitmap = (bitmap | bitmap << 32) & e.BITMAP_ALL_ZEROES
            data = struct.pack(">QQ", 0, new_bitmap)
        else:
            data = struct.pack(">Q", e.OFLAG_ZERO)
        try:
            written = await self.write_entry(l2_offset + index * len(data), data, active)
        except OSError as err:
            self.res.check_errors += 1
            self.report(f"ERROR: Failed to overwrite L2 table entry: {err.strerror}")
            return False, True
        if not written:  # the overlap check refused: stop walking this table
            self.res.check_errors += 1
            self.report("ERROR: Overlap check failed")
            return False, False
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True, True

    # --- bitmaps ------------------------------------------------------------------------
    async def bitmaps(self) -> None:
        """The bitmap directory, each bitmap's table and the clusters it points at."""
        directory = self.facts.meta.bitmap_directory
        if directory is None:
            return
        self.inc(*directory)
        try:
            bitmaps = await read_bitmap_directory(self.file, *directory)
        except BitmapDirectoryError as err:
            self.res.corruptions += 1
            raise ScanError(22) from err  # EINVAL, as QEMU returns
        for bitmap in bitmaps:
            self.inc(bitmap.table_offset, 8 * bitmap.table_size)
            try:
                table = await read_bitmap_table(self.file, bitmap, self.cs)
            except BitmapDirectoryError:
                self.res.corruptions += 1
                return
            for entry in table:
                if not bitmap_entry_valid(entry, self.cs):
                    self.res.corruptions += 1
                    continue
                if entry & BITMAP_TABLE_OFFSET_MASK:
                    self.inc(entry & BITMAP_TABLE_OFFSET_MASK, self.cs)

    # --- refcount blocks ----------------------------------------------------------------
    async def refblocks(self) -> None:
        """Each refcount block must be aligned, inside the file and used by nothing else;
        anything else means the refcount structure must be rebuilt."""
        for index, entry in enumerate(self.facts.reftable):
            offset = entry & e.REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if entry & e.REFT_RESERVED_MASK:
                self.report(f"ERROR refcount table entry {index} has reserved bits set")
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (self.cs - 1):
                self.report(
                    f"ERROR refcount block {index} is not cluster aligned; refcount table "
                    "entry corrupted"
                )
                self.res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= len(self.tally):
                await self.refblock_outside(index, offset)
                continue
            if offset:
                self.inc(offset, self.cs)
                count = self.tally.get(cluster)
                if count != 1:
                    self.report(f"ERROR refcount block {index} refcount={count}")
                    self.res.corruptions += 1
                    self.rebuild = True

    async def refblock_outside(self, index: int, offset: int) -> None:
        """A refcount block past the end of the file: QEMU grows the file to it."""
        self.res.corruptions += 1
        word = "Repairing" if self.fix & FIX_ERRORS else "ERROR"
        self.report(f"{word} refcount block {index} is outside image")
        if not self.fix & FIX_ERRORS:
            return
        new_length = offset + self.cs
        try:
            if new_length > max(2 * self.file_length, self.file_length + GROW_LIMIT):
                raise OSError(27, os.strerror(27))  # EFBIG
            await self.file.truncate(new_length)
        except OSError as err:
            self.rebuild = True
            self.report(f"ERROR could not resize image: {err.strerror}")
            return
        self.file_length = max(self.file_length, new_length)
        self.tally.grow(-(-self.file_length // self.cs))
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        self.inc(offset, self.cs)
