"""Which parts of a node were written: a bitmap of ``granularity``-sized chunks.

A :class:`DirtyBitmap` attached to a node (:meth:`BlockNode.add_dirty_bitmap`) is marked by
every write, write-zeroes and discard that passes through the node's public methods, *after*
the request finished (success or not): a reader that clears a chunk and then reads the node
either sees the new bytes or finds the chunk marked again. That order is what lets mirror copy
while the node is written. Requests that bypass the node's coroutines are refused while a
node has a recording bitmap: see :meth:`BlockNode.add_dirty_bitmap`.

The user's bitmaps (block-dirty-bitmap-add, or loaded from a qcow2 image) are the same
objects with a name and QEMU's states: ``enabled`` (recording), ``persistent`` (stored in the
image on close), ``busy`` (an export or job uses it), ``readonly`` (loaded from a read-only
image) and ``inconsistent`` (found in use in the image: its bits cannot be trusted).

One byte per chunk (0 clean, 1 dirty): ``bytes.find`` seeks the next dirty chunk in C, a
1 GiB node at 64 KiB granularity costs 16 KiB, and a mark is a plain store of ones (no
read-modify-write of neighbours' bits). QEMU's bit-packed form, one bit per chunk in
little-endian 64-bit words, is made only where it is seen: the sha256 QEMU reports and the
bitmap data of a qcow2 image (:meth:`DirtyBitmap.serialize`).
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Iterator
from typing import Any

from qsd_py.block.shared_bits import SharedBits
from qsd_py.errors import QMPError

# Bytes of a chunk map (0/1 per chunk) to the characters of a base-2 number, and back.
_TO_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_FROM_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


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
        self._n = -(-length // granularity)  # chunks
        self._bits: bytearray | mmap.mmap = bytearray(self._n)
        self._dirty = 0  # dirty chunks (marks of other processes not counted: see count)
        self.shared: SharedBits | None = None
        self.on_mark = on_mark
        self.enabled = True
        self.persistent = False
        self.busy = False
        self.readonly = False
        self.inconsistent = False

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
        first = self._bits.find(b"\x01", offset >> self.shift, self._n)
        if first < 0:
            return None
        limit = min(first + max(1, max_bytes >> self.shift), self._n)
        last = self._bits.find(b"\x00", first, limit)
        if last < 0:
            last = limit
        start = first << self.shift
        return start, min(last << self.shift, self.length) - start

    @property
    def count(self) -> int:
        """Dirty bytes as QEMU counts them: whole chunks, a partial last one too (QEMU
        11.1 shows 2 GiB dirty for a 2 GiB-granularity bitmap of a 1 MB node). A shared
        bitmap is also marked by other processes: its bytes are counted."""
        if self.shared is not None:
            return self._bits[: self._n].count(1) << self.shift
        return self._dirty << self.shift

    # --- the user's bitmaps ------------------------------------------------------------------
    def share(self) -> None:
        """Keep the bytes in a memfd mapping that forks of the daemon mark too
        (shared_bits.py); the node lists it for them while it records."""
        if self.shared is not None:
            return
        shared = SharedBits(self._n)
        shared.map[: self._n] = bytes(self._bits[: self._n])
        self.shared, self._bits = shared, shared.map

    def unshare(self) -> None:
        """Back to private bytes (the bitmap is gone from the node, or is resized)."""
        if self.shared is None:
            return
        self._bits = bytearray(self._bits[: self._n])
        self._dirty = self._bits.count(1)
        self.shared.close()
        self.shared = None

    def shared_entry(self) -> tuple[int, int, int, int] | None:
        """What the node's forks need to mark it: ``(fd, shift, chunks, serial)``."""
        if self.shared is None:
            return None
        return self.shared.fd, self.shift, self._n, self.shared.serial

    def resize(self, length: int) -> SharedBits | None:
        """The node's length changed (QEMU's bdrv_dirty_bitmap_truncate): chunks past the
        new end are dropped, new ones are clean. A shared bitmap moves to a new mapping;
        the old one is returned, for the node to close once the forks were told."""
        chunks = -(-length // self.granularity)
        keep = bytes(self._bits[: min(chunks, self._n)])
        old = self.shared
        self.shared = None
        self._n, self.length = chunks, length
        self._bits = bytearray(keep + bytes(chunks - len(keep)))
        self._dirty = keep.count(1)
        if old is not None:
            self.share()
        return old

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """``(offset, length, dirty)`` runs covering ``[offset, +length)`` (clipped to the
        bitmap's length), neighbours of equal state merged."""
        end = min(offset + length, self.length)
        bits = self._bits
        pos = offset
        while pos < end:
            chunk = pos >> self.shift
            dirty = bool(bits[chunk])
            stop = bits.find(b"\x00" if dirty else b"\x01", chunk, self._n)
            stop_at = end if stop < 0 else min(end, stop << self.shift)
            yield pos, stop_at - pos, dirty
            pos = stop_at

    def extents(self, extents: Any, offset: int, length: int) -> None:
        """NBD's ``qemu:dirty-bitmap:NAME`` context (the export's DirtyBitmapSource): bit 0
        set where dirty, until ``extents`` is full."""
        for _, n, dirty in self.runs(offset, length):
            if not extents.add(n, 1 if dirty else 0):
                return

    def merge_from(self, other: DirtyBitmap) -> None:
        """Mark every chunk that overlaps a dirty chunk of ``other`` (any granularity)."""
        for start, n, dirty in other.runs(0, other.length):
            if dirty:
                self._mark_quietly(start, n)

    def _mark_quietly(self, offset: int, length: int) -> None:
        on_mark, self.on_mark = self.on_mark, None
        try:
            self.mark(offset, length)
        finally:
            self.on_mark = on_mark

    def serialize(self) -> bytes:
        """QEMU's form of the bits: one bit per chunk, chunk ``i`` in bit ``i % 8`` of byte
        ``i // 8``, padded to whole 64-bit words (what its hbitmap holds in memory, what it
        hashes for x-debug-block-dirty-bitmap-sha256, what a qcow2 image stores)."""
        words = max(1, -(-self._n // 64))
        raw = bytes(self._bits[: self._n])
        if 1 not in raw:
            return bytes(words * 8)
        digits = raw[::-1].translate(_TO_DIGITS)
        return int(digits, 2).to_bytes(words * 8, "little")

    def deserialize(self, data: bytes | bytearray) -> None:
        """Take the bits from QEMU's form (:meth:`serialize`); bytes past the last chunk's
        are ignored, missing ones read as clean."""
        nchunks = self._n
        value = int.from_bytes(bytes(data[: -(-nchunks // 8)]), "little")
        digits = format(value, "b").encode()[::-1].translate(_FROM_DIGITS)
        digits = digits[:nchunks]
        self._bits[:nchunks] = digits + bytes(nchunks - len(digits))
        self._dirty = digits.count(1)

    def sha256(self) -> str:
        """x-debug-block-dirty-bitmap-sha256: the hash of QEMU's in-memory form."""
        return hashlib.sha256(self.serialize()).hexdigest()

    def check(
        self, allow_readonly: bool = False, allow_busy: bool = False, only_busy: bool = False
    ) -> None:
        """QEMU's bdrv_dirty_bitmap_check: refuse a busy, read-only or inconsistent bitmap
        with QEMU's text (busy first); ``only_busy``: just a busy one (removal)."""
        if not allow_busy and self.busy:
            raise QMPError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
            )
        if only_busy:
            return
        if not allow_readonly and self.readonly:
            raise QMPError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent:
            raise QMPError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def info(self) -> dict[str, Any]:
        """``BlockDirtyInfo`` as query-named-block-nodes shows it."""
        entry: dict[str, Any] = {
            "name": self.name,
            "count": self.count,
            "granularity": self.granularity,
            "recording": self.enabled,
            "busy": self.busy,
            "persistent": self.persistent,
        }
        if self.inconsistent:
            entry["inconsistent"] = True
        return entry
