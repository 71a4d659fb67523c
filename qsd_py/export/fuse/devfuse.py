"""The /dev/fuse transport: one queue = one /dev/fuse fd served on one asyncio loop.

The fd is non-blocking and watched with ``loop.add_reader``. Each readable event drains the
device: every request lands in a preallocated slot (request buffer + reply buffer) and becomes
a task that awaits the engine, so many requests are in flight at once and each reply is
written as soon as its backend I/O completes, in any order. READ and WRITE skip the task
when the export's node chain allows it (qsd_py/export/fuse/fastpath.py, decoded by the
engine's own plain helpers): the slot's reusable transfer moves the data between the fd and
the slot's page-aligned buffer, and its callback writes the reply. The kernel matches replies by
``unique`` on the fd the request was read from, which is why a queue never hands a request
to another queue.

Device errors: ``ENOENT`` on read or write means the kernel dropped an interrupted request
(nothing to do); ``ENODEV`` on read means the file system was unmounted (the queue stops).
FORGET/BATCH_FORGET and INTERRUPT are consumed without a reply: block I/O cannot be
cancelled half-way, so an interrupted request simply completes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

from qsd_py.block.fast_io import failed
from qsd_py.block.fast_settle import settle_on
from qsd_py.export.fuse import fastpath
from qsd_py.export.fuse import proto as p
from qsd_py.export.fuse.engine import FuseEngine, QueueStats

_IO_EXTENT = p.IO_EXTENT  # a READ/WRITE's offset and size

log = logging.getLogger("qsd_py.export.fuse")

_LEN_OP_UNIQUE = struct.Struct("<IIQ")  # the part of fuse_in_header dispatch needs
_HDR = p.IN_HEADER.size
_OUT = p.OUT_HEADER.size
_GONE = (errno.ENODEV, errno.ENOTCONN, errno.ECONNABORTED, errno.EBADF)
_WRITE_DATA_AT = _HDR + p.WRITE_IN.size
_PAGE = mmap.PAGESIZE
_READ = p.READ
_WRITE = p.WRITE
_WRITE_OUT = p.WRITE_OUT
_decide = fastpath.decide
_TRANSFER, _INLINE, _FILL = fastpath.TRANSFER, fastpath.INLINE, fastpath.FILL
_ACCEPT, _REPLY = fastpath.ACCEPT, fastpath.REPLY
_memset = ctypes.memset
DRAIN_BATCH = 64  # requests read per readable event before yielding to the loop
DEFAULT_MAX_SLOTS = 256


class _Slot:
    """Buffers for one request in flight. mmap: committed only when touched, so a 1 MiB slot
    used for 4 KiB requests costs 4 KiB of memory.

    The views start just before a page boundary so that the *data* is page aligned: WRITE
    data (after the 40-byte in-header and the 40-byte write_in) and READ data (after the
    16-byte out-header). An O_DIRECT node then reads and writes it in place instead of
    bouncing every request through an aligned copy."""

    __slots__ = (
        "req",
        "rep",
        "req_mv",
        "rep_mv",
        "iov",
        "hdr",
        "arg",
        "out",
        "data",
        "task",
        "queue",
        "out_addr",
        "data_addr",
        "xfer",
        "xfer_backend",
        "plan",
        "unique",
        "size",
        "writing",
    )

    def __init__(self, queue: DevFuseQueue, req_size: int, rep_size: int) -> None:
        self.req = mmap.mmap(-1, req_size + _PAGE)
        self.rep = mmap.mmap(-1, rep_size + _PAGE)
        self.req_mv = memoryview(self.req)[_PAGE - _WRITE_DATA_AT :]
        self.rep_mv = memoryview(self.rep)[_PAGE - _OUT :]
        self.iov = [self.req_mv]
        self.hdr = self.req_mv[:_HDR]
        self.arg = self.req_mv[_HDR:]
        self.out = self.rep_mv[_OUT:]
        self.data = self.req_mv[_WRITE_DATA_AT:]  # a WRITE's data, page aligned
        self.task: asyncio.Task[None] | None = None
        # fast path: page-aligned addresses of the READ reply data and of the WRITE data
        self.queue = queue
        self.out_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.rep)) + _PAGE
        self.data_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.req)) + _PAGE
        plan = queue.plan
        self.xfer: Any = (
            None if plan is None or plan.backend is None else (plan.backend.transfer(self._io_done))
        )
        self.xfer_backend = None if plan is None else plan.backend  # what xfer was made for
        self.plan = plan  # the plan that routed the slot's transfer
        self.unique = 0
        self.size = 0
        self.writing = False

    def _io_done(self, res: int) -> None:
        self.queue._fast_done(self, res)


class DevFuseQueue:
    """Serves one /dev/fuse fd (the session fd or a FUSE_DEV_IOC_CLONE of it) on ``loop``.

    :meth:`start` and :meth:`aclose` must run on ``loop``'s thread; :meth:`run_on_loop`
    helps callers living on another loop.
    """

    def __init__(
        self,
        fd: int,
        engine: FuseEngine,
        loop: asyncio.AbstractEventLoop,
        *,
        name: str = "q0",
        max_slots: int = DEFAULT_MAX_SLOTS,
        on_gone: Callable[[DevFuseQueue], None] | None = None,
    ) -> None:
        self.fd = fd
        self.engine = engine
        self.loop = loop
        self.name = name
        self.stats = QueueStats()
        self.max_slots = max_slots
        self.on_gone = on_gone
        self.gone = False
        self._req_size = engine.request_buffer_size
        self._rep_size = engine.reply_buffer_size
        self._free: list[_Slot] = []
        self._busy: set[_Slot] = set()
        self._nslots = 0
        self._reading = False
        self._closing = False
        self.plan: fastpath.FastPlan | None = None
        self.fast_busy = 0
        self._ring: Any = None  # the loop's AsyncRing, for a URING plan
        self._retired: list[fastpath.FastPlan] = []  # replaced by a pivot, transfers pending
        self.on_change: Callable[[], None] | None = None  # the plan's (FastPlan.on_change)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        os.set_blocking(self.fd, False)
        self._new_plan()
        for _ in range(4):
            self._free.append(self._new_slot())
        self._resume()

    def repoint(self) -> None:
        """The engine serves another node (a pivot): a fresh fast plan for it now; the old
        one is released once the transfers it routed are done."""
        self.drop_plan()
        if not self.fast_busy:
            self._release_retired()
        self._new_plan()

    def drop_plan(self) -> None:
        """Every request takes the engine until the next plan (on this queue's loop)."""
        if self.plan is not None:
            self.plan.on_change = None
            self._retired.append(self.plan)
            self.plan = None

    def _new_plan(self) -> None:
        self.plan = fastpath.plan_for(self.engine.node)
        if self.plan is not None:
            self.plan.on_change = self.on_change
            self.plan.settle = self._settle
            if self.plan.kind == fastpath.URING:
                self._ring = self.plan.backend.ring()  # type: ignore[union-attr]

    async def _settle(self) -> None:
        """The node closed its plans to writes: wait for this queue's fast transfers, on
        its loop (fast_settle.py)."""
        await settle_on(self.loop, lambda: self.fast_busy, self.name)

    def _release_retired(self) -> None:
        for plan in self._retired:
            plan.release()
        self._retired.clear()

    async def aclose(self, abort: bool) -> None:
        """Stop reading; then wait for the requests in flight or, with ``abort``, cancel them
        (their callers get ECONNABORTED once the fd is closed). The fd stays open: the owner
        closes it after every queue has stopped, so no reply can hit a reused fd number."""
        self._closing = True
        self._pause()
        tasks = [s.task for s in self._busy if s.task is not None]
        if abort:
            for task in tasks:
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        while self.fast_busy:
            await asyncio.sleep(0.001)  # fast-path transfers cannot be taken back
        if self.plan is not None:
            self.plan.release()
        self._release_retired()

    async def run_on_loop(self, coro_fn: Callable[[], Any]) -> Any:
        """Run ``coro_fn()`` on this queue's loop from whatever loop the caller is on."""
        if asyncio.get_running_loop() is self.loop:
            return await coro_fn()
        fut = asyncio.run_coroutine_threadsafe(coro_fn(), self.loop)
        return await asyncio.wrap_future(fut)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transport": "dev-fuse",
            **self.stats.as_dict(),
            **fastpath.describe(self.plan),
        }

    # --- reading ---------------------------------------------------------------------------
    def _new_slot(self) -> _Slot:
        self._nslots += 1
        return _Slot(self, self._req_size, self._rep_size)

    def _resume(self) -> None:
        if not self._reading and not self._closing and not self.gone:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _on_readable(self) -> None:
        for _ in range(DRAIN_BATCH):
            if self._free:
                slot = self._free.pop()
            elif self._nslots < self.max_slots:
                slot = self._new_slot()
            else:
                self._pause()  # back-pressure: resumed when a slot comes back
                return
            try:
                n = os.readv(self.fd, slot.iov)
            except BlockingIOError:
                self._free.append(slot)
                return
            except InterruptedError:
                self._free.append(slot)
                continue
            except OSError as err:
                self._free.append(slot)
                if err.errno == errno.ENOENT:
                    continue  # the request was interrupted before we got it
                self._lost(err)
                return
            self._dispatch(slot, n)

    def _dispatch(self, slot: _Slot, n: int) -> None:
        stats = self.stats
        stats.requests += 1
        if n < _HDR:
            self._free.append(slot)
            self._halt(f"short request of {n} bytes")
            return
        length, opcode, unique = _LEN_OP_UNIQUE.unpack_from(slot.req_mv)
        if opcode in p.NO_REPLY_OPS:
            if opcode == p.INTERRUPT:
                stats.interrupts += 1
            self._free.append(slot)
            return
        if length != n:
            log.warning("%s: request %d says %d bytes but has %d", self.name, unique, length, n)
            self._free.append(slot)
            self._reply(slot, unique, -errno.EINVAL)
            return
        plan = self.plan
        if plan is not None and (opcode == _READ or opcode == _WRITE):
            try:
                if self._fast(slot, n, opcode, unique, plan):
                    return
            except Exception:  # noqa: BLE001 - a bug answers EIO, the kernel never waits
                log.exception("%s: FUSE fast-path request %d failed", self.name, unique)
                self._reply(slot, unique, -errno.EIO)
                self._free.append(slot)
                return
        slot.task = self.loop.create_task(self._serve(slot, n, unique))
        self._busy.add(slot)

    # --- the READ/WRITE fast path (see qsd_py/export/fuse/fastpath.py) --------------------------
    def _fast(self, slot: _Slot, n: int, opcode: int, unique: int, plan: fastpath.FastPlan) -> bool:
        """Serve a READ or WRITE as :func:`fastpath.decide` says; False = take the engine."""
        writing = opcode == _WRITE
        avail = n - _WRITE_DATA_AT if writing else len(slot.out)
        action, a, b = _decide(self.engine, plan, slot.arg, avail, writing)
        if action == _TRANSFER:
            self._fast_transfer(slot, plan, unique, a, b, writing)
            return True
        if action == _INLINE:  # a file held in memory: copy now
            buf = slot.data if writing else slot.out
            res = fastpath.inline_io(plan.fd, self.stats, buf, slot.out, b, a, writing)
            plan.done()
            if res < 0:
                failed(plan, b, writing)
            if writing:  # the node's recording bitmaps (shared_bits.py), before the reply
                plan.mark(_IO_EXTENT.unpack_from(slot.arg)[0], b)
        elif action == _FILL:
            self.stats.bytes_read += a
            if b:
                _memset(slot.out_addr, 0, a)
            res = a
        elif action == _ACCEPT:
            self.stats.bytes_written += a
            if a:
                plan.mark(_IO_EXTENT.unpack_from(slot.arg)[0], a)
            _WRITE_OUT.pack_into(slot.out, 0, a, 0)
            res = _WRITE_OUT.size
        elif action == _REPLY:
            res = a
        else:
            return False
        self._reply(slot, unique, res)
        self._free.append(slot)
        return True

    def _fast_transfer(
        self,
        slot: _Slot,
        plan: fastpath.FastPlan,
        unique: int,
        pos: int,
        size: int,
        writing: bool,
    ) -> None:
        """Start the backend I/O of a fast-path request; :meth:`_fast_done` replies."""
        slot.unique = unique
        slot.size = size
        slot.writing = writing
        slot.plan = plan
        if slot.xfer_backend is not plan.backend:  # made before a pivot, for another backend
            slot.xfer = plan.backend.transfer(slot._io_done)  # type: ignore[union-attr]
            slot.xfer_backend = plan.backend
        self.stats.in_flight += 1
        self.fast_busy += 1
        self._busy.add(slot)
        try:
            if writing:
                slot.xfer.write(plan.fd, slot.data_addr, size, pos, self._ring)
            else:
                slot.xfer.read(plan.fd, slot.out_addr, size, pos, self._ring)
        except OSError as err:  # the loop's ring is closing
            self._fast_done(slot, -(err.errno or errno.EBADF))

    def _fast_done(self, slot: _Slot, res: int) -> None:
        """A fast-path transfer completed: reply and recycle the slot."""
        stats = self.stats
        stats.in_flight -= 1
        self.fast_busy -= 1
        self._busy.discard(slot)
        slot.plan.done()  # type: ignore[union-attr]
        if slot.writing:  # the node's recording bitmaps (shared_bits.py), before the reply
            slot.plan.mark(_IO_EXTENT.unpack_from(slot.arg)[0], slot.size)  # type: ignore[union-attr]
        if self._retired and not self.fast_busy:
            self._release_retired()
        if res < 0:
            failed(slot.plan, slot.size, slot.writing)  # type: ignore[arg-type]
        res = fastpath.finish(stats, res, slot.size, slot.writing, slot.out)
        self._reply(slot, slot.unique, res)
        self._free.append(slot)
        if not self._reading:
            self._resume()

    async def _serve(self, slot: _Slot, n: int, unique: int) -> None:
        stats = self.stats
        stats.in_flight += 1
        stats.engine_requests += 1
        res = None
        try:
            res = await self.engine.handle(slot.hdr, slot.req_mv[_HDR:n], None, slot.out, stats)
        except Exception:  # noqa: BLE001 - the engine answers its own; a bug answers EIO
            log.exception("%s: FUSE request %d failed", self.name, unique)
            res = -errno.EIO
        finally:
            # Count the request done before answering: a caller that has its reply must
            # find the export idle (a safe block-export-del right after it succeeds).
            stats.in_flight -= 1
            slot.task = None
            self._busy.discard(slot)
            if res is not None:
                self._reply(slot, unique, res)
            self._free.append(slot)
            if not self._reading:
                self._resume()

    # --- replying --------------------------------------------------------------------------
    def _reply(self, slot: _Slot, unique: int, res: int) -> None:
        if self.gone:
            return
        if res < 0:
            p.OUT_HEADER.pack_into(slot.rep_mv, 0, _OUT, res, unique)
            size = _OUT
        else:
            size = _OUT + res
            p.OUT_HEADER.pack_into(slot.rep_mv, 0, size, 0, unique)
        try:
            os.write(self.fd, slot.rep_mv[:size])
        except OSError as err:
            if err.errno == errno.ENOENT:
                return  # interrupted and already answered by the kernel
            if err.errno in _GONE:
                self._lost(err)
                return
            log.error("%s: reply to request %d failed: %s", self.name, unique, err)

    # --- the end of the connection ---------------------------------------------------------
    def _lost(self, err: OSError) -> None:
        if self.gone:
            return
        if err.errno not in _GONE:
            log.error("%s: /dev/fuse failed: %s", self.name, err)
        self.gone = True
        self._pause()
        if self.on_gone is not None:
            self.on_gone(self)

    def _halt(self, reason: str) -> None:
        """A request that cannot even be framed: stop serving this export, say why."""
        log.error("%s: halting the FUSE export: %s", self.name, reason)
        self._lost(OSError(errno.EPROTO, reason))
