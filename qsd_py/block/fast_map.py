"""How a node's bytes map to a host file, for exports that do I/O without the node.

An export's hot path (a 4 KiB READ or WRITE) costs less than a coroutine when it can go
straight to a host fd. A node says whether and how with :meth:`BlockNode.fast_target`: a
:class:`FastTarget` names the host file and a constant offset (``file``; ``raw`` adds its
window), or says the node is ``null-co``, and for a format with its own mapping (qcow2)
carries a :class:`ClusterTable`: guest cluster -> host offset, readable without the daemon.

The table lives in shared memory because FUSE-over-io_uring queues are served by forked
worker processes. Its rule is that an entry is either 0 (ask the node: the slow road) or
true now. The node publishes entries as it learns them and clears or lowers one *before*
the mapping stops being true. What makes freeing a host cluster safe is the readers'
counters: a reader (a queue) bumps its ``started`` count before it reads an entry and its
``finished`` count when the I/O it routed by it is done. Before a cluster whose entry was
cleared is freed (and could be handed to another guest range), :meth:`ClusterTable.barrier`
forces a memory barrier on every CPU that runs a registered process (``membarrier``, so a
reader either saw the cleared entry or its ``started`` is visible), then waits until every
reader finished what it had started. A reader that never finishes (a stopped worker) makes
the barrier fail; the caller then leaks the cluster instead of reusing it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import os
import threading
import time
from array import array
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from qsd_py.block.drivers.file import FileNode

log = logging.getLogger(__name__)

# Entry bits; the host offset is cluster aligned, so the low 9 bits are free.
VALID = 1  #: the entry says something (0: ask the node)
WRITABLE = 2  #: writes may go to the host offset in place
ZERO = 4  #: the cluster reads as zeroes (no host offset)
OFFSET_MASK = ~0x1FF

MAX_READERS = 64
_CELL = 64  # bytes between readers' counters: one cache line each
MAX_ENTRIES = 1 << 27  # 1 GiB of address space at most; clusters past it take the slow road
BARRIER_TIMEOUT_S = 5.0

_SYS_MEMBARRIER = 324  # x86_64
_MEMBARRIER_GLOBAL = 1
_MEMBARRIER_GLOBAL_EXPEDITED = 2
_MEMBARRIER_REGISTER_GLOBAL_EXPEDITED = 4
_libc = ctypes.CDLL(None, use_errno=True)


def register_reader_process() -> None:
    """Let :func:`_membarrier` reach this process cheaply (an IPI instead of an RCU grace
    period); every process that reads tables calls it (the daemon, each queue worker)."""
    _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_REGISTER_GLOBAL_EXPEDITED, 0, 0)


def _membarrier() -> None:
    """A full memory barrier on every CPU running a reader, or on all CPUs (slower)."""
    if _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_GLOBAL_EXPEDITED, 0, 0) == 0:
        return
    if _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_GLOBAL, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "membarrier failed")


def _memfd(name: str, size: int) -> int:
    """A zero-filled shared memory file of ``size`` bytes (sparse: pages appear when used)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class FastTarget(NamedTuple):
    """What a node's bytes are on the host. ``file`` and ``base``: node offset + base is
    the file offset (after ``table`` mapped it, for a format with clusters). ``null``: a
    null-co node (``read_zeroes`` says what reads see). ``image``: an RBD image
    (``capi.Image``; node offset + base is the image offset), reached through librbd in
    the daemon only. ``writable``: writes may go there."""

    file: FileNode | None = None
    base: int = 0
    table: ClusterTable | None = None
    null: bool = False
    read_zeroes: bool = False
    writable: bool = True
    image: Any = None


