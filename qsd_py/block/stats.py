"""What a node counts for ``query-blockstats`` and its write threshold, in shared memory.

QEMU's daemon shows two things per node (``query-blockstats`` with ``query-nodes``): the
highest end of any write or write-zeroes the node saw (``wr_highest_offset``), and for the
``file`` driver how many discards succeeded or failed. Every other counter of BlockStats is
kept by a BlockBackend, and the daemon's BlockBackends (exports, jobs) have no name, so
QEMU shows them as zeroes at node level. qsd-py keeps QEMU's reply shape but counts the
requests that reach each node: reads, writes (write-zeroes included, as a guest's write
zeroes is a write in QEMU's device accounting), flushes and discards (``unmap_*``), their
bytes, the failed ones, and when the last one arrived (``idle_time_ns``). ``*_total_time_ns``
stay 0: timing a request takes two clock reads and a start time carried through every
transport's request slot, more than this accounting is allowed to cost the fast path;
``invalid_*`` stay 0 because exports refuse invalid requests before they reach a node.

Requests reach a node without its coroutines too: the exports' fast path (fast_io.py), run
by the daemon for NBD and ``/dev/fuse`` and by forked processes for FUSE-over-io_uring
queues (qsd_py/export/fuse/workers.py). So the counters live in a page of memory shared
with those processes, one row of two cache lines (:data:`WORDS` words) per process: each
process adds only to its own row (plain integer adds, no atomics, no line bouncing between
CPUs), and the node's value is the sum over the rows (for ``wr_highest_offset`` the
maximum). The daemon is row 0; a queue worker gets a row of its own before it forks
(:func:`claim_process_row`) and sets it in the child (:func:`set_process_row`). Threads of
one process must not share a row either (a read-add-store can be interrupted between its
steps), so every other thread that counts (an iothread's loop) takes a row of its own the
first time (:func:`process_row`).

A queue worker's fast path passes every request it counts in the exported node on to each
node below it down to the cluster table (a raw window only shifts the offsets), so counting
it once per node costs the worker's hot path a loop for nothing. Instead, before the fork,
each such node *derives* the worker's row from the exported node's (:meth:`NodeStats.derive`:
the same requests, its highest end shifted by the windows between): the worker counts in the
top node only, and the node's sums add the top's row. When the worker is gone
(:func:`release_process_row`) the derived counts are written into the node's own row, and
the row, reused, is counted directly again.

The write threshold (``block-set-write-threshold``) lives in the same page (row 0, word 0),
written only by the daemon. The fast path reads it: a write that would end past an armed
threshold is not served fast but handed to the node (forwarded by a worker), whose
coroutine sends ``BLOCK_WRITE_THRESHOLD`` and disarms it, as QEMU does before the write.
Sharing the threshold rather than closing the fast path while one is armed keeps writes
below it fast: a threshold is typically armed for a long time (libvirt watches the
allocation of thin storage that way), and most writes stay below it.
"""

from __future__ import annotations

import asyncio
import mmap
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

MAX_ROWS = 64  #: the daemon and up to 63 worker processes
WORDS = 16  #: two 64-byte cache lines per process
THRESHOLD = 0  #: word of row 0: the write threshold (0: disarmed)
HIGHEST = 1  #: word of every row: the highest write end that process saw
# Words of every row: that process's request counters (query-blockstats), summed over rows.
RD_BYTES, WR_BYTES, UNMAP_BYTES = 2, 3, 4
RD_OPS, WR_OPS, FLUSH_OPS, UNMAP_OPS = 5, 6, 7, 8
FAILED_RD, FAILED_WR, FAILED_FLUSH, FAILED_UNMAP = 9, 10, 11, 12
LAST_IO = 13  #: time.monotonic_ns() when that process's last request reached the node

