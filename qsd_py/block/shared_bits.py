"""Dirty bitmaps that processes forked from the daemon mark themselves.

The FUSE-over-io_uring queue workers are forks of the daemon that write a node's file
without its coroutines. Closing their fast path while a user keeps a bitmap (users keep
bitmaps all the time, for backups) would send every write through the daemon. Instead a
user's bitmap keeps its bytes (one per chunk, dirty.py) in a ``memfd`` mapping, and each
node has a page shared with every later fork (:attr:`BlockNode.fork_page`) that lists the
node's recording bitmaps: a worker marks them after each fast write it completed, as the
node does after the writes it serves. A mark is a store of ``1`` bytes: no read-modify-
write, so the daemon and the workers never lose each other's marks.

The page's layout: byte 0 the write gate (fast_io.route: set, writes take the node), byte 1
set while the list below is not empty (a node below the exported one: see fast_io), then
at 8 a sequence number, odd while the daemon rewrites the list (a seqlock), the daemon's
pid, the number of entries, and from 32 the entries: the memfd's descriptor in the daemon,
the granularity's shift, the number of chunks and a serial number (descriptors are reused;
serials are not). A worker maps a bitmap it has not seen yet
through ``/proc/PID/fd/N``; a bitmap created after the fork is found so.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct

_HEAD = struct.Struct("=QII")  # sequence, daemon pid, entries (at 8)
_ENTRY = struct.Struct("=IIQQ")  # memfd, shift, chunks, serial
_HEAD_AT, _ENTRIES_AT = 8, 32
MAX_ENTRIES = (mmap.PAGESIZE - _ENTRIES_AT) // _ENTRY.size
_serials = itertools.count(1)


class SharedBits:
    """``size`` bytes in a memfd mapping (``map``), kept open by the daemon (``fd``)."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("qsd-dirty-bitmap", os.MFD_CLOEXEC)
        self.size = max(size, 1)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        self.serial = next(_serials)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def publish(page: mmap.mmap, bitmaps: list[tuple[int, int, int, int]]) -> None:
    """Write the list of ``(fd, shift, chunks, serial)`` a node's forks must mark (daemon
    side)."""
    bitmaps = bitmaps[:MAX_ENTRIES]
    seq = _HEAD.unpack_from(page, _HEAD_AT)[0]
    _HEAD.pack_into(page, _HEAD_AT, seq + 1, os.getpid(), len(bitmaps))
    for i, entry in enumerate(bitmaps):
        _ENTRY.pack_into(page, _ENTRIES_AT + i * _ENTRY.size, *entry)
    _HEAD.pack_into(page, _HEAD_AT, seq + 2, os.getpid(), len(bitmaps))
    page[1] = 1 if bitmaps else 0


class Marker:
    """A fork's view of one node's list: :meth:`mark` marks every listed bitmap."""

    __slots__ = ("page", "seq", "maps", "opened")

    def __init__(self, page: mmap.mmap) -> None:
        self.page = page
        self.seq = 0
        self.maps: list[tuple[mmap.mmap, int, int]] = []
        self.opened: dict[tuple[int, int], mmap.mmap] = {}

    def mark(self, offset: int, length: int) -> None:
        """The node's bytes ``[offset, +length)`` were written (``length`` > 0)."""
        if _HEAD.unpack_from(self.page, _HEAD_AT)[0] != self.seq:
            self._reload()
        for bits, shift, chunks in self.maps:
            first = offset >> shift
            last = min((offset + length - 1) >> shift, chunks - 1)
            if first <= last:
                bits[first : last + 1] = b"\x01" * (last - first + 1)

    def _reload(self) -> None:
        """Read the list (a consistent copy: the sequence even and the same before and
        after) and map its bitmaps; done only if the sequence still has not moved once
        they are mapped, since the daemon closes a bitmap's memfd (and may reuse its
        number) only after it republished the list without it."""
        page = self.page
        while True:
            seq, pid, count = _HEAD.unpack_from(page, _HEAD_AT)
            if seq & 1:
                continue  # the daemon is rewriting the list: a few stores, wait them out
            entries = [_ENTRY.unpack_from(page, _ENTRIES_AT + i * _ENTRY.size)
                       for i in range(count)]  # fmt: skip
            if _HEAD.unpack_from(page, _HEAD_AT)[0] != seq:
                continue
            maps = []
            opened = {}
            for fd, shift, chunks, serial in entries:
                key = (pid, serial)
                bits = self.opened.get(key) or opened.get(key)
                if bits is None:
                    bits = _map(pid, fd, chunks)
                opened[key] = bits
                maps.append((bits, shift, chunks))
            if _HEAD.unpack_from(page, _HEAD_AT)[0] == seq:
                break
        self.opened = opened  # mappings of bitmaps no longer listed are dropped
        self.maps = maps
        self.seq = seq


def _map(pid: int, fd: int, chunks: int) -> mmap.mmap:
    """The daemon's memfd ``fd`` mapped here (this process is the daemon, or its fork)."""
    if pid == os.getpid():
        path = f"/proc/self/fd/{fd}"
    else:
        path = f"/proc/{pid}/fd/{fd}"
    handle = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(handle, max(chunks, 1))
    finally:
        os.close(handle)
