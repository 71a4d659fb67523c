"""A node's length in memory shared between the daemon and its queue worker processes.

A worker's fast path needs the node's length for its EOF rules, but the node lives in the
daemon; the daemon publishes it into a page the workers inherited at the fork (workers.py
says when).
"""

from __future__ import annotations

import ctypes
import mmap


class SharedLength:
    """The node's length in a page shared with the workers (``MAP_SHARED``, inherited by
    the fork). One aligned 8-byte load or store through ctypes, so a worker never reads a
    half-written value; ``struct.pack_into`` would not do: it zeroes its bytes before it
    writes them, and a worker reading meanwhile saw length 0 (a write answered as short,
    which the application gets as EIO)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)
        self._cell: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._page)

    def publish(self, length: int) -> None:
        cell = self._cell
        if cell is not None and cell.value != length:  # unchanged: no store at all
            cell.value = length

    def read(self) -> int:
        """The length (a queue worker's ``node.length``: read for every READ and WRITE; after
        :meth:`close` it raises AttributeError)."""
        return self._cell.value  # type: ignore[union-attr]

    def close(self) -> None:
        self._cell = None  # the page cannot be unmapped while ctypes holds it
        self._page.close()
