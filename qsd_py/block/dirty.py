"""Which parts of a node were written: a bitmap of ``granularity``-sized chunks.

A :class:`DirtyBitmap` attached to a node (:meth:`BlockNode.add_dirty_bitmap`) is marked by
every write, write-zeroes and discard that passes through the node's public methods, *after*
the request finished (success or not): a reader that clears a chunk and then reads the node
either sees the new bytes or finds the chunk marked again. That order is what lets mirror copy
while the node is written, and what issue 20's user-visible bitmaps will share (a name,
``count``, ``granularity`` as ``query-block`` shows them). Requests that bypass the node's
coroutines are refused while a node has a bitmap: see :meth:`BlockNode.add_dirty_bitmap`.

One byte per chunk (0 clean, 1 dirty): ``bytes.find`` seeks the next dirty chunk in C, and a
1 GiB node at 64 KiB granularity costs 16 KiB.
"""

from __future__ import annotations

from collections.abc import Callable


class DirtyBitmap:
    """Dirty chunks of a node of ``length`` bytes; ``on_mark`` is called after each mark."""

    def __init__(
        self,
        length: int,
        granularity: int,
        name: str | None = None,
        on_mark: Callable[[], None] | None = None,
    ) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of 2")
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.length = length
        self._bits = bytearray(-(-length // granularity))
        self._dirty = 0
        self.on_mark = on_mark

    def _chunks(self, offset: int, length: int) -> range:
        end = min(offset + length, self.length)
        if length <= 0 or offset >= end:
            return range(0)
        return range(offset >> self.shift, ((end - 1) >> self.shift) + 1)

    def mark(self, offset: int, length: int) -> None:
        """The bytes ``[offset, +length)`` changed: their chunks are dirty."""
        chunks = self._chunks(offset, length)
        if not chunks:
            return
        view = self._bits[chunks.start : chunks.stop]
        self._dirty += len(view) - sum(view)
        self._bits[chunks.start : chunks.stop] = b"\x01" * len(view)
        if self.on_mark is not None:
            self.on_mark()

    def clear(self, offset: int, length: int) -> None:
        """Forget the chunks of ``[offset, +length)`` (about to be copied)."""
        chunks = self._chunks(offset, length)
        if not chunks:
            return
        view = self._bits[chunks.start : chunks.stop]
        self._dirty -= sum(view)
        self._bits[chunks.start : chunks.stop] = bytes(len(view))

    def mark_all(self) -> None:
        self.mark(0, self.length)

    def next_dirty(self, offset: int = 0, max_bytes: int = 1 << 62) -> tuple[int, int] | None:
        """The first run of dirty chunks at or after ``offset`` as ``(offset, length)``
        (at most ``max_bytes`` rounded up to a chunk, clipped at the end), or None."""
        first = self._bits.find(1, offset >> self.shift)
        if first < 0:
            return None
        limit = first + max(1, max_bytes >> self.shift)
        last = self._bits.find(0, first, limit)
        if last < 0:
            last = min(limit, len(self._bits))
        start = first << self.shift
        return start, min(last << self.shift, self.length) - start

    @property
    def count(self) -> int:
        """Dirty bytes (whole chunks, the last one clipped at the end), as QEMU counts."""
        if not self._dirty:
            return 0
        total = self._dirty << self.shift
        if self._bits[-1] and self.length & (self.granularity - 1):
            total -= self.granularity - (self.length & (self.granularity - 1))
        return total
