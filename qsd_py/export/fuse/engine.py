"""The sans-I/O FUSE engine: request bytes in, block-node calls, reply bytes out.

The engine serves one FUSE file (the export) with QEMU 11.1's semantics. It never touches
/dev/fuse or io_uring: a transport hands it views of one request and a view to write the
reply's arguments into, and writes the reply header itself. That split is what lets the
/dev/fuse transport (one contiguous buffer per request) and the FUSE-over-io_uring transport
(in-header and first argument in the 288-byte entry header at offsets 0 and 128, further
arguments and write data in the entry's payload buffer) share every line of semantics.

Calling convention, for every transport::

    result = await engine.handle(hdr, arg, payload, out, stats)

* ``hdr``: the ``fuse_in_header`` (at least 40 bytes).
* ``arg``: the opcode's arguments. For /dev/fuse: everything after the in-header (first
  argument followed by the rest, e.g. write data), with ``payload=None``. For io_uring: the
  128-byte op area of the entry header, with ``payload`` = the entry payload (write data).
* ``out``: where the reply's arguments go (after the out-header for /dev/fuse, the entry's
  payload for io_uring). READ reads from the node straight into it.
* ``stats``: the queue's :class:`QueueStats`, bumped for bytes moved.
* ``result``: ``None`` = send no reply (FORGET, BATCH_FORGET, INTERRUPT); ``< 0`` = reply
  with that ``-errno`` and no arguments; ``>= 0`` = reply with that many bytes of ``out``.

FUSE_INIT is separate and synchronous (:meth:`FuseEngine.init`) because it is answered before
any transport runs; its ``want`` argument is the hook through which the io_uring transport
asks for ``FUSE_OVER_IO_URING``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd_py.block.drain import InFlight
from qsd_py.block.lock import CrossLoopLock
from qsd_py.export.fuse import proto as p

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode

log = logging.getLogger("qsd_py.export.fuse")

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_READ = 1 << 20  # the mount's max_read, as QEMU's
DEFAULT_MAX_WRITE = 1 << 20  # QEMU uses 64 KiB; larger requests cost Python far less per byte
MIN_MAX_WRITE = 64 << 10
KERNEL_DEFAULT_MAX_PAGES = 32  # what the kernel assumes when FUSE_MAX_PAGES is not negotiated
MAX_BACKGROUND = 128  # async DIO/readahead requests the kernel may have in flight at once
ATTR_VALID_S = 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SEEK_DATA = 3
SEEK_HOLE = 4
_IO_EXTENT = p.IO_EXTENT

# What the engine asks for in INIT (masked with what the kernel offers).
WANT_FLAGS = (
    p.ASYNC_READ
    | p.ASYNC_DIO
    | p.BIG_WRITES
    | p.MAX_PAGES
    | p.ATOMIC_O_TRUNC  # O_TRUNC must not truncate the image: QEMU ignores it
    | p.INIT_EXT
    | p.DIRECT_IO_ALLOW_MMAP  # shared mmap on a direct-I/O file
)
SETATTR_IGNORED = p.FATTR_FH | p.FATTR_LOCKOWNER  # the kernel adds these to plain truncates
SETATTR_SUPPORTED = p.FATTR_SIZE | p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | SETATTR_IGNORED

_OP_AT_4 = struct.Struct("<I")  # the opcode, at offset 4 of fuse_in_header


class QueueStats:
    """Per-queue counters (one per /dev/fuse fd or io_uring queue): the visible proof of
    which transport carried the I/O. Plain ints: each queue is touched by one thread."""

    __slots__ = (
        "requests",
        "in_flight",
        "bytes_read",
        "bytes_written",
        "errors",
        "interrupts",
        "engine_requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.interrupts = 0
        self.engine_requests = 0  # served by the engine's coroutine (not the fast path)

    def as_dict(self) -> dict[str, int]:
        return {name.replace("_", "-"): getattr(self, name) for name in self.__slots__}


def _max_pages_limit() -> int:
    """The kernel's cap on max_pages (sysctl fs.fuse.max_pages_limit, 256 by default)."""
    try:
        with open("/proc/sys/fs/fuse/max_pages_limit") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return 256