_row = 0  # the row of this process's main thread: 0 in the daemon
_local = threading.local()
_shared_lock = threading.Lock()  # for threads left without a row of their own
_free_rows = set(range(1, MAX_ROWS))
_rows_lock = threading.Lock()
#: The words a fast path writes in a row (the ones a derived row takes from its source).
DERIVED = (RD_BYTES, WR_BYTES, RD_OPS, WR_OPS, FAILED_RD, FAILED_WR)
# The nodes deriving a row from another node's (NodeStats.derive), by row.
_deriving: dict[int, weakref.WeakSet[NodeStats]] = {}


def claim_process_row() -> int:
    """A row for a worker process about to be forked; -1 when none is left (its plans then
    send every write to the daemon)."""
    with _rows_lock:
        if not _free_rows:
            return -1
        row = min(_free_rows)
        _free_rows.discard(row)
        return row


def release_process_row(row: int) -> None:
    """The worker is gone. Its cells keep their values: they are history every node's
    maximum includes, and a later owner only raises them."""
    if row > 0:
        for stats in list(_deriving.pop(row, ())):
            stats.settle(row)
        with _rows_lock:
            _free_rows.add(row)


def set_process_row(row: int) -> None:
    """In a forked worker (its only thread): the row its fast-path writes mark."""
    global _row
    _row = row
    _local.row = row


def process_row() -> int:
    """The calling thread's row: the process's for its main thread, else one claimed for
    the thread on first use (-1: none left)."""
    row = getattr(_local, "row", None)
    if row is None:
        thread = threading.current_thread()
        if thread is threading.main_thread():
            row = _row
        else:
            row = claim_process_row()
            weakref.finalize(thread, release_process_row, row)  # the thread object's end
        _local.row = row
    return row


