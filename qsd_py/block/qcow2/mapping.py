"""Guest clusters to L2 entries: the L1 table (in memory, written through) and the L2
tables (through the L2 cache, in slices of ``l2-cache-entry-size``).

Reading an entry never changes the image. Changing one first makes its L2 table writable:
a table that is absent is allocated, one shared with an internal snapshot (its L1 entry
lacks the COPIED flag) is copied. Either way the new table reaches the disk, with its
refcount, before the L1 entry that points at it, so a crash leaves at worst a leaked cluster.

A request's range is cut into :class:`Run` pieces by what each reads from (the node does the
cutting, on its per-request path).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qsd_py.block.qcow2.cache import MetaCache
from qsd_py.block.qcow2.entries import L1E_OFFSET_MASK, OFLAG_COPIED, l2_table_unaligned_text

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qsd_py.block.node import BlockNode
    from qsd_py.block.qcow2.refcount import Refcounts

_U64 = struct.Struct(">Q")
_U64X2 = struct.Struct(">QQ")


class MappingError(OSError):
    """Metadata that cannot be right (the driver marks the image corrupt): an EIO whose
    text is the corruption message."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


# What a range of the guest reads from.
UNALLOC, ZERO, DATA, COMPRESSED = range(4)


@dataclass(slots=True)
class Run:
    """A piece of a request that reads from one place: ``kind``, ``n`` bytes at guest
    ``offset``, from ``host`` (DATA: a host offset; COMPRESSED: the L2 entry)."""

    kind: int
    offset: int
    n: int
    host: int = 0


def append_run(runs: list[Run], kind: int, offset: int, n: int, host: int) -> None:
    """Add a piece, merged into the last run when it continues it."""
    if runs:
        last = runs[-1]
        if last.kind == kind and last.offset + last.n == offset:
            if kind in (ZERO, UNALLOC) or (kind == DATA and last.host + last.n == host):
                last.n += n
                return
    runs.append(Run(kind, offset, n, host))


