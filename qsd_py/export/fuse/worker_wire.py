"""The wire between the daemon and a queue worker process (workers.py): a stream socket pair
carrying frames of ``length, kind, tag`` and a body.

* ``READY``, worker to daemon: the start report, JSON (per queue its ``qid``, its registered
  entries, and the errno of a refused REGISTER).
* ``REQ``, worker to daemon: a request the worker does not answer itself, tagged with a number
  of the worker's; the body is the entry's 288-byte header and its payload.
* ``REP``, daemon to worker: the answer to the ``REQ`` of the same tag: the result, the
  counters the daemon's engine counted for it, and the reply's bytes.
* ``STOP``, daemon to worker: take no new request (the tag is the ``abort`` flag);
  ``STOPPED`` is the worker's answer once it has done so.
* ``PREPARE``, worker to daemon: a WRITE of ``length`` bytes at ``offset`` met clusters that
  read as zeroes and have no host cluster yet (a fresh qcow2 image): make them writable in
  place, so the worker writes the data itself. The ``REP`` of the same tag says 1 (done: the
  cluster table now maps them) or 0 (forward the request).

The counter queries of ``x-query-fuse-queues`` go over a second, blocking socket pair of
their own (workers.py).
"""

from __future__ import annotations

import asyncio
import errno
import struct

from qsd_py.export.fuse import proto as p
from qsd_py.export.fuse.engine import QueueStats

READY, REQ, REP, STOP, STOPPED, PREPARE = 1, 2, 3, 4, 5, 6
_RANGE = struct.Struct("<QI")  # PREPARE: offset, length
_FRAME = struct.Struct("<IBI")  # body length, kind, tag
_REPLY = struct.Struct("<iQQQQ")  # res, then the stats the daemon's engine counted
_PAYLOAD_SZ = struct.Struct("<I")
_PAYLOAD_SZ_AT = p.URING_ENT_OFFSET + 16


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """The next frame: its kind, tag and body."""
    size, kind, tag = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    return kind, tag, await reader.readexactly(size) if size else b""


def frame(kind: int, tag: int, *parts: bytes | memoryview) -> bytes:
    """A frame whose body is ``parts`` one after the other."""
    return b"".join((_FRAME.pack(sum(len(x) for x in parts), kind, tag), *parts))


def unpack_range(body: bytes) -> tuple[int, int]:
    """A ``PREPARE`` body: ``(offset, length)``."""
    return _RANGE.unpack_from(body)


def reply_frame(tag: int, res: int, stats: QueueStats, data: bytes | memoryview) -> bytes:
    """The ``REP`` frame answering request ``tag``: ``res`` (a length or ``-errno``), the
    counters in ``stats`` and the reply's bytes ``data``."""
    counters = _REPLY.pack(res, stats.errors, stats.bytes_read, stats.bytes_written,
                           stats.interrupts)  # fmt: skip
    return frame(REP, tag, counters, data)


class Forwarder:
    """The worker's end of forwarded requests: sent to the daemon's engine as bytes (the
    entry's 288-byte header: in-header, argument, payload size; and its payload); the reply's
    bytes come back into the entry's payload."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.next_tag = 0

    async def forward(self, header: memoryview, payload: memoryview, stats: QueueStats) -> int:
        size = _PAYLOAD_SZ.unpack_from(header, _PAYLOAD_SZ_AT)[0]
        if self.writer is None or self.writer.is_closing():
            return -errno.ENOTCONN
        self.next_tag += 1
        tag = self.next_tag
        fut = self.pending[tag] = asyncio.get_running_loop().create_future()
        try:
            self.writer.write(frame(REQ, tag, header, payload[:size]))
            body = await fut
        finally:
            self.pending.pop(tag, None)
        res, errors, nread, nwritten, interrupts = _REPLY.unpack_from(body)
        stats.errors += errors
        stats.bytes_read += nread
        stats.bytes_written += nwritten
        stats.interrupts += interrupts
        if res > 0:
            payload[:res] = memoryview(body)[_REPLY.size : _REPLY.size + res]
        return res

    async def prepare(self, offset: int, length: int) -> bool:
        """Ask the daemon to make ``[offset, +length)`` writable in place (``PREPARE``)."""
        if self.writer is None or self.writer.is_closing():
            return False
        self.next_tag += 1
        tag = self.next_tag
        fut = self.pending[tag] = asyncio.get_running_loop().create_future()
        try:
            self.writer.write(frame(PREPARE, tag, _RANGE.pack(offset, length)))
            body = await fut
        finally:
            self.pending.pop(tag, None)
        return _REPLY.unpack_from(body)[0] == 1

    def reply(self, tag: int, body: bytes) -> None:
        """The daemon's ``REP`` body for request ``tag``."""
        fut = self.pending.get(tag)
        if fut is not None and not fut.done():
            fut.set_result(body)

    def fail_all(self) -> None:
        """The daemon is gone: every request waiting for it ends with ENOTCONN."""
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result(_REPLY.pack(-errno.ENOTCONN, 0, 0, 0, 0))
