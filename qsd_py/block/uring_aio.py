"""``aio=io_uring``: the file driver's reads, writes, flushes and fallocates as io_uring SQEs.

Every request goes into the ring of the loop that awaits it (``ring_for_loop()``: the main
loop's or an iothread's, created lazily on that loop's thread, never another thread's ring).
So a backend read made while serving a FUSE-over-io_uring entry shares the ring, and the
``io_uring_enter``, of the COMMIT_AND_FETCH that answers it. Data moves straight between the
fd and the caller's buffer; short transfers are continued, bytes past EOF read as zeroes (the
same contract as ``aio=threads``). Anything else blocking (ftruncate, lseek, fstat, the
O_DIRECT bounce paths of qsd_py/block/drivers/file.py) goes to the shared ``aio=threads`` pool.

Two APIs over one state machine (:class:`UringTransfer`):

* the :class:`~qsd_py.block.aio.IOBackend` coroutines (``read``, ``write``, ``fdatasync``,
  ``fallocate``, ``run``), used by :class:`~qsd_py.block.drivers.file.FileNode`;
* a callback fast path for the FUSE transport, with no Future, Task or coroutine per request:

  - ``backend.submit_read(fd, buf, off, callback)`` / ``submit_write(...)``: queue the SQE on
    the running loop's ring; ``callback(res)`` runs on that loop with the byte count (a read
    short only at EOF, the rest of ``buf`` zeroed) or ``-errno``. One small object per call.
  - ``t = backend.transfer(callback)`` once per in-flight slot (e.g. per FUSE ring entry),
    then ``t.read(fd, addr, length, off)`` / ``t.write(...)`` with a precomputed buffer
    address: nothing is allocated per request. A transfer runs one request at a time; the
    memory at ``addr`` must stay valid until ``callback`` ran.

  ``t.read``/``t.write`` take ``ring=`` (the loop's :class:`AsyncRing`, which the FUSE
  transport already holds) to skip the per-call ring lookup. The callback never runs
  synchronously inside ``submit_*``/``t.read``; it runs from the ring's completion dispatch
  (or, for an empty request, from ``loop.call_soon``). Starting a request on a closed ring
  raises ``OSError(EBADF)``. The fast path works at fd level: a caller serving a
  :class:`~qsd_py.block.drivers.file.FileNode` uses ``node.fd`` only where the node would not bounce
  (``not node.direct``, or offset/length/address aligned to ``node.align``/``node.mem_align``)
  and falls back to ``await node.read(...)`` otherwise.

When io_uring cannot be used, opening a node with ``aio=io_uring`` fails with QEMU 11.1's text
(:data:`UNAVAILABLE`), and the precise cause (sysctl, seccomp, missing kernel support) goes to
the log. If a later loop (an iothread) cannot get a ring, its requests fall back to the thread
pool with a warning, as QEMU does for an AioContext without io_uring.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from qsd_py.block import aio
from qsd_py.uring import abi
from qsd_py.uring.aio import MAX_RW_CHUNK, AsyncRing, Buffer, buffer_address, ring_for_loop

T = TypeVar("T")
log = logging.getLogger("qsd_py.block.uring_aio")

#: QEMU 11.1's error for ``aio=io_uring`` when the kernel refuses io_uring (any cause).
UNAVAILABLE = (
    "aio=io_uring was specified, but is not available (disabled via io_uring_disabled sysctl "
    "or blocked by container runtime seccomp policy?)"
)

Callback = Callable[[int], object]

_OP_READ = abi.OP_READ
_OP_WRITE = abi.OP_WRITE
_EINTR = -errno.EINTR
_EAGAIN = -errno.EAGAIN
_ENOSPC = -errno.ENOSPC
_memset = ctypes.memset
_get_running_loop = asyncio.get_running_loop


class UringTransfer:
    """One read or write at a time, continued until complete, then ``callback(res)``.

    Reusable: keep one per in-flight slot and nothing is allocated per request (the ring
    callback is a bound method made once here). ``res`` is the byte count (a read stops
    short only at EOF and zeroes the rest of the buffer; a write that makes no progress
    reports ``-ENOSPC``) or ``-errno``.
    """

    __slots__ = (
        "callback",
        "_on_cqe",
        "_ring",
        "_op",
        "_fd",
        "_addr",
        "_len",
        "_off",
        "_done",
        "_keep",
        "_fut",
    )

    def __init__(self, callback: Callback | None = None) -> None:
        self.callback = callback
        self._on_cqe = self._complete
        self._ring: AsyncRing | None = None
        self._op = self._fd = self._addr = self._len = self._off = self._done = 0
        self._keep: object = None
        self._fut: asyncio.Future[int] | None = None

    # --- starting ---------------------------------------------------------------------------
    def read(
        self,
        fd: int,
        addr: int,
        length: int,
        offset: int,
        ring: AsyncRing | None = None,
        keep: object = None,
    ) -> None:
        """Read ``length`` bytes at ``offset`` into the memory at ``addr``."""
        if ring is None or length <= 0 or length > MAX_RW_CHUNK:
            self._start(ring or ring_for_loop(), _OP_READ, fd, addr, length, offset, keep)
            return
        # _start's work inline (every fast read of a file on disk comes here)
        self._ring, self._op, self._fd, self._addr = ring, _OP_READ, fd, addr
        self._len, self._off, self._done, self._keep = length, offset, 0, keep
        ring.submit_rw(_OP_READ, fd, addr, length, offset, self._on_cqe)

    def write(
        self,
        fd: int,
        addr: int,
        length: int,
        offset: int,
        ring: AsyncRing | None = None,
        keep: object = None,
    ) -> None:
        """Write ``length`` bytes at ``offset`` from the memory at ``addr``."""
        if ring is None or length <= 0 or length > MAX_RW_CHUNK:
            self._start(ring or ring_for_loop(), _OP_WRITE, fd, addr, length, offset, keep)
            return
        self._ring, self._op, self._fd, self._addr = ring, _OP_WRITE, fd, addr
        self._len, self._off, self._done, self._keep = length, offset, 0, keep
        ring.submit_rw(_OP_WRITE, fd, addr, length, offset, self._on_cqe)

    def _start(
        self, ring: AsyncRing, op: int, fd: int, addr: int, length: int, offset: int, keep: object
    ) -> None:
        self._ring = ring
        self._op = op
        self._fd = fd
        self._addr = addr
        self._len = length
        self._off = offset
        self._done = 0
        self._keep = keep
        if length <= 0:
            ring.loop.call_soon(self._finish, 0)
            return
        ring.submit_rw(op, fd, addr, min(length, MAX_RW_CHUNK), offset, self._on_cqe)

    # --- completion -------------------------------------------------------------------------
    def _complete(self, res: int) -> None:
        if res == self._len and not self._done and self._fut is None:
            # All of it at once (nearly always): :meth:`_finish`'s work for a callback.
            self._keep = None
            self._ring = None
            cb = self.callback
            if cb is not None:
                cb(res)
            return
        if res > 0:
            done = self._done + res
            self._done = done
            if done >= self._len:
                self._finish(done)
                return
        elif res == 0:
            done = self._done
            if self._op == _OP_WRITE:
                self._finish(_ENOSPC)
            else:  # EOF: the rest reads as zeroes, as with aio=threads
                _memset(self._addr + done, 0, self._len - done)
                self._finish(done)
            return
        elif res != _EINTR and res != _EAGAIN:
            self._finish(res)
            return
        self._resubmit()

    def _resubmit(self) -> None:
        """Continue a short (or chunked) transfer, or retry an interrupted one."""
        done = self._done
        ring = self._ring
        assert ring is not None
        try:
            ring.submit_rw(
                self._op,
                self._fd,
                self._addr + done,
                min(self._len - done, MAX_RW_CHUNK),
                self._off + done,
                self._on_cqe,
            )
        except OSError as e:  # the ring was closed meanwhile
            self._finish(-(e.errno or errno.EBADF))

    def _finish(self, res: int) -> None:
        self._keep = None
        self._ring = None
        fut = self._fut
        if fut is not None:
            self._fut = None
            if not fut.done():
                fut.set_result(res)
            return
        cb = self.callback
        if cb is not None:
            cb(res)


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if type(buf) is memoryview else len(buf)


def _error(res: int) -> OSError:
    return OSError(-res, os.strerror(-res))


class IoUringBackend:
    """``aio=io_uring`` (see the module docstring). One instance serves every loop."""

    def __init__(self) -> None:
        self._tls = threading.local()
        self._threads: aio.IOBackend | None = None

    # --- which ring ---------------------------------------------------------------------------
    def ring(self) -> AsyncRing | None:
        """The running loop's ring (created on first use), or None if this loop cannot have
        one and falls back to the thread pool. Cached per thread: the hot path does no dict
        lookup and no weakref."""
        loop = _get_running_loop()
        tls = self._tls
        ring: AsyncRing | None = getattr(tls, "ring", None)
        if getattr(tls, "loop", None) is loop and (ring is None or not ring.closed):
            return ring
        try:
            ring = ring_for_loop()
        except OSError as e:
            log.warning("Unable to use linux io_uring, falling back to thread pool: %s", e)
            ring = None
        tls.loop = loop
        tls.ring = ring
        return ring

    def check_usable(self) -> str | None:
        """None if the running loop has (or can make) a ring, else QEMU's error text. The
        precise cause and its fix are logged."""
        try:
            ring = ring_for_loop()
        except OSError as e:
            log.warning("io_uring is unusable: %s", getattr(e, "strerror", None) or e)
            return UNAVAILABLE
        tls = self._tls
        tls.loop = ring.loop
        tls.ring = ring
        return None

    def _pool(self) -> aio.IOBackend:
        threads = self._threads
        if threads is None:
            threads = self._threads = aio.get_backend("threads")
            assert threads is not None
        return threads

    # --- IOBackend ----------------------------------------------------------------------------
    async def run(self, func: Callable[..., T], *args: Any) -> T:
        return await self._pool().run(func, *args)

    async def _transfer(self, op: int, fd: int, buf: Buffer, offset: int) -> int:
        ring = self.ring()
        if ring is None:
            fn = aio.pread_full if op == _OP_READ else aio.pwrite_full
            await self._pool().run(fn, fd, buf, offset)
            return len(buf)
        n = _nbytes(buf)
        if n == 0:
            return 0
        t = UringTransfer()
        fut = t._fut = ring.loop.create_future()
        t._start(ring, op, fd, buffer_address(buf, op == _OP_READ), n, offset, buf)
        res = await fut
        if res < 0:
            raise _error(res)
        return res

    async def read(self, fd: int, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; bytes past EOF read as zeroes."""
        await self._transfer(_OP_READ, fd, buf, offset)

    async def write(self, fd: int, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` at ``offset`` (ENOSPC if the file system takes nothing)."""
        await self._transfer(_OP_WRITE, fd, buf, offset)

    async def fdatasync(self, fd: int) -> None:
        """IORING_OP_FSYNC with IORING_FSYNC_DATASYNC."""
        ring = self.ring()
        if ring is None:
            await self._pool().run(os.fdatasync, fd)
        else:
            await ring.fsync(fd, datasync=True)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """IORING_OP_FALLOCATE with any FALLOC_FL_* ``mode``."""
        ring = self.ring()
        if ring is None:
            await self._pool().run(aio.fallocate, fd, mode, offset, length)
        else:
            await ring.fallocate(fd, mode, offset, length)

    # --- callback fast path ---------------------------------------------------------------------
    def transfer(self, callback: Callback) -> UringTransfer:
        """A reusable :class:`UringTransfer` reporting to ``callback`` (one per slot)."""
        return UringTransfer(callback)

    def submit_read(self, fd: int, buf: Buffer, offset: int, callback: Callback) -> None:
        """Read into ``buf`` through the running loop's ring; ``callback(res)`` later."""
        n = _nbytes(buf)
        addr = buffer_address(buf, True) if n else 0
        UringTransfer(callback)._start(self._ring_or_raise(), _OP_READ, fd, addr, n, offset, buf)

    def submit_write(self, fd: int, buf: Buffer, offset: int, callback: Callback) -> None:
        """Write ``buf`` through the running loop's ring; ``callback(res)`` later."""
        n = _nbytes(buf)
        addr = buffer_address(buf) if n else 0
        UringTransfer(callback)._start(self._ring_or_raise(), _OP_WRITE, fd, addr, n, offset, buf)

    def _ring_or_raise(self) -> AsyncRing:
        ring = self.ring()
        if ring is None:
            raise OSError(errno.ENOSYS, "io_uring is not usable on this loop")
        return ring