class ClusterMap:
    """The L1/L2 structure of one image (the active one, not its snapshots)."""

    def __init__(
        self,
        file: Callable[[], BlockNode],
        cluster_bits: int,
        extended: bool,
        l1_offset: int,
        l1: list[int],
        cache: MetaCache,
        refcounts: Refcounts,
    ) -> None:
        self._file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.extended = extended
        self.entry_size = 16 if extended else 8
        self.l2_entries = self.cluster_size // self.entry_size  # entries per L2 table
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.slice_entries = cache.entry_size // self.entry_size
        self.l1_offset = l1_offset
        self.l1 = l1
        self.l1_version = 0  # bumped whenever the L1 table changes (overlap checks cache by it)
        self.cache = cache
        self.refcounts = refcounts
        # Told every entry it learns or changes: (guest cluster, l2 entry, bitmap).
        self.publish: Callable[[int, int, int], None] | None = None
        # The same for consecutive entries: (first guest cluster, [(l2 entry, bitmap)]).
        self.publish_many: Callable[[int, list[tuple[int, int]]], None] | None = None
        # Told about a table found misplaced before the lookup fails (marks the image corrupt).
        self.on_corruption: Callable[[str], Awaitable[None]] | None = None

    # --- where an entry lives -----------------------------------------------------------
    def _split(self, guest_cluster: int) -> tuple[int, int]:
        return guest_cluster >> self.l2_bits, guest_cluster & (self.l2_entries - 1)

    def _slice_at(self, table: int, l2_index: int) -> tuple[int, int]:
        """Host offset of the slice holding ``l2_index`` and the entry's byte offset in it."""
        first = l2_index - l2_index % self.slice_entries
        slice_off = table + first * self.entry_size
        return slice_off, (l2_index - first) * self.entry_size

    def l2_table(self, guest_cluster: int) -> int:
        """Host offset of the L2 table of ``guest_cluster`` (0: none)."""
        l1_index = guest_cluster >> self.l2_bits
        if l1_index >= len(self.l1):
            return 0
        return self.l1[l1_index] & L1E_OFFSET_MASK

    async def _misplaced(self, table: int, l1_index: int) -> MappingError:
        """An L2 table not at a cluster boundary: report it, and the error to raise."""
        text = l2_table_unaligned_text(table, l1_index)
        if self.on_corruption is not None:
            await self.on_corruption(text)
        return MappingError(text)

    # --- reading ------------------------------------------------------------------------
    async def entry(self, guest_cluster: int) -> tuple[int, int]:
        """``(l2_entry, subcluster_bitmap)`` of a guest cluster (bitmap 0 without
        extended L2); ``(0, 0)`` where no L2 table exists."""
        table = self.l2_table(guest_cluster)
        if not table:
            return 0, 0
        if table & (self.cluster_size - 1):
            raise await self._misplaced(table, guest_cluster >> self.l2_bits)
        l2_index = guest_cluster & (self.l2_entries - 1)
        slice_off, at = self._slice_at(table, l2_index)
        loaded = slice_off in self.cache
        if not loaded:
            _debug_event(self._file(), "l2_load")
        buf = await self.cache.get(slice_off)
        if not loaded and self.publish is not None:
            self._publish_slice(guest_cluster - at // self.entry_size, buf)
        if self.extended:
            return _U64X2.unpack_from(buf, at)
        return _U64.unpack_from(buf, at)[0], 0

    async def entries(self, clusters: range) -> list[tuple[int, int]]:
        """:meth:`entry` of consecutive guest clusters: those of one cached L2 slice in one
        unpack (a 1 MiB write's 16 entries cost one lookup, not sixteen)."""
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(clusters):
            first = clusters[i]
            n = min(len(clusters) - i, self.slice_entries - first % self.slice_entries)
            got = self._cached_entries(first, n)
            if got is None:
                out.append(await self.entry(first))  # reads (and publishes) the slice
                i += 1
                continue
            out += got
            i += n
        return out

    def _cached_entries(self, first: int, n: int) -> list[tuple[int, int]] | None:
        """``n`` entries from ``first`` (one slice), if no lookup needs I/O or a report."""
        table = self.l2_table(first)
        if not table:
            return [(0, 0)] * n
        if table & (self.cluster_size - 1):
            return None
        slice_off, at = self._slice_at(table, first & (self.l2_entries - 1))
        buf = self.cache.peek(slice_off)
        if buf is None:
            return None
        self.cache.touch(slice_off)
        if self.extended:
            flat = struct.unpack_from(f">{2 * n}Q", buf, at)
            return list(zip(flat[0::2], flat[1::2], strict=True))
        return [(v, 0) for v in struct.unpack_from(f">{n}Q", buf, at)]

    def _publish_slice(self, first_cluster: int, buf: bytearray) -> None:
        """Tell ``publish`` every entry of a slice just read from the image."""
        publish = self.publish
        assert publish is not None
        if self.extended:
            for i, (l2e, bitmap) in enumerate(_U64X2.iter_unpack(buf)):
                publish(first_cluster + i, l2e, bitmap)
        else:
            for i, (l2e,) in enumerate(_U64.iter_unpack(buf)):
                publish(first_cluster + i, l2e, 0)

    def peek(self, guest_cluster: int) -> tuple[int, int] | None:
        """The entry if its slice is cached (no I/O, no await), else None."""
        table = self.l2_table(guest_cluster)
        if not table:
            return 0, 0
        if table & (self.cluster_size - 1):
            return None  # misplaced: entry() reports it
        slice_off, at = self._slice_at(table, guest_cluster & (self.l2_entries - 1))
        buf = self.cache.peek(slice_off)
        if buf is None:
            return None
        if self.extended:
            return _U64X2.unpack_from(buf, at)
        return _U64.unpack_from(buf, at)[0], 0

    # --- changing -----------------------------------------------------------------------
    async def set_entry(self, guest_cluster: int, l2_entry: int, bitmap: int = 0) -> None:
        """Change the entry (in the cache: written back later, after the refcounts)."""
        table = await self._writable_table(guest_cluster >> self.l2_bits)
        slice_off, at = self._slice_at(table, guest_cluster & (self.l2_entries - 1))
        buf = await self.cache.get(slice_off)
        if self.extended:
            _U64X2.pack_into(buf, at, l2_entry, bitmap)
        else:
            _U64.pack_into(buf, at, l2_entry)
        self.cache.mark_dirty(slice_off)
        if self.publish is not None:
            self.publish(guest_cluster, l2_entry, bitmap)

    async def set_entries(self, first: int, values: list[tuple[int, int]]) -> None:
        """:meth:`set_entry` of consecutive entries from guest cluster ``first``, all in one
        L2 slice: one table lookup and one cache piece for a multi-cluster allocation
        instead of one per cluster; each entry is still published."""
        table = await self._writable_table(first >> self.l2_bits)
        slice_off, at = self._slice_at(table, first & (self.l2_entries - 1))
        if at + len(values) * self.entry_size > self.cache.entry_size:
            raise ValueError("set_entries: the entries span more than one L2 slice")
        buf = await self.cache.get(slice_off)
        if self.extended:
            flat = [v for pair in values for v in pair]
            struct.pack_into(f">{len(flat)}Q", buf, at, *flat)
        else:
            struct.pack_into(f">{len(values)}Q", buf, at, *(l2e for l2e, _ in values))
        self.cache.mark_dirty(slice_off)
        if self.publish_many is not None:
            self.publish_many(first, values)
        elif self.publish is not None:
            for i, (l2_entry, bitmap) in enumerate(values):
                self.publish(first + i, l2_entry, bitmap)

    async def prepare_table(self, guest_cluster: int) -> None:
        """Make the L2 table of ``guest_cluster`` writable now, before the data cluster is
        allocated (so consecutive data clusters stay consecutive on the host, as in QEMU)."""
        await self._writable_table(guest_cluster >> self.l2_bits)

    async def _writable_table(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            raise MappingError(f"L1 index {l1_index} past the L1 table ({len(self.l1)})")
        l1e = self.l1[l1_index]
        old = l1e & L1E_OFFSET_MASK
        if old & (self.cluster_size - 1):
            raise await self._misplaced(old, l1_index)
        if old and l1e & OFLAG_COPIED:
            return old
        content = await self._table_bytes(old) if old else bytes(self.cluster_size)
        new = await self.refcounts.allocate(self.cluster_size)
        file = self._file()
        # Order: the new table's refcount, then the table, then the L1 entry.
        await self.refcounts.cache.flush()
        await file.write(new, content)
        await file.flush()
        self.refcounts.note_end(new + self.cluster_size)
        await self.write_l1(l1_index, new | OFLAG_COPIED)
        for i in range(0, self.cluster_size, self.cache.entry_size):
            await self.cache.put(new + i, content[i : i + self.cache.entry_size], dirty=False)
        if old:
            # The L1 entry must not point at the old table any more before its count drops.
            await file.flush()
            self.cache.discard(old, old + self.cluster_size)
            await self.refcounts.free(old, self.cluster_size)
        return new

    async def _table_bytes(self, table: int) -> bytes:
        """A whole L2 table as it is now (cached slices included)."""
        step = self.cache.entry_size
        parts = [bytes(await self.cache.get(table + i)) for i in range(0, self.cluster_size, step)]
        return b"".join(parts)

    async def write_l1(self, l1_index: int, value: int) -> None:
        """Set an L1 entry and write it through."""
        self.l1[l1_index] = value
        self.l1_version += 1
        _debug_event(self._file(), "l1_update")
        await self._file().write(self.l1_offset + 8 * l1_index, _U64.pack(value))


def _debug_event(file: BlockNode, event: str) -> None:
    """A blkdebug event on the image's file, where QEMU's qcow2 raises it."""
    if file.graph.debug_nodes:
        file.debug_event(event)
