"""Repairing the refcounts of a dirty image, as QEMU does when it opens one read-write.

With lazy refcounts the driver lets refcount updates reach the disk late and sets the dirty
bit instead; after a crash the stored refcounts are behind the tables. QEMU then runs its
check with both repairs enabled (errors and leaks, what ``qemu-img check -r all`` does) before
the image is used, and clears the dirty bit only if nothing is left broken:

1. count what the metadata references (refscan.py) and compare it with the stored counts;
2. a cluster in use whose stored count is 0 means the refcount structure cannot be trusted:
   a new one is written in free space (refcount blocks that are slices of the computed
   counts, then the table, then the header switched to it in one write), the counting is
   done again, and the old structure, now leaked, is given back;
3. otherwise each wrong count is set right through the driver's refcount blocks;
4. the COPIED flags of the active L1 and L2 entries are made to say "refcount == 1".

What is printed, and when, follows QEMU's lines on stderr ("Rebuilding refcount structure",
"Repairing cluster 5 refcount=0 reference=1", ...).
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from typing import TYPE_CHECKING

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.corruption import signal_corruption
from qsd_py.block.qcow2.overlap import ACTIVE_L2, INACTIVE_L2, overlap_text
from qsd_py.block.qcow2.refcount import DISCARD_ALWAYS
from qsd_py.block.qcow2.refscan import (
    FIX_ERRORS,
    FIX_LEAKS,
    CheckResult,
    ImageFacts,
    ReferenceScan,
    ScanError,
    Tally,
)
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

_REFTABLE_HEADER = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
_REFTABLE_HEADER_AT = 48


def report(line: str) -> None:
    """QEMU prints its check's findings on stderr, plainly."""
    print(line, file=sys.stderr, flush=True)


async def rebuild_refcounts(node: Qcow2Node) -> bool:
    """Repair a dirty image on a read-write open; True when it came out consistent (the
    caller then clears the dirty bit). QMPError when the repair itself failed."""
    checker = Checker(node, FIX_ERRORS | FIX_LEAKS)
    try:
        res = await checker.check()
    except OSError as err:
        if isinstance(err, ScanError) and err.context:
            from qsd_py.main import PROG

            report(f"{PROG}: {err.context}: {_strerror(err)}")
        raise QMPError(f"Could not repair dirty image: {_strerror(err)}") from err
    finally:
        await node.reload_tables()
    if res.check_errors:
        raise QMPError(f"Could not repair dirty image: {os.strerror(5)}")
    return res.corruptions == 0


def _strerror(err: OSError) -> str:
    return err.strerror or os.strerror(err.errno or 5)


class StoredRefcounts:
    """The refcounts as the image stores them, read a refcount block at a time (not through
    the driver's cache: the repair compares every cluster once, in order)."""

    def __init__(self, node: Qcow2Node, reftable: list[int]) -> None:
        assert node.header is not None
        self.node = node
        self.reftable = reftable
        self.cb = node.header.cluster_bits
        self.order = node.header.refcount_order
        self.block_bits = self.cb + 3 - self.order
        self._slot = -1
        self._values: list[int] | None = None

    async def get(self, index: int) -> int:
        slot = index >> self.block_bits
        if slot != self._slot:
            self._values = await self._block(slot)
            self._slot = slot
        if self._values is None:
            return 0
        return self._values[index & ((1 << self.block_bits) - 1)]

    async def _block(self, slot: int) -> list[int] | None:
        if slot >= len(self.reftable):
            return None
        offset = self.reftable[slot] & e.REFT_OFFSET_MASK
        if not offset:
            return None
        if offset & ((1 << self.cb) - 1):
            await signal_corruption(self.node, e.refblock_unaligned_text(offset, slot))
            raise OSError(5, os.strerror(5))
        raw = bytearray(1 << self.cb)
        await self.node.file.read(offset, memoryview(raw))
        return decode_refblock(raw, self.order)


