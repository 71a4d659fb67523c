"""io_uring bound to an asyncio loop: batched submission, eventfd wake-ups, slot dispatch.

One :class:`AsyncRing` per asyncio loop (the main loop or an iothread's loop) carries every
io_uring request made on that loop: FUSE URING_CMDs and the ``file`` driver's reads and writes,
so a backend read and the COMMIT_AND_FETCH that follows it share one ``io_uring_enter``.

Why it is shaped this way (the hot path must stay cheap in Python):

* Requests are identified by a *slot* index used as ``user_data``; slots live in preallocated
  lists and are recycled through a free list, so completing a request allocates nothing.
* SQEs prepared during a loop turn are submitted by one ``io_uring_enter`` scheduled once per
  turn (``call_soon``), or earlier when the SQ fills.
* The ring signals an eventfd watched with ``loop.add_reader``. While we submit ourselves the
  eventfd is switched off (``IORING_CQ_EVENTFD_DISABLED``): completions that happen inline in
  the submission are reaped right after it without a wake-up.
* Default ring flags: SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG (completions are produced
  only when we enter with GETEVENTS, which we do once per wake-up anyway, and the kernel never
  interrupts the loop thread to run io_uring work). Hence a ring must be created on its loop's
  thread (use :func:`ring_for_loop` from a coroutine running on that loop).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from qsd_py.uring import abi
from qsd_py.uring.ring import Ring, check_available

#: Flags of rings made by :class:`AsyncRing` (see the module docstring).
ASYNC_RING_FLAGS = (
    abi.SETUP_SQE128
    | abi.SETUP_SUBMIT_ALL
    | abi.SETUP_SINGLE_ISSUER
    | abi.SETUP_DEFER_TASKRUN
    | abi.SETUP_TASKRUN_FLAG
)
#: user_data of internal requests whose completion nobody waits for (cancellations).
IGNORED_USER_DATA = (1 << 64) - 1
#: user_data of pinned requests (:meth:`AsyncRing.pin`) start here, far above any slot.
PINNED_BASE = 1 << 56
#: Largest transfer one SQE asks for (``len`` is 32-bit; stay well clear of it).
MAX_RW_CHUNK = 1 << 30

#: Submit-and-reap rounds one :meth:`AsyncRing._flush` may run before yielding to the loop.
FLUSH_ROUNDS = 8

#: Default busy-poll budget of :meth:`AsyncRing.enable_polling` (0 turns polling off).
POLL_NS = int(os.environ.get("QSD_URING_POLL_NS", 50_000))

_CQE_F_MORE = abi.CQE_F_MORE
_PINNED_BASE, _IGNORED = PINNED_BASE, IGNORED_USER_DATA
_monotonic_ns = time.monotonic_ns
_OP_READ = abi.OP_READ
_OP_WRITE = abi.OP_WRITE
_SQE_LINK = abi.SQE_IO_LINK

Buffer = memoryview | bytearray | bytes
Callback = Callable[[int], object]


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_ReleaseBuffer = ctypes.pythonapi.PyBuffer_Release
_ReleaseBuffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_c_char_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def buffer_address(buf: Buffer, writable: bool = False) -> int:
    """Address of a C-contiguous buffer's first byte. The caller keeps ``buf`` alive (and
    unresized) for as long as the kernel may touch the memory."""
    try:
        return _addressof(_c_char_from_buffer(buf))
    except TypeError:
        if writable:
            raise
    pb = _PyBuffer()
    _GetBuffer(buf, ctypes.byref(pb), 0)  # PyBUF_SIMPLE: contiguous, read-only allowed
    try:
        return pb.buf or 0
    finally:
        _ReleaseBuffer(ctypes.byref(pb))


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if type(buf) is memoryview else len(buf)


def _error(res: int) -> OSError:
    return OSError(-res, os.strerror(-res))


class AsyncRing:
    """An io_uring serving the running asyncio loop. Create it on that loop's thread.

    Low-level API (callbacks, for the FUSE transport): :meth:`submit_uring_cmd`,
    :meth:`submit_rw`; each takes ``callback(res)`` that runs on the loop once the CQE arrives.
    Awaitable API (for block drivers): :meth:`read`, :meth:`write`, :meth:`readv`,
    :meth:`writev`, :meth:`fsync`, :meth:`fallocate`, :meth:`nop`; they raise ``OSError``.
    """

    def __init__(self, entries: int = 256, flags: int = ASYNC_RING_FLAGS, cq_entries: int = 0):
        self.loop = asyncio.get_running_loop()
        self.ring = Ring(entries, flags, cq_entries or 4 * entries)
        self._defer = bool(self.ring.flags & abi.SETUP_DEFER_TASKRUN)
        self._efd = -1
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.ring.register_eventfd(self._efd)
            self.loop.add_reader(self._efd, self._on_eventfd)
        except BaseException:
            self._release()
            raise
        n = self.ring.cq_entries
        self._cbs: list[Callback | None] = [None] * n
        self._futs: list[asyncio.Future[int] | None] = [None] * n
        self._keep: list[object] = [None] * n
        self._free: list[int] = list(range(n - 1, -1, -1))
        self._pinned: list[Callback | None] = []  # callbacks of pinned user_data
        self._pinned_busy = bytearray()  # 1 while a pinned request is in the kernel
        self._pinned_free: list[int] = []
        self._inflight = 0
        self._scheduled = False
        self._dispatching = False  # completions are being dispatched by _flush
        self._after: list[Callable[[], object]] = []  # see after_dispatch
        self.closed = False
        #: Counters for tests and ``query-*`` introspection.
        self.stats = {"submit_calls": 0, "wakeups": 0, "completions": 0, "polled": 0}
        #: Busy-poll budget after a flush that left requests in flight (0: never poll);
        #: users raise it with :meth:`enable_polling`.
        self.poll_ns = 0
        # The loop's queue of due callbacks (asyncio's BaseEventLoop); without it, no polling.
        self._loop_ready = getattr(self.loop, "_ready", None)

    # --- slots -----------------------------------------------------------------------------
    def _grow(self) -> None:
        """More requests in flight than slots: double the tables (rare, allocation is fine)."""
        n = len(self._cbs)
        self._cbs.extend([None] * n)
        self._futs.extend([None] * n)
        self._keep.extend([None] * n)
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def _slot(self) -> int:
        if self.closed:
            raise OSError(errno.EBADF, "io_uring ring is closed")
        if not self._free:
            self._grow()
        self._inflight += 1
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)
        return self._free.pop()

    def _future(self, keep: object) -> tuple[int, asyncio.Future[int]]:
        slot = self._slot()
        fut = self.loop.create_future()
        self._futs[slot] = fut
        self._keep[slot] = keep
        return slot, fut

    # --- low-level callback API -------------------------------------------------------------
    def submit_rw(
        self,
        op: int,
        fd: int,
        addr: int,
        length: int,
        off: int,
        callback: Callback,
        op_flags: int = 0,
        sqe_flags: int = 0,
        buf_index: int = 0,
    ) -> None:
        """Queue a read/write-shaped SQE (see :meth:`Ring.prep_rw`); ``callback(res)`` later.
        The memory at ``addr`` must stay valid until the callback ran. (:meth:`_slot`'s
        work inline: every file read and write of the fast paths comes here.)"""
        if self.closed:
            raise OSError(errno.EBADF, "io_uring ring is closed")
        free = self._free
        if not free:
            self._grow()
        self._inflight += 1
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)
        slot = free.pop()
        self._cbs[slot] = callback
        self.ring.prep_rw(op, fd, addr, length, off, slot, op_flags, sqe_flags, buf_index)

    def submit_uring_cmd(
        self,
        fd: int,
        cmd_op: int,
        cmd: bytes | bytearray | memoryview | None,
        addr: int,
        length: int,
        callback: Callback,
        sqe_flags: int = 0,
    ) -> int:
        """Queue an IORING_OP_URING_CMD; ``callback(res)`` runs on the loop at completion.

        Returns the byte offset of the SQE's command area in ``self.ring.sqes``: pass
        ``cmd=None`` and pack the command there (before control returns to the loop) to avoid
        building a bytes object per request.
        """
        slot = self._slot()
        self._cbs[slot] = callback
        return self.ring.prep_uring_cmd(fd, cmd_op, cmd, addr, length, slot, sqe_flags)

    # --- pinned requests: one user_data for life, SQE built once --------------------------------
    def pin(self, callback: Callback) -> int:
        """A user_data of its own for a request that is submitted again and again (a FUSE ring
        entry's REGISTER/COMMIT_AND_FETCH), so its whole SQE can be built once and copied
        (:meth:`submit_prebuilt`); ``callback(res)`` runs at each completion. Slot tables,
        free list and argument packing are skipped on every trip. :meth:`unpin` it when
        done."""
        if self._pinned_free:
            idx = self._pinned_free.pop()
            self._pinned[idx] = callback
        else:
            idx = len(self._pinned)
            self._pinned.append(callback)
            self._pinned_busy.append(0)
        return PINNED_BASE + idx

    def unpin(self, user_data: int) -> None:
        """Give back a pinned user_data (its request must not be in the kernel)."""
        idx = user_data - PINNED_BASE
        self._pinned[idx] = None
        self._pinned_free.append(idx)

    def submit_prebuilt(self, sqe: bytes, user_data: int, patch_at: int = 0, patch: int = 0) -> int:
        """Queue a copy of ``sqe``, a complete SQE carrying the pinned ``user_data``, with the
        64-bit field at byte ``patch_at`` (if given) set to ``patch`` (a FUSE commit's
        ``commit_id``); returns its byte offset in ``self.ring.sqes`` for any other patch
        (before control returns to the loop)."""
        if self.closed:
            raise OSError(errno.EBADF, "io_uring ring is closed")
        self._inflight += 1
        self._pinned_busy[user_data - PINNED_BASE] = 1
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)
        return self.ring.prep_copy(sqe, patch_at, patch)

    def link_rw(self, op: int, fd: int, addr: int, length: int, off: int, user_data: int) -> None:
        """Queue a read/write that the *next* SQE queued on this ring waits for (IO_LINK).

        ``user_data`` is pinned (:meth:`pin`); its callback gets this request's result. If
        it fails or moves fewer than ``length`` bytes, the next request is not started and
        completes with ``-ECANCELED`` instead, and the caller redoes the transfer.
        (CQE_SKIP_SUCCESS would save this completion, but the kernel then also swallows
        the ``-ECANCELED`` of the request linked to a failed one.) Queue the next SQE before
        control returns to the loop; the memory at ``addr`` must stay valid until both
        completed."""
        if self.closed:
            raise OSError(errno.EBADF, "io_uring ring is closed")
        ring = self.ring
        ring.reserve(2)  # both in one submission, or the second would not wait
        self._inflight += 1
        self._pinned_busy[user_data - PINNED_BASE] = 1
        ring.prep_rw(op, fd, addr, length, off, user_data, 0, _SQE_LINK)

    def enable_polling(self, poll_ns: int = -1) -> None:
        """Poll up to ``poll_ns`` (default :data:`POLL_NS`) after each flush; see :meth:`_poll`."""
        if self._loop_ready is not None:
            self.poll_ns = max(self.poll_ns, POLL_NS if poll_ns < 0 else poll_ns)
            if self.poll_ns and self not in _POLLERS:
                _POLLERS.append(self)

    def flush(self) -> None:
        """Submit now instead of at the end of this loop turn."""
        self._flush()

    def claim_flush(self) -> bool:
        """Promise to call :meth:`release_flush` before control returns to the loop: SQEs
        queued meanwhile schedule no flush of their own (a loop turn, an ``epoll_wait``,
        for a caller that can submit them itself, e.g. after reading a batch of requests).
        False when a flush is scheduled already: it will submit them."""
        if self._scheduled or self.closed:
            return False
        self._scheduled = True
        return True

    def release_flush(self) -> None:
        """End a :meth:`claim_flush`: submit and reap now what was queued meanwhile (and
        what completed), or nothing when there is nothing to do (no system call)."""
        ring = self.ring
        if not self.closed and (ring.unpublished() or ring.needs_enter()):
            self._flush()
        else:
            self._scheduled = False

    def after_dispatch(self, callback: Callable[[], object]) -> bool:
        """From a completion callback: run ``callback()`` once this flush dispatched every
        completion it reaped (e.g. send the replies they made, together, in this loop turn
        rather than the next) and return True; False outside a dispatch (then it is not
        called)."""
        if not self._dispatching:
            return False
        self._after.append(callback)
        return True

    # --- submission and completion ------------------------------------------------------------
    def _flush(self) -> None:
        """Submit everything queued (one io_uring_enter), then reap and dispatch; when that
        left nothing to do but requests are in flight, poll briefly (see :attr:`poll_ns`).

        SQEs that the dispatched callbacks queue (a backend read for a FUSE request, the
        COMMIT_AND_FETCH after it) go out from here in the next round, up to
        :data:`FLUSH_ROUNDS` rounds, instead of waiting for another loop turn: at QD1 a
        request's whole chain then costs no epoll_wait and no trip through the loop."""
        if self.closed:
            self._scheduled = False
            return
        ring = self.ring
        stats = self.stats
        self._scheduled = True  # what callbacks queue meanwhile is ours to submit
        rounds = 0
        # No eventfd signal for what our own submissions complete, nor while we poll (the
        # spin reads the CQ); switched back on once, after the last round.
        ring.set_eventfd_enabled(False)
        try:
            while True:
                ring.submit(getevents=self._defer)
                stats["submit_calls"] += 1
                self._dispatching = True
                try:
                    stats["completions"] += ring.reap(self._dispatch)
                finally:
                    self._dispatching = False
                if ring.unpublished():
                    if rounds < FLUSH_ROUNDS and not self.closed:
                        rounds += 1
                        continue
                    break
                if not (
                    self.poll_ns > 0
                    and self._defer
                    and self._inflight > 0
                    and not self.closed
                    and self._poll()
                ):
                    break
        finally:
            self._scheduled = False
            if not self.closed:
                ring.set_eventfd_enabled(True)
            if self._after:
                self._run_after()
        if self.closed:
            return
        if (ring.needs_enter() or ring.pending()) and not self._scheduled:
            # Work arrived after the last submit (or the kernel pushed back with EAGAIN/EBUSY,
            # or the rounds ran out): go again next turn, after the other callbacks (unless
            # an after_dispatch callback queued SQEs, which scheduled that already).
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _run_after(self) -> None:
        after, self._after = self._after, []
        for callback in after:
            callback()

    def _poll(self) -> bool:
        """Spin up to ``poll_ns`` for the kernel to flag new completions (deferred task work)
        instead of going back to epoll: waking an idle loop costs far more than a short spin
        when requests come one at a time (QEMU's iothreads poll for the same reason; measured
        here, FUSE-over-io_uring on null-co at QD1: 14.6k IOPS without, 29.3k with 50 us).
        The spin holds the GIL: a thread pool's completions wait for its end, which is why
        only users without one (the FUSE fast path on null-co or aio=io_uring) turn it on,
        and why a ring stops polling as soon as another polling ring (another thread's) has
        completions waiting: that thread needs the GIL to take them (two FUSE queue threads
        busy at depth, null-co 4 KiB reads, QD16 x 2: 208k IOPS spinning regardless, 229k
        not polling at all)."""
        ring = self.ring
        loop_ready = self._loop_ready
        needs, ready, now = ring.needs_enter, ring.cq_ready, _monotonic_ns
        others = [(r.ring.needs_enter, r.ring.cq_ready) for r in _POLLERS if r is not self]
        end = now() + self.poll_ns
        while now() < end:
            if needs() or ready():
                self.stats["polled"] += 1
                return True
            if loop_ready:  # other callbacks are due: go run them
                return False
            for other_needs, other_ready in others:
                if other_needs() or other_ready():
                    return False
        return False

    def _on_eventfd(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self.stats["wakeups"] += 1
        if self._defer or self.ring.needs_enter():
            self._flush()
        else:
            self.stats["completions"] += self.ring.reap(self._dispatch)

    def _dispatch(self, slot: int, res: int, flags: int) -> None:
        if slot >= _PINNED_BASE:  # a pinned request first: every FUSE request is one
            if slot != _IGNORED:
                idx = slot - _PINNED_BASE
                if not flags & _CQE_F_MORE:
                    self._inflight -= 1
                    self._pinned_busy[idx] = 0
                cb = self._pinned[idx]
                if cb is not None:
                    cb(res)
            return
        cbs = self._cbs
        if slot >= len(cbs):
            return
        cb = cbs[slot]
        if flags & _CQE_F_MORE:  # multishot: the slot stays busy
            if cb is not None:
                cb(res)
            return
        self._inflight -= 1
        if cb is not None:
            cbs[slot] = None
            self._free.append(slot)
            cb(res)
            return
        fut = self._futs[slot]
        self._futs[slot] = None
        self._keep[slot] = None
        self._free.append(slot)
        if fut is not None and not fut.done():
            fut.set_result(res)

    # --- awaitable API ---------------------------------------------------------------------------
    def _rw_once(
        self, op: int, fd: int, addr: int, length: int, off: int, keep: object
    ) -> asyncio.Future[int]:
        slot, fut = self._future(keep)
        self.ring.prep_rw(op, fd, addr, length, off, slot)
        return fut

    async def _rw(self, op: int, fd: int, buf: Buffer, offset: int, writable: bool) -> int:
        n = _nbytes(buf)
        if n == 0:
            return 0
        addr = buffer_address(buf, writable)
        done = 0
        while done < n:
            res = await self._rw_once(
                op, fd, addr + done, min(n - done, MAX_RW_CHUNK), offset + done, buf
            )
            if res <= 0:
                if res == 0:
                    break
                if res == -errno.EINTR or res == -errno.EAGAIN:
                    continue
                raise _error(res)
            done += res
        return done

    async def read(self, fd: int, buf: Buffer, offset: int) -> int:
        """pread into ``buf`` (writable, C-contiguous); short reads are continued, so a result
        below ``len(buf)`` means end of file. Returns the byte count."""
        return await self._rw(_OP_READ, fd, buf, offset, True)

    async def write(self, fd: int, buf: Buffer, offset: int) -> int:
        """pwrite all of ``buf``; a write that makes no progress raises OSError(EIO)."""
        n = await self._rw(_OP_WRITE, fd, buf, offset, False)
        if n < _nbytes(buf):
            raise OSError(errno.EIO, "short write")
        return n

    async def _rwv(self, op: int, fd: int, bufs: Sequence[Buffer], offset: int, wr: bool) -> int:
        sizes = [_nbytes(b) for b in bufs]
        total = sum(sizes)
        if total == 0:
            return 0
        iov = (abi.IoVec * len(bufs))(
            *[abi.IoVec(buffer_address(b, wr), s) for b, s in zip(bufs, sizes, strict=True)]
        )
        res = await self._rw_once(op, fd, ctypes.addressof(iov), len(bufs), offset, (iov, bufs))
        if res < 0:
            raise _error(res)
        if res == total or res == 0:
            return res
        # Short transfer: finish segment by segment with plain reads/writes.
        single = _OP_READ if op == abi.OP_READV else _OP_WRITE
        done, pos = res, 0
        for b, s in zip(bufs, sizes, strict=True):
            if pos + s <= done:
                pos += s
                continue
            skip = max(0, done - pos)
            part = memoryview(b).cast("B")[skip:]
            n = await self._rw(single, fd, part, offset + pos + skip, wr)
            done += n
            pos += s
            if n < s - skip:
                break
        return done

    async def readv(self, fd: int, bufs: Sequence[Buffer], offset: int) -> int:
        """preadv into several buffers; short reads continued. Returns the byte count."""
        return await self._rwv(abi.OP_READV, fd, bufs, offset, True)

    async def writev(self, fd: int, bufs: Sequence[Buffer], offset: int) -> int:
        """pwritev all of ``bufs``; a write that makes no progress raises OSError(EIO)."""
        n = await self._rwv(abi.OP_WRITEV, fd, bufs, offset, False)
        if n < sum(_nbytes(b) for b in bufs):
            raise OSError(errno.EIO, "short write")
        return n

    async def _simple(self, op: int, fd: int, addr: int, length: int, off: int, fl: int) -> int:
        slot, fut = self._future(None)
        self.ring.prep_rw(op, fd, addr, length, off, slot, fl)
        res = await fut
        if res < 0:
            raise _error(res)
        return res

    async def fsync(self, fd: int, datasync: bool = False) -> None:
        """fsync (or fdatasync with ``datasync``)."""
        await self._simple(abi.OP_FSYNC, fd, 0, 0, 0, abi.FSYNC_DATASYNC if datasync else 0)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with ``mode`` (FALLOC_FL_* bits)."""
        await self._simple(abi.OP_FALLOCATE, fd, length, mode, offset, 0)

    async def nop(self) -> int:
        """A no-op round trip (tests, benchmarks)."""
        return await self._simple(abi.OP_NOP, -1, 0, 0, 0, 0)

    # --- teardown --------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self, timeout: float = 1.0) -> None:
        """Cancel what is in flight, wait (bounded) for it, fail leftovers with ECANCELED, and
        release the ring and the eventfd. Call on the loop's thread."""
        if self.closed:
            return
        ring = self.ring
        if self._inflight:
            ring.prep_cancel(0, IGNORED_USER_DATA, abi.ASYNC_CANCEL_ANY)
            ring.set_eventfd_enabled(False)
            try:
                while self._inflight and ring.wait(1, timeout):
                    ring.reap(self._dispatch)
            except OSError:
                pass
        self.closed = True
        for slot, cb in enumerate(self._cbs):
            if cb is not None:
                self._cbs[slot] = None
                cb(-errno.ECANCELED)
        for idx, busy in enumerate(self._pinned_busy):
            cb = self._pinned[idx]
            if busy and cb is not None:
                self._pinned_busy[idx] = 0
                cb(-errno.ECANCELED)
        for slot, fut in enumerate(self._futs):
            if fut is not None and not fut.done():
                fut.set_exception(OSError(errno.ECANCELED, "io_uring ring closed"))
            self._futs[slot] = None
        if self._inflight:
            # The kernel may still own these buffers: never let them be freed and reused.
            _LEAKED_AT_CLOSE.extend(k for k in self._keep if k is not None)
        self._inflight = 0
        self._release()

    def _release(self) -> None:
        if self in _POLLERS:
            _POLLERS.remove(self)
        if self._efd >= 0:
            try:
                self.loop.remove_reader(self._efd)
            except (RuntimeError, ValueError):
                pass
            os.close(self._efd)
            self._efd = -1
        self.ring.close()
        if _RINGS.get(self.loop) is self:
            del _RINGS[self.loop]


_LEAKED_AT_CLOSE: list[object] = []
#: Rings that poll (:meth:`AsyncRing.enable_polling`), each on its own loop's thread.
_POLLERS: list[AsyncRing] = []
_RINGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRing] = (
    weakref.WeakKeyDictionary()
)


def ring_for_loop(**kwargs: Any) -> AsyncRing:
    """The :class:`AsyncRing` of the running loop, created on first use (call from a coroutine
    or callback running on that loop). ``close_loop_ring`` releases it."""
    loop = asyncio.get_running_loop()
    ring = _RINGS.get(loop)
    if ring is None or ring.closed:
        ring = _RINGS[loop] = AsyncRing(**kwargs)
    return ring


def close_loop_ring(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Close the running (or given) loop's ring if it has one (on that loop's thread)."""
    ring = _RINGS.pop(loop or asyncio.get_running_loop(), None)
    if ring is not None:
        ring.close()


def uring_unavailable_reason() -> str | None:
    """None if io_uring (SQE128 rings) works for this process, else why not and how to fix it."""
    return check_available()
