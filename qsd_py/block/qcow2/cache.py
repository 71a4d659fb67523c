"""The qcow2 metadata caches: L2 table slices and refcount blocks, kept in memory and
written back in an order that survives a crash.

Both caches hold fixed-size pieces of the image file by their host offset and write changed
pieces back only when asked (a flush, or making room). What makes that safe is the order of
writes between the two caches, as in QEMU's driver:

* a cluster's refcount must be on disk before an L2 entry that points at it: the L2 cache
  *depends on* the refcount cache after an allocation (:meth:`MetaCache.depend_on`), so
  writing any L2 piece first writes the refcount blocks and flushes the file;
* an L2 entry that stopped pointing at a cluster must be on disk before the cluster's
  refcount drops (else the cluster could be reused while the old entry still points at it):
  after a free the refcount cache depends on the L2 cache.

When a dependency would go both ways, the older one is written out first, so there is never a
cycle. All methods run under the node's metadata lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode


# The blkdebug event QEMU's qcow2 raises on its file before writing a piece of each cache.
_EVENTS = {"l2": "l2_update", "refcount": "refblock_update_part"}


class MetaCache:
    """Pieces of ``entry_size`` bytes of ``file`` (a node), at most ``capacity`` of them,
    least recently used first out."""

    def __init__(self, name: str, file: Callable[[], BlockNode], entry_size: int, capacity: int):
        self.name = name
        self._file = file
        self.entry_size = entry_size
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._used: set[int] = set()  # looked at since the last clean_unused()
        self.depends: MetaCache | None = None  # written (and the file flushed) before us
        self.flush_file_first = False  # a flush of the file must come before our writes
        self.before_write: Callable[[int, int], None] | None = None  # overlap check hook

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, offset: object) -> bool:
        return offset in self._entries

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    async def get(self, offset: int) -> bytearray:
        """The piece at host ``offset`` (a multiple of the entry size), read if absent."""
        self._used.add(offset)
        buf = self._entries.get(offset)
        if buf is not None:
            self._entries.move_to_end(offset)
            return buf
        await self._make_room()
        buf = bytearray(self.entry_size)
        await self._file().read(offset, memoryview(buf))
        self._entries[offset] = buf
        return buf

    def peek(self, offset: int) -> bytearray | None:
        """The piece if it is cached, without reading or reordering (the fast path)."""
        return self._entries.get(offset)

    def touch(self, offset: int) -> None:
        """What :meth:`get` does to a cached piece: looked at, most recently used."""
        self._used.add(offset)
        self._entries.move_to_end(offset)

    async def put(self, offset: int, data: bytes | bytearray, dirty: bool = True) -> bytearray:
        """Cache a piece whose content is known (a new table) without reading it; ``dirty``
        unless it was just written."""
        if offset not in self._entries:
            await self._make_room()
        buf = self._entries[offset] = bytearray(data)
        self._entries.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)
        else:
            self._dirty.discard(offset)
        return buf

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    async def depend_on(self, other: MetaCache) -> None:
        """Our next write must come after ``other``'s pieces are on disk. A dependency the
        other way round (or on a third cache) is settled first by writing it out."""
        if other.depends is not None:
            dep, other.depends = other.depends, None
            await dep.flush()
        if self.depends is not None and self.depends is not other:
            dep, self.depends = self.depends, None
            await dep.flush()
        self.depends = other

    def discard(self, offset_from: int, offset_to: int) -> None:
        """Forget pieces in ``[offset_from, offset_to)`` without writing them (a freed
        table: its bytes no longer matter)."""
        for off in [o for o in self._entries if offset_from <= o < offset_to]:
            del self._entries[off]
            self._dirty.discard(off)

    async def _make_room(self) -> None:
        while len(self._entries) >= self.capacity:
            victim = next(iter(self._entries))
            if victim in self._dirty:
                await self.write_back()  # QEMU too writes the whole cache on a dirty victim
            self._entries.pop(victim, None)

    async def write_back(self) -> None:
        """Write every changed piece, after what it depends on."""
        if not self._dirty:
            return
        dep = self.depends
        if dep is not None:
            self.depends = None
            await dep.flush()
        elif self.flush_file_first:
            await self._file().flush()
        self.flush_file_first = False
        file = self._file()
        event = _EVENTS.get(self.name) if file.graph.debug_nodes else None
        for offset in sorted(self._dirty):
            buf = self._entries[offset]
            if self.before_write is not None:
                self.before_write(offset, len(buf))
            if event is not None:
                file.debug_event(event)
            await file.write(offset, buf)
            self._dirty.discard(offset)

    async def flush(self) -> None:
        """Write every changed piece and make it stable."""
        had = bool(self._dirty)
        await self.write_back()
        if had or self.depends is not None:
            await self._file().flush()

    def clean_unused(self) -> int:
        """Drop the clean pieces nobody looked at since the last call (QEMU's
        ``cache-clean-interval``: an idle image gives its cache memory back); returns how
        many went."""
        unused = [o for o in self._entries if o not in self._dirty and o not in self._used]
        for off in unused:
            del self._entries[off]
        self._used.clear()
        return len(unused)