class Gate:
    """Closed: requests wait at :meth:`wait_open` (on whatever loop they run) until it is
    open again; nests (closed twice, opened twice)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.closed = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def close(self) -> None:
        with self._lock:
            self.closed += 1

    def open(self) -> None:
        with self._lock:
            self.closed -= 1
            if self.closed:
                return
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    async def wait_open(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self.closed:
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        await fut


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FuseEngine:
    """Serves the FUSE protocol for one exported block node (a single regular file)."""

    def __init__(
        self,
        node: BlockNode,
        *,
        writable: bool,
        growable: bool = False,
        writethrough: bool = False,
        allow_other: bool = False,
        max_write: int = DEFAULT_MAX_WRITE,
    ) -> None:
        self.node = node
        self.writable = writable
        self.growable = growable
        self.writethrough = writethrough
        self.allow_other = allow_other  # the effective value, set by the mount
        self.requested_max_write = max(MIN_MAX_WRITE, max_write)
        # stat data kept in memory (QEMU: chmod/chown live as long as the export)
        self.mode = stat.S_IFREG | stat.S_IRUSR | (stat.S_IWUSR if writable else 0)
        self.uid = os.getuid()
        self.gid = os.getgid()
        # negotiated by INIT
        self.proto_minor = 0
        self.flags = 0
        self.max_write = MIN_MAX_WRITE
        self.max_pages = KERNEL_DEFAULT_MAX_PAGES
        self.resize_lock = CrossLoopLock()
        # Requests being served (from before they look at ``node``), and the gate a drain
        # closes: :meth:`quiesce`.
        self.in_flight = InFlight()
        self.gate = Gate()
        self._ops: dict[int, Callable[..., Awaitable[int]]] = {
            p.LOOKUP: self._lookup,
            p.GETATTR: self._getattr,
            p.SETATTR: self._setattr,
            p.OPEN: self._open,
            p.RELEASE: self._nothing,
            p.STATFS: self._statfs,
            p.FSYNC: self._fsync,
            p.FLUSH: self._fsync,
            p.DESTROY: self._nothing,
            p.FALLOCATE: self._fallocate,
            p.LSEEK: self._lseek,
        }

    # --- sizes the transports need ---------------------------------------------------------
    @property
    def payload_size(self) -> int:
        """Bytes an io_uring entry's payload buffer must hold (the kernel checks it)."""
        return max(p.MIN_READ_BUFFER, self.max_write, self.max_pages * PAGE_SIZE, MAX_READ)

    @property
    def request_buffer_size(self) -> int:
        """Bytes a /dev/fuse read buffer must hold: headers, write_in and max_write."""
        return max(p.MIN_READ_BUFFER, p.IN_HEADER.size + p.WRITE_IN.size + self.max_write)

    @property
    def reply_buffer_size(self) -> int:
        """Bytes a /dev/fuse reply buffer must hold: out-header and the largest READ."""
        return p.OUT_HEADER.size + max(MAX_READ, self.max_pages * PAGE_SIZE)

    # --- INIT ------------------------------------------------------------------------------
    def init(self, arg: memoryview, out: memoryview, want: int = 0) -> int:
        """Answer FUSE_INIT: returns the reply length (into ``out``) or ``-errno``.

        ``want`` adds flags a transport needs (``proto.OVER_IO_URING``); like every flag it
        is only granted if the kernel offers it: check ``flags`` afterwards.
        """
        if len(arg) < p.INIT_IN_COMPAT.size:
            return -errno.EINVAL
        major, minor, max_readahead, kflags = p.INIT_IN_COMPAT.unpack_from(arg)
        if major != p.KERNEL_VERSION or minor < 23:
            log.error("FUSE_INIT: kernel protocol %d.%d is not supported", major, minor)
            return -errno.EPROTO
        if kflags & p.INIT_EXT and len(arg) >= p.INIT_IN.size:
            kflags |= p.INIT_IN.unpack_from(arg)[4] << 32
        flags = kflags & (WANT_FLAGS | want)
        if flags & p.MAX_PAGES:
            pages = min(_max_pages_limit(), 0xFFFF)
        else:
            pages = KERNEL_DEFAULT_MAX_PAGES
        max_write = min(self.requested_max_write, pages * PAGE_SIZE)
        self.max_pages = max(1, min(pages, -(-max_write // PAGE_SIZE)))
        self.max_write = max_write
        self.flags = flags
        self.proto_minor = min(minor, p.KERNEL_MINOR_VERSION)
        p.INIT_OUT.pack_into(
            out,
            0,
            p.KERNEL_VERSION,
            p.KERNEL_MINOR_VERSION,
            max_readahead,
            flags & 0xFFFFFFFF,
            MAX_BACKGROUND,
            MAX_BACKGROUND * 3 // 4,
            max_write,
            1,  # time_gran (ns)
            self.max_pages,
            0,  # map_alignment
            flags >> 32,
            0,  # max_stack_depth
            0,  # request_timeout
        )
        return p.INIT_OUT.size

    # --- dispatch --------------------------------------------------------------------------
    async def quiesce(self) -> Callable[[], None]:
        """Let no request start and wait until none is being served (a drain: a pivot moves
        ``node`` meanwhile); returns what lets them go on. Requests of every loop count from
        before they read ``node``, so one that began on an iothread cannot reach the old
        node after the drain returned."""
        self.gate.close()
        await self.in_flight.wait_idle()
        return self.gate.open

    async def handle(
        self,
        hdr: memoryview,
        arg: memoryview,
        payload: memoryview | None,
        out: memoryview,
        stats: QueueStats,
    ) -> int | None:
        """Serve one request (see the module docstring for the convention). Never raises."""
        in_flight = self.in_flight
        while True:
            in_flight.enter()  # before looking at the gate: a drain either sees us or we it
            if not self.gate.closed:
                break
            in_flight.leave()
            await self.gate.wait_open()
        try:
            return await self._handle(hdr, arg, payload, out, stats)
        finally:
            in_flight.leave()

    async def _handle(
        self,
        hdr: memoryview,
        arg: memoryview,
        payload: memoryview | None,
        out: memoryview,
        stats: QueueStats,
    ) -> int | None:
        opcode = _OP_AT_4.unpack_from(hdr, 4)[0]
        try:
            if opcode == p.READ:
                return await self._read(arg, out, stats)
            if opcode == p.WRITE:
                return await self._write(arg, payload, out, stats)
            if opcode in p.NO_REPLY_OPS:
                if opcode == p.INTERRUPT:
                    stats.interrupts += 1
                return None
            op = self._ops.get(opcode)
            if op is None:
                return -errno.ENOSYS
            return await op(arg, payload, out)
        except OSError as err:
            stats.errors += 1
            return -(err.errno or errno.EIO)
        except (ValueError, IndexError, TypeError) as err:  # struct.error is a ValueError
            stats.errors += 1
            log.warning("FUSE opcode %d: cannot decode request: %s", opcode, err)
            return -errno.EINVAL
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a driver bug must not kill the daemon
            stats.errors += 1
            log.exception("FUSE opcode %d failed", opcode)
            return -errno.EIO

    # --- READ/WRITE rules, shared by the coroutine path and the transports' fast paths ----
    def read_extent(self, arg: memoryview, room: int) -> tuple[int, int]:
        """Decode a READ: ``(offset, size)`` with ``size`` clipped at EOF (0 past it), or
        ``(offset, -errno)``. ``room`` is what the reply buffer can hold. Plain function: the
        io_uring fast path calls it without a coroutine, so the rules live only here."""
        offset, size = _IO_EXTENT.unpack_from(arg)
        if size > room:
            return offset, -errno.EINVAL
        length = self.node.length()
        if offset >= length:
            return offset, 0
        if size > length - offset:  # short read at EOF
            size = length - offset
        return offset, size

    def write_extent(self, arg: memoryview, avail: int) -> tuple[int, int, bool]:
        """Decode a WRITE: ``(offset, size, grow)``; ``size`` is what to write after the EOF
        rules (0: the writer sees ENOSPC) or ``-errno``; ``grow`` says the node must first
        grow to ``offset + size`` (growable exports). ``avail``: bytes of data present."""
        offset, size = _IO_EXTENT.unpack_from(arg)
        if avail < size or size > self.max_write:
            return offset, -errno.EINVAL, False
        if not self.writable:
            return offset, -errno.EACCES, False
        length = self.node.length()
        if offset + size > length:
            if self.growable:
                return offset, size, True
            if offset >= length:
                return offset, 0, False
            return offset, length - offset, False
        return offset, size, False

    # --- the coroutine path ----------------------------------------------------------------
    async def _read(self, arg: memoryview, out: memoryview, stats: QueueStats) -> int:
        offset, size = self.read_extent(arg, len(out))
        if size > 0:
            await self.node.read(offset, out[:size])
            stats.bytes_read += size
        return size

    async def _write(
        self, arg: memoryview, payload: memoryview | None, out: memoryview, stats: QueueStats
    ) -> int:
        if payload is None:
            data = arg[p.WRITE_IN.size :]
        else:
            data = payload
        offset, size, grow = self.write_extent(arg, len(data))
        if size < 0:
            return size
        if grow:
            await self._grow_to(offset + size)
        if size:
            await self.node.write(offset, data[:size])
            if self.writethrough:
                await self.node.flush()
        stats.bytes_written += size
        p.WRITE_OUT.pack_into(out, 0, size, 0)
        return p.WRITE_OUT.size

    async def _grow_to(self, end: int, prealloc: str = "off") -> None:
        """Make the node at least ``end`` bytes long; never shrinks (concurrent growers)."""
        async with self.resize_lock:
            if self.node.length() < end:
                await self.node.truncate(end, prealloc)

    # --- metadata --------------------------------------------------------------------------
    async def _nothing(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        return 0

    async def _lookup(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        return -errno.ENOENT  # the export is a single file: there is nothing below it

    async def _getattr(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        return await self._attr_out(out)

    async def _attr_out(self, out: memoryview) -> int:
        length = self.node.length()
        allocated = await self.node.allocated_size()
        blocks = -(-(allocated if allocated > 0 else length) // 512)
        now = int(time.time())
        p.ATTR_OUT.pack_into(
            out,
            0,
            ATTR_VALID_S,
            0,
            0,
            p.ROOT_ID,  # ino
            length,
            blocks,
            now,
            now,
            now,
            0,
            0,
            0,
            self.mode,
            1,  # nlink
            self.uid,
            self.gid,
            0,  # rdev
            1,  # blksize: QEMU reports 1
            0,  # flags
        )
        return p.ATTR_OUT.size

    async def _setattr(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        fields = p.SETATTR_IN.unpack_from(arg)
        valid, size, mode, uid, gid = fields[0], fields[3], fields[11], fields[13], fields[14]
        if valid & ~SETATTR_SUPPORTED:
            return -errno.ENOTSUP  # times (utime/touch) and the rest
        if valid & (p.FATTR_UID | p.FATTR_GID) and not self.allow_other:
            return -errno.ENOTSUP  # QEMU 11.1: ownership changes need allow-other
        if valid & p.FATTR_MODE:
            if not self.allow_other and mode & (stat.S_IRWXG | stat.S_IRWXO):
                return -errno.EPERM  # nobody else can reach the file anyway
            if not self.writable and mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                return -errno.EROFS
        if valid & p.FATTR_SIZE:
            if not self.writable:
                return -errno.EACCES
            async with self.resize_lock:
                await self.node.truncate(size)
        if valid & p.FATTR_MODE:
            self.mode = stat.S_IFREG | (mode & 0o7777)
        if valid & p.FATTR_UID:
            self.uid = uid
        if valid & p.FATTR_GID:
            self.gid = gid
        return await self._attr_out(out)

    async def _open(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        flags = p.OPEN_IN.unpack_from(arg)[0]
        if not self.writable and flags & os.O_ACCMODE != os.O_RDONLY:
            return -errno.EROFS
        # FUSE_ATOMIC_O_TRUNC hands O_TRUNC to us: as in QEMU 11.1, a growable export is
        # truncated to 0, a non-growable one keeps its size (its image must not be wiped).
        if flags & os.O_TRUNC and self.growable and self.writable:
            async with self.resize_lock:
                await self.node.truncate(0)
        p.OPEN_OUT.pack_into(out, 0, 0, p.FOPEN_DIRECT_IO | p.FOPEN_PARALLEL_DIRECT_WRITES, 0)
        return p.OPEN_OUT.size

    async def _statfs(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        p.STATFS_OUT.pack_into(out, 0, 0, 0, 0, 0, 0, 512, 255, 512, 0)
        return p.STATFS_OUT.size

    async def _fsync(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        await self.node.flush()
        return 0

    # --- allocation ------------------------------------------------------------------------
    async def _fallocate(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        _fh, offset, length, mode, _pad = p.FALLOCATE_IN.unpack_from(arg)
        if not self.writable:
            return -errno.EACCES
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            return -errno.EOPNOTSUPP
        node_len = self.node.length()
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                return -errno.EINVAL
            end = min(offset + length, node_len)
            if end > offset:  # deallocates only where the node has discard=unmap
                # QEMU's export asks for no fallback: what could only be done by writing
                # zeroes as data (part of a qcow2 cluster holding data) is EOPNOTSUPP.
                await self.node.write_zeroes(offset, end - offset, unmap=True, no_fallback=True)
            return 0
        if mode & FALLOC_FL_ZERO_RANGE:
            end = offset + length
            if not mode & FALLOC_FL_KEEP_SIZE and end > node_len:
                await self._grow_to(end)
            # Zeroes written over the whole range, the grown part too, as QEMU does (a qcow2
            # node marks those clusters zero in its own layer).
            end = min(end, self.node.length())
            if end > offset:
                await self.node.write_zeroes(offset, end - offset)
            return 0
        if mode == 0:
            if offset < node_len:
                return -errno.EOPNOTSUPP  # no preallocation inside the image, as QEMU
            # Even when not growable, like QEMU: up to the offset plainly, then allocated.
            await self._grow_to(offset)
            await self._grow_to(offset + length, "falloc")
            return 0
        return -errno.EOPNOTSUPP  # KEEP_SIZE alone

    async def _lseek(self, arg: memoryview, payload: memoryview | None, out: memoryview) -> int:
        _fh, offset, whence, _pad = p.LSEEK_IN.unpack_from(arg)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            return -errno.EINVAL
        length = self.node.length()
        want_data = whence == SEEK_DATA
        while offset < length:
            st = await self.node.block_status_above(offset, length - offset)
            n = st.length
            if st.is_data == want_data:
                p.LSEEK_OUT.pack_into(out, 0, offset)
                return p.LSEEK_OUT.size
            if n <= 0:
                break
            offset += n
        if want_data or offset > length:
            return -errno.ENXIO
        p.LSEEK_OUT.pack_into(out, 0, length)  # the end of the file is a hole
        return p.LSEEK_OUT.size

    def describe(self) -> dict[str, Any]:
        """Negotiated parameters (for logs and tests)."""
        return {
            "proto-minor": self.proto_minor,
            "flags": self.flags,
            "max-write": self.max_write,
            "max-pages": self.max_pages,
        }
