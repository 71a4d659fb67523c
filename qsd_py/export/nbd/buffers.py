"""Page-aligned data buffers for the NBD export, reused from request to request.

A READ's data and a large WRITE's payload live in one of these rather than in a bytearray:
an ``O_DIRECT`` file needs the memory aligned (a bytearray's data is not, and the node would
copy every request through a bounce buffer), io_uring reads and writes it by address, and the
reply header leaves as a separate iovec of the same ``sendmsg``. Buffers are ``mmap`` memory in
power-of-two size classes from one page; a freed one goes back to its class's free list, kept
short (:data:`IDLE_BYTES` a class at most) so idle connections hold no memory worth counting.
The lists are shared by every loop: ``list.append``/``list.pop`` are atomic under the GIL.
"""

from __future__ import annotations

import ctypes
import mmap

PAGE = mmap.PAGESIZE
IDLE_BYTES = 32 << 20  #: free memory a size class keeps at most (at least one buffer)
IDLE_COUNT = 256  #: free buffers a size class keeps at most


class AlignedBuffer:
    """``size`` bytes of page-aligned memory: ``view`` to fill or send, ``addr`` for the
    kernel (valid while the buffer lives); ``free`` is its size class's free list."""

    __slots__ = ("mm", "view", "addr", "size", "free", "keep")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size)
        self.view = memoryview(self.mm)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.size = size
        self.free = _free.setdefault(size, [])
        self.keep = max(1, min(IDLE_COUNT, IDLE_BYTES // size))  # free buffers kept at most


_free: dict[int, list[AlignedBuffer]] = {}


def size_class(length: int) -> int:
    """The buffer size that holds ``length`` bytes: a power of two, a page at least."""
    return PAGE if length <= PAGE else 1 << (length - 1).bit_length()


def take(length: int) -> AlignedBuffer:
    """A buffer of at least ``length`` bytes (contents undefined)."""
    size = PAGE if length <= PAGE else 1 << (length - 1).bit_length()
    free = _free.get(size)
    if free:
        try:
            return free.pop()
        except IndexError:  # another loop took the last one
            pass
    return AlignedBuffer(size)


def give(buf: AlignedBuffer) -> None:
    """Return ``buf`` for reuse (the caller holds no view of it any more)."""
    free = buf.free
    if len(free) < buf.keep:
        free.append(buf)


def zero(buf: AlignedBuffer, length: int) -> None:
    """Zero the first ``length`` bytes (a reused buffer holds old data)."""
    ctypes.memset(buf.addr, 0, length)
