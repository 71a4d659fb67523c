"""Page-aligned buffers that a copy loop (mirror, block-copy) reuses from chunk to chunk.

A bytearray's memory is not aligned: a node on an ``O_DIRECT`` file (``cache.direct=on``)
would copy every read and write of it through a bounce buffer in a pool thread. ``mmap``
memory is page-aligned; keeping a few buffers of the loop's chunk size also saves the page
faults of fresh memory on every chunk (a 1 GiB copy takes a thousand 1 MiB chunks).
"""

from __future__ import annotations

import mmap

KEEP = 16  # free buffers kept at most (QEMU's mirror has 16 MiB of 1 MiB requests in flight)


class BufferPool:
    """Buffers of ``size`` bytes; :meth:`take` one, :meth:`give` it back when done."""

    def __init__(self, size: int) -> None:
        self.size = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        self._free: list[mmap.mmap] = []

    def take(self, length: int) -> tuple[mmap.mmap, memoryview]:
        """A buffer and a view of its first ``length`` bytes (``length`` <= ``size``: a
        larger one is made for the occasion and not kept)."""
        if length > self.size:
            mm = mmap.mmap(-1, length)
        else:
            mm = self._free.pop() if self._free else mmap.mmap(-1, self.size)
        return mm, memoryview(mm)[:length]

    def give(self, mm: mmap.mmap, view: memoryview) -> None:
        """Take the buffer back; ``view`` (from :meth:`take`) is released first. A buffer
        whose memory is still exported somewhere is left to the garbage collector."""
        try:
            view.release()
        except BufferError:
            return
        if len(mm) == self.size and len(self._free) < KEEP:
            self._free.append(mm)