class ClusterTable:
    """Guest cluster -> entry (``VALID``/``WRITABLE``/``ZERO`` | host offset), shared
    with worker processes, and the counters of the readers that use it."""

    def __init__(self, cluster_bits: int, clusters: int) -> None:
        self.cluster_bits = cluster_bits
        self.capacity = min(MAX_ENTRIES, max(2 * clusters, clusters + (1 << 16)))
        # In memfds, so that a queue worker forked before this table existed can map it
        # too (the fds go over SCM_RIGHTS: qsd_py/export/fuse/plan_wire.py).
        self._pid = os.getpid()  # the fds are this process's (a fork closed its copies)
        self.fd = self.counts_fd = -1
        self.fd = _memfd("qsd-cluster-table", self.capacity * 8)
        self.counts_fd = _memfd("qsd-table-readers", MAX_READERS * _CELL)
        self._map = mmap.mmap(self.fd, self.capacity * 8)
        self.entries = memoryview(self._map).cast("Q")
        self._counters_map = mmap.mmap(self.counts_fd, MAX_READERS * _CELL)
        # Reader i's started count at [8 * i], its finished count at [8 * i + 1].
        self.counts = memoryview(self._counters_map).cast("Q")
        self._slots: set[int] = set()
        self._lock = threading.Lock()
        self.dirty = False  # an entry was cleared or lowered since the last barrier
        register_reader_process()

    # --- the node's side --------------------------------------------------------------------
    def publish(self, cluster: int, value: int) -> None:
        """Set what cluster ``cluster`` maps to (0: unknown). Lowering an entry (fewer
        rights, another host offset) marks the table for a :meth:`barrier`."""
        if cluster >= self.capacity:
            return
        old = self.entries[cluster]
        if old == value:
            return
        if old & VALID and (value & old != old or (value ^ old) & OFFSET_MASK):
            self.dirty = True  # not just more rights on the same place
        self.entries[cluster] = value

    def publish_run(self, first: int, values: list[int]) -> None:
        """:meth:`publish` of consecutive entries from ``first`` (a batched allocation's
        16) in one loop. Each entry is stored on its own, an aligned 8-byte store that a
        reader never sees torn (a slice copy may move bytes in other widths)."""
        end = min(first + len(values), self.capacity)
        entries = self.entries
        for cluster, value in zip(range(first, end), values, strict=False):
            old = entries[cluster]
            if old & VALID and (value & old != old or (value ^ old) & OFFSET_MASK):
                self.dirty = True  # not just more rights on the same place
            entries[cluster] = value

    def publish_range(self, first: int, count: int, value: int) -> None:
        """Set ``count`` entries from ``first`` that are still 0 (unknown) to ``value``: only
        ever raises entries (a range the node learned in one go, e.g. with no L2 table)."""
        end = min(first + count, self.capacity)
        if end <= first:
            return
        entries = self.entries
        if not any(entries[first:end].tobytes()):
            self._map[first * 8 : end * 8] = array("Q", [value]).tobytes() * (end - first)
            return
        for cluster in range(first, end):
            if not entries[cluster]:
                entries[cluster] = value

    def clear_all(self) -> None:
        """Forget everything (the node's mapping changed wholesale: a new backing node)."""
        self._map[:] = bytes(len(self._map))
        self.dirty = True

    async def barrier(self) -> bool:
        """Wait until no reader can still use an entry cleared or lowered before the call:
        False if a reader did not finish in time (leak what you wanted to free)."""
        if not self.dirty:
            return True
        _membarrier()
        with self._lock:
            slots = list(self._slots)
        counts = self.counts
        waiting = [(s, counts[s * 8]) for s in slots]
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        for slot, started in waiting:
            while counts[slot * 8 + 1] < started:
                if time.monotonic() > deadline:
                    log.error("a fast-path reader did not finish its requests in time")
                    return False
                await asyncio.sleep(0.0002)
        self.dirty = False
        return True

    # --- readers ---------------------------------------------------------------------------
    def claim(self) -> int:
        """A reader slot for one queue (-1: none left, the queue takes the slow road)."""
        with self._lock:
            for slot in range(MAX_READERS):
                if slot not in self._slots:
                    self._slots.add(slot)
                    self.counts[slot * 8 + 1] = self.counts[slot * 8]
                    return slot
        return -1

    def unclaim(self, slot: int) -> None:
        with self._lock:
            self._slots.discard(slot)

    def close(self) -> None:
        """Unmap (if no plan holds a view any more; else the views keep it alive)."""
        for view in (self.entries, self.counts):
            view.release()
        for m in (self._map, self._counters_map):
            try:
                m.close()
            except BufferError:
                pass
        self._close_fds()

    def _close_fds(self) -> None:
        if os.getpid() != getattr(self, "_pid", -1):
            return
        for fd in (self.fd, self.counts_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.counts_fd = -1

    def __del__(self) -> None:
        """A table replaced without :meth:`close` (a reload) gives its memfds back."""
        self._close_fds()