def decode_refblock(raw: bytes | bytearray, order: int) -> list[int]:
    """Every cell of a refcount block, in order."""
    if order >= 3:
        if order == 3:
            return list(raw)
        values = array({4: "H", 5: "I", 6: "Q"}[order])
        values.frombytes(bytes(raw))
        if sys.byteorder == "little":
            values.byteswap()
        return values.tolist()
    cells = len(raw) << 3 >> order
    return [e.get_refcount(raw, cell, order) for cell in range(cells)]


def encode_refblock(values: list[int], order: int, cluster_size: int) -> bytearray:
    """A refcount block holding ``values`` (fewer than a block's cells: the rest 0)."""
    block = bytearray(cluster_size)
    for cell, value in enumerate(values):
        if value:
            e.set_refcount(block, cell, order, value)
    return block


class Checker:
    """QEMU's qcow2_check_refcounts with the given repairs, on an open node."""

    def __init__(self, node: Qcow2Node, fix: int) -> None:
        assert node.header is not None and node.refcounts is not None
        self.node = node
        self.fix = fix
        self.h = node.header
        self.cb = self.h.cluster_bits
        self.cs = self.h.cluster_size
        self.order = self.h.refcount_order
        self.block_entries = e.refcount_block_entries(self.cb, self.order)
        self.file_length = node.file.length()

    # --- the whole check ----------------------------------------------------------------
    async def check(self) -> CheckResult:
        res = CheckResult()
        tally, rebuild = await self.count(res, self.fix)
        before_compare = _copy(res)
        rebuild = await self.compare(res, 0, tally) or rebuild
        if rebuild and self.fix & FIX_ERRORS:
            await self.rebuild_and_recount(res, tally)
        elif self.fix:
            if rebuild:
                report("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise ScanError(5)
            if res.leaks or res.corruptions:
                res = before_compare
                await self.compare(res, self.fix, tally)
                assert self.node.refcounts is not None
                await self.node.refcounts.cache.flush()
        await self.copied_flags(res)
        return res

    async def rebuild_and_recount(self, res: CheckResult, tally: Tally) -> None:
        old = _copy(res)
        report("Rebuilding refcount structure")
        await self.rebuild_structure(tally)
        res.corruptions = res.leaks = 0
        tally, _ = await self.count(res, 0)
        fresh_leaks = 0
        if self.fix & FIX_LEAKS:
            # The old structure is leaked now: give it back. Whatever else this finds was
            # left by the rebuild itself.
            leaks_res = CheckResult()
            if await self.compare(leaks_res, FIX_LEAKS, tally):
                report("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = leaks_res.leaks
            assert self.node.refcounts is not None
            await self.node.refcounts.cache.flush()
        if res.corruptions < old.corruptions:
            res.corruptions_fixed += old.corruptions - res.corruptions
        if res.leaks < old.leaks:
            res.leaks_fixed += old.leaks - res.leaks
        res.leaks += fresh_leaks

    async def count(self, res: CheckResult, fix: int) -> tuple[Tally, bool]:
        node = self.node
        assert node.refcounts is not None and node.metadata is not None
        facts = ImageFacts(self.h, node.refcounts.table_offset, node.refcounts.table,
                           node.metadata)  # fmt: skip
        scan = ReferenceScan(
            node.file, facts, res, fix, report, self.file_length, self.write_l2_entry
        )
        tally = await scan.run()
        self.file_length = scan.file_length
        return tally, scan.rebuild

    async def write_l2_entry(self, offset: int, data: bytes, active: bool) -> bool:
        if not await self.overlap_ok(offset, len(data), ACTIVE_L2 if active else INACTIVE_L2):
            return False
        await self.node.file.write(offset, data)
        await self.node.file.flush()
        return True

    async def overlap_ok(self, offset: int, size: int, ignore: int) -> bool:
        """QEMU's pre-write overlap check: a hit marks the image corrupt."""
        check = self.node.overlap
        kind = check.find(offset, size, ignore) if check is not None else 0
        if kind:
            await signal_corruption(self.node, overlap_text(kind), offset, size)
        return not kind

    # --- comparing ----------------------------------------------------------------------
    async def compare(self, res: CheckResult, fix: int, tally: Tally) -> bool:
        """Stored counts against ``tally``; returns whether a rebuild is needed (a cluster
        in use counted 0). Mismatches are repaired as ``fix`` allows."""
        assert self.node.refcounts is not None
        stored = StoredRefcounts(self.node, self.node.refcounts.table)
        rebuild = False
        for index in range(len(tally)):
            try:
                have = await stored.get(index)
            except OSError as err:
                report(f"Can't get refcount for cluster {index}: {_strerror(err)}")
                res.check_errors += 1
                continue
            want = tally.counts[index]
            if have == want:
                continue
            repair = ""
            if have == 0:
                rebuild = True
            elif have > want and fix & FIX_LEAKS:
                repair = "leaks_fixed"
            elif have < want and fix & FIX_ERRORS:
                repair = "corruptions_fixed"
            word = "Repairing" if repair else ("ERROR" if have < want else "Leaked")
            report(f"{word} cluster {index} refcount={have} reference={want}")
            if repair and await self.set_count(index, want - have):
                setattr(res, repair, getattr(res, repair) + 1)
                continue
            if have < want:
                res.corruptions += 1
            else:
                res.leaks += 1
        return rebuild

    async def set_count(self, index: int, diff: int) -> bool:
        refcounts = self.node.refcounts
        assert refcounts is not None
        try:
            value = await refcounts.update(index, diff)
            # A repaired leak's discard always reaches the file.
            if value == 0 and refcounts.on_free is not None:
                await refcounts.on_free(index << self.cb, self.cs, DISCARD_ALWAYS)
        except OSError:
            return False
        return True

    # --- a new refcount structure -------------------------------------------------------
    async def rebuild_structure(self, tally: Tally) -> None:
        """Write refcount blocks for every range of clusters in use and a table for them in
        clusters the tally says are free (allocating marks them in the tally, which may
        need more blocks and a bigger table: repeated until it settles), then point the
        header at the new table."""
        reftable: list[int] = []
        await self.write_refblocks(tally, reftable, 0, len(tally))
        while True:
            table_clusters = -(-len(reftable) * 8 // self.cs)
            table_offset = self.allocate(tally, table_clusters, [0])
            start = table_offset >> self.cb
            if not await self.write_refblocks(tally, reftable, start, start + table_clusters):
                break
        data = b"".join(struct.pack(">Q", entry) for entry in reftable)
        if not await self.overlap_ok(table_offset, len(data), 0):
            raise ScanError(5, "ERROR writing reftable")
        await self.write(table_offset, data)
        await self.node.file.flush()
        await self.node.file.write(
            _REFTABLE_HEADER_AT, _REFTABLE_HEADER.pack(table_offset, table_clusters)
        )
        await self.node.file.flush()
        self.h.refcount_table_offset = table_offset
        self.h.refcount_table_clusters = table_clusters
        await self.node.reload_tables()

    async def write_refblocks(
        self, tally: Tally, reftable: list[int], first: int, end: int
    ) -> bool:
        """Write the blocks covering clusters in use in ``[first, end)``, allocating those
        not placed yet; returns whether the table had to grow."""
        grown = False
        first_free = [0]
        cluster = first
        while cluster < end:
            if not tally.get(cluster):
                cluster += 1
                continue
            slot = cluster // self.block_entries
            block_start = slot * self.block_entries
            if slot < len(reftable) and reftable[slot]:
                block_offset = reftable[slot]
            else:
                first_free[0] = max(first_free[0], block_start)  # not in a block written
                block_offset = self.allocate(tally, 1, first_free)
                end = max(end, (block_offset >> self.cb) + 1)  # its own count must be written
                if len(reftable) <= slot:
                    entries = -(-(slot + 1) * 8 // self.cs) * self.cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[slot] = block_offset
            if not await self.overlap_ok(block_offset, self.cs, 0):
                raise ScanError(5, "ERROR writing refblock")
            values = tally.counts[block_start : block_start + self.block_entries]
            await self.write(block_offset, encode_refblock(values, self.order, self.cs))
            cluster = block_start + self.block_entries
        return grown

    def allocate(self, tally: Tally, count: int, first_free: list[int]) -> int:
        """``count`` clusters free in the tally (first fit from ``first_free[0]``, which is
        moved to the first free cluster seen), counted 1 there; the tally grows when the
        file has no such gap."""
        cluster = first_free[0]
        run = 0
        first_gap = True
        while cluster < len(tally) and run < count:
            if not tally.counts[cluster]:
                run += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            else:
                run = 0
            cluster += 1
        if run < count:
            tally.grow(cluster + count - run)
        cluster -= run
        for index in range(cluster, cluster + count):
            tally.counts[index] = 1
        return cluster << self.cb

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        await self.node.file.write(offset, data)
        self.file_length = max(self.file_length, offset + len(data))

    # --- COPIED flags -------------------------------------------------------------------
    async def copied_flags(self, res: CheckResult) -> None:
        """The active L1 and L2 entries' COPIED flag must say whether the refcount is 1."""
        node = self.node
        assert node.map is not None and node.refcounts is not None
        if self.fix & FIX_ERRORS:
            repair = True
        elif self.fix & FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        stored = StoredRefcounts(node, node.refcounts.table)
        for l1_index, l1_entry in enumerate(list(node.map.l1)):
            l2_offset = l1_entry & e.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                count = await stored.get(l2_offset >> self.cb)
            except OSError:
                continue
            if (count == 1) != bool(l1_entry & e.OFLAG_COPIED):
                res.corruptions += 1
                word = "Repairing" if repair else "ERROR"
                report(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                    f"l1_entry={l1_entry:x} refcount={count}"
                )
                if repair:
                    fixed = l1_entry | e.OFLAG_COPIED if count == 1 else l1_entry & ~e.OFLAG_COPIED
                    try:
                        await node.map.write_l1(l1_index, fixed)
                    except OSError:
                        res.check_errors += 1
                        raise
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            await self.copied_flags_l2(res, l2_offset, stored, repair)

    async def copied_flags_l2(
        self, res: CheckResult, l2_offset: int, stored: StoredRefcounts, repair: bool
    ) -> None:
        h = self.h
        table = bytearray(self.cs)
        try:
            if l2_offset < self.file_length:  # past the end: zeroes, not asked for
                await self.node.file.read(l2_offset, memoryview(table))
        except OSError as err:
            report(f"ERROR: Could not read L2 table: {_strerror(err)}")
            res.check_errors += 1
            raise
        if table.count(0) == len(table):
            return  # no allocated entry to look at
        dirty = 0
        for index in range(self.cs // (16 if h.extended_l2 else 8)):
            entry = e.read_l2_entry(table, index, h.extended_l2)
            ctype = e.cluster_type(entry, h.extended_l2, h.has_data_file)
            if ctype not in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC):
                continue
            if h.has_data_file:
                count = 1
            else:
                try:
                    count = await stored.get((entry & e.L2E_OFFSET_MASK) >> self.cb)
                except OSError:
                    continue
            if (count == 1) == bool(entry & e.OFLAG_COPIED):
                continue
            res.corruptions += 1
            word = "Repairing" if repair else "ERROR"
            report(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={count}")
            if repair:
                fixed = entry | e.OFLAG_COPIED if count == 1 else entry & ~e.OFLAG_COPIED
                e.write_l2_entry(table, index, h.extended_l2, fixed)
                dirty += 1
        if not dirty:
            return
        kind = self.node.overlap.find(l2_offset, self.cs, ACTIVE_L2) if self.node.overlap else 0
        if kind:
            await signal_corruption(self.node, overlap_text(kind), l2_offset, self.cs)
            report(
                f"ERROR: Could not write L2 table; metadata overlap check failed: {os.strerror(5)}"
            )
            res.check_errors += 1
            raise ScanError(5)
        try:
            await self.node.file.write(l2_offset, table)
        except OSError as err:
            report(f"ERROR: Could not write L2 table: {_strerror(err)}")
            res.check_errors += 1
            raise
        res.corruptions -= dirty
        res.corruptions_fixed += dirty


def _copy(res: CheckResult) -> CheckResult:
    return CheckResult(**vars(res))