class NodeStats:
    """One node's shared page and the daemon-only counters of its driver."""

    __slots__ = ("_map", "cells", "_emit", "_loop", "_lock", "discard_ok", "discard_failed",
                 "discard_bytes", "derived", "__weakref__")  # fmt: skip

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, MAX_ROWS * WORDS * 8)  # MAP_SHARED: seen across fork
        self.cells = memoryview(self._map).cast("Q")
        self._emit: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # The file driver's discards (QEMU's BlockStatsSpecificFile); only the daemon
        # discards, so plain integers do.
        self.discard_ok = 0
        self.discard_failed = 0
        self.discard_bytes = 0
        # Rows this node takes from another node's page: row -> (its stats, shift).
        self.derived: dict[int, tuple[NodeStats, int]] = {}

    # --- wr_highest_offset ---------------------------------------------------------------
    def wrote(self, end: int) -> None:
        """A write or write-zeroes of the daemon ended at ``end`` (even a failed one)."""
        cells = self.cells
        row = getattr(_local, "row", None)
        if row is None:
            row = process_row()
        if row < 0:  # rows ran out: the main thread's row, under a lock among such threads
            with _shared_lock:
                at = _row * WORDS + HIGHEST
                if cells[at] < end:
                    cells[at] = end
            return
        at = row * WORDS + HIGHEST
        if cells[at] < end:
            cells[at] = end

    def highest(self) -> int:
        cells = self.cells
        top = max(cells[r * WORDS + HIGHEST] for r in range(MAX_ROWS))
        for row, (source, shift) in list(self.derived.items()):
            end = source.cells[row * WORDS + HIGHEST]
            if end:
                top = max(top, end + shift)
        return top

    # --- rows derived from another node's --------------------------------------------------
    def derive(self, source: NodeStats, row: int, shift: int) -> bool:
        """From now on this node's row ``row`` is ``source``'s (a worker about to be forked
        counts its fast requests in ``source`` only, every one of which reaches this node
        ``shift`` bytes further); False, and nothing changes, unless both rows are unused
        (a reused row keeps its history and is counted directly)."""
        if row <= 0 or row in self.derived:
            return False
        at = row * WORDS
        if any(self.cells[at : at + WORDS]) or any(source.cells[at : at + WORDS]):
            return False
        self.derived[row] = (source, shift)
        _deriving.setdefault(row, weakref.WeakSet()).add(self)
        return True

    def derives(self, row: int, source: NodeStats) -> bool:
        """Whether row ``row`` is taken from ``source`` (the worker then skips this node)."""
        entry = self.derived.get(row)
        return entry is not None and entry[0] is source

    def settle(self, row: int) -> None:
        """The worker of ``row`` is gone: write what the row took from its source into this
        node's own row, which counts directly from now on."""
        entry = self.derived.pop(row, None)
        if entry is None:
            return
        source, shift = entry
        src, cells, at = source.cells, self.cells, row * WORDS
        for word in DERIVED:
            cells[at + word] += src[at + word]
        cells[at + LAST_IO] = max(cells[at + LAST_IO], src[at + LAST_IO])
        if src[at + HIGHEST]:
            cells[at + HIGHEST] = max(cells[at + HIGHEST], src[at + HIGHEST] + shift)

    # --- request counters ----------------------------------------------------------------
    def account(self, ops: int, nbytes_word: int, nbytes: int) -> None:
        """A request of this process reached the node and ended: one more in word ``ops``
        (the kind's operations, or its failed ones) and ``nbytes`` more in ``nbytes_word``
        (-1: none), in the calling thread's row."""
        row = getattr(_local, "row", None)
        if row is None:
            row = process_row()
        if row < 0:  # rows ran out: the main thread's row, under a lock among such threads
            with _shared_lock:
                _add(self.cells, _row * WORDS, ops, nbytes_word, nbytes)
            return
        _add(self.cells, row * WORDS, ops, nbytes_word, nbytes)

    def totals(self) -> list[int]:
        """Each word summed over the rows (the node's counters); ``LAST_IO``: the latest."""
        cells = self.cells
        sums = [sum(cells[w::WORDS]) for w in range(WORDS)]
        sums[LAST_IO] = max(cells[LAST_IO::WORDS])
        for row, (source, _) in list(self.derived.items()):
            src, at = source.cells, row * WORDS
            for word in DERIVED:
                sums[word] += src[at + word]
            sums[LAST_IO] = max(sums[LAST_IO], src[at + LAST_IO])
        return sums

    # --- write threshold -------------------------------------------------------------------
    @property
    def threshold(self) -> int:
        return int(self.cells[THRESHOLD])

    def set_threshold(self, value: int, emit: Callable[[str, dict[str, Any]], None],
                      node_name: str) -> None:  # fmt: skip
        """Arm (``value`` > 0) or disarm (0); the event goes out through ``emit`` on the
        loop of the command (the main loop), whichever loop the crossing write runs on."""
        self._loop = asyncio.get_running_loop()

        def send(amount: int, threshold: int) -> None:
            emit("BLOCK_WRITE_THRESHOLD", {"node-name": node_name,
                 "amount-exceeded": amount, "write-threshold": threshold})  # fmt: skip

        self._emit = send  # type: ignore[assignment]
        self.cells[THRESHOLD] = value

    def check_threshold(self, end: int) -> None:
        """Before a write or discard ending at ``end``: past the armed threshold, disarm it
        and send the event (once: a racing write finds it disarmed)."""
        threshold = self.cells[THRESHOLD]
        if not threshold or threshold >= end:
            return
        with self._lock:
            if self.cells[THRESHOLD] != threshold:
                return
            self.cells[THRESHOLD] = 0
        send, loop = self._emit, self._loop
        if send is None or loop is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            send(end - threshold, threshold)  # type: ignore[call-arg]
        else:
            loop.call_soon_threadsafe(send, end - threshold, threshold)


def _add(cells: memoryview, at: int, ops: int, nbytes_word: int, nbytes: int) -> None:
    cells[at + ops] += 1
    if nbytes_word >= 0:
        cells[at + nbytes_word] += nbytes
    cells[at + LAST_IO] = time.monotonic_ns()
