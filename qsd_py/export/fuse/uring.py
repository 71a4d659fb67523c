"""The FUSE-over-io_uring transport: FUSE requests as io_uring completions, replies by
COMMIT_AND_FETCH.

How the kernel wants it (6.18, see ../shared/reference/fuse-over-io_uring.md):

* FUSE_INIT still arrives on /dev/fuse; the export answers it with ``FUSE_OVER_IO_URING``
  (:func:`~qsd_py.export.fuse.uring_checks.check_negotiated` refuses to go on when the
  kernel did not grant it).
* Only after that reply is written may entries be registered (earlier: ``-EAGAIN``), and the
  kernel uses the ring only once *every* possible CPU's queue has an entry: until then new
  requests wait in the kernel. A REGISTER that fails drops the connection back to /dev/fuse,
  which is why :class:`UringTransport` validates buffer sizes before sending any.
* A registered entry completes (CQE ``res == 0``) when the kernel put a request in it: the
  in-header at byte 0 of the entry's 288-byte header buffer, the first argument at 128,
  ``commit_id``/``payload_sz`` at 264/272, further arguments (write data) in the payload.
  The reply goes to the same places and one COMMIT_AND_FETCH both answers and re-arms.
* FORGET and INTERRUPT keep coming on /dev/fuse, so the export keeps one /dev/fuse reader.
* When the connection ends (unmount, abort) every parked entry completes with ``-ENOTCONN``.

Why it is shaped this way: each queue serves one kernel queue (one ``qid``) from the
:class:`~qsd_py.uring.aio.AsyncRing` of the loop it was placed on, shared with the ``file``
driver's ``aio=io_uring`` requests so a backend read and the COMMIT_AND_FETCH after it go out
in one ``io_uring_enter``. Every entry is built once: its slices of the queue's header and
payload mmaps, its ``iovec[2]``, the memoryviews the engine gets, and the bound callback the
ring calls. Replies are packed in place in the entry header and in the SQE's command area.

READ and WRITE take a fast path when the export's node chain allows it
(qsd_py/export/fuse/fastpath.py): the CQE callback decodes the request with the engine's own
plain helpers (:meth:`FuseEngine.read_extent`/:meth:`~FuseEngine.write_extent`), answers null-co
and small requests on a file held in memory (tmpfs) inline, or queues the backend I/O on the
same ring (for a ``file`` node whatever its ``aio`` mode: io-wq is the thread pool). A READ's
read SQE is linked to the COMMIT_AND_FETCH that answers it (:meth:`UringQueue._linked_read`); a
WRITE goes through the entry's reusable :class:`~qsd_py.block.uring_aio.UringTransfer`, whose
completion packs the reply and queues the COMMIT_AND_FETCH. Each entry's commit SQE is built
once under a pinned ``user_data`` (:meth:`AsyncRing.pin`). No Task, coroutine or Future per
request. Every other request (and a READ/WRITE the plan cannot take: growing, writethrough,
unaligned O_DIRECT) costs a Task running :meth:`FuseEngine.handle`.

Teardown cannot rely on closing /dev/fuse (parked commands hold a reference to it) nor on
closing the ring (it is shared): :func:`~qsd_py.export.fuse.mount.abort_connection` aborts the
FUSE connection, which completes every parked entry, and the transport waits for that before
releasing buffers.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
from array import array
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from qsd_py.block.fast_io import failed
from qsd_py.block.fast_settle import settle_on
from qsd_py.errors import QMPError
from qsd_py.export.fuse import fastpath
from qsd_py.export.fuse import proto as p
from qsd_py.export.fuse.engine import QueueStats
from qsd_py.export.fuse.uring_checks import possible_cpus, register_failure
from qsd_py.uring import abi
from qsd_py.uring.aio import AsyncRing, buffer_address, ring_for_loop

if TYPE_CHECKING:
    from qsd_py.export.fuse.engine import FuseEngine

log = logging.getLogger("qsd_py.export.fuse")

DRAIN_TIMEOUT_S = 5.0

HEADER_SIZE = p.URING_REQ_HEADER_SZ  # what the kernel requires of iov[0]
HEADER_STRIDE = 320  # 288 rounded up to whole cache lines: entries never share a line
_ARG = p.URING_ARG_OFFSET
_COMMIT_ID = struct.Struct("<Q")  # ent_in_out.commit_id at 264
# A reply's fuse_out_header: len and error; its unique (at 8) is the request's, still there.
_LEN_ERROR = struct.Struct("<Ii")
_OUT_HEADER_SIZE = p.OUT_HEADER.size
_PAYLOAD_SZ = struct.Struct("<I")  # ent_in_out.payload_sz at 272
_COMMIT_ID_AT = p.URING_ENT_OFFSET + 8
_PAYLOAD_SZ_AT = p.URING_ENT_OFFSET + 16
_CMD_REQ = p.URING_CMD_REQ
_REGISTER = p.URING_CMD_REGISTER
_COMMIT_AND_FETCH = p.URING_CMD_COMMIT_AND_FETCH
_OP = struct.Struct("<I")  # fuse_in_header.opcode at 4
_READ = p.READ
_WRITE = p.WRITE
_WRITE_OUT = p.WRITE_OUT
_IO_EXTENT = p.IO_EXTENT  # a READ/WRITE's offset and size
_decide = fastpath.decide
_copy_inline, _finish = fastpath.copy_inline, fastpath.finish
_TRANSFER, _INLINE, _FILL = fastpath.TRANSFER, fastpath.INLINE, fastpath.FILL
_ACCEPT, _REPLY = fastpath.ACCEPT, fastpath.REPLY
_OP_READ_SQE = abi.OP_READ
_SQE_COMMIT_ID_AT = abi.SQE_CMD_OFFSET + 8  # fuse_uring_cmd_req.commit_id, in the SQE
_ECANCELED = -errno.ECANCELED
_memset = ctypes.memset
_GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV, errno.EBADF)

#: What :meth:`UringQueue.handle` returns when it passed the request to the fast path after
#: all (a queue worker's fresh-cluster write), which then answers it itself.
HANDLED = object()

# The generation of queues nobody re-plans (plan.gen stays 0): a one-entry array.
_NO_GEN = memoryview(array("Q", [0]))

# Buffers of entries the kernel may still write to (a drain that timed out): never freed.
_KERNEL_OWNED: list[object] = []


def _cmd_sqe(fd: int, cmd_op: int, addr: int, length: int, user_data: int, qid: int) -> bytes:
    """A whole URING_CMD SQE for a FUSE ring entry, its fuse_uring_cmd_req with commit_id 0
    (a COMMIT_AND_FETCH patches it at :data:`_SQE_COMMIT_ID_AT`)."""
    head = abi.SQE_CMD_HEAD.pack(
        abi.OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr, length, 0, user_data, 0, 0, 0
    )
    return head + _CMD_REQ.pack(0, 0, qid)


# --- one entry ---------------------------------------------------------------------------------
class _Entry:
    """One ring entry: buffers, iovec and views built once, reused for every request."""

    __slots__ = (
        "queue",
        "hdr",
        "in_hdr",
        "arg",
        "payload",
        "iov",
        "iov_addr",
        "pay_addr",
        "live",
        "task",
        "on_cqe",
        "prefixes",
        "xfer",
        "xfer_backend",
        "size",
        "writing",
        "pos",
        "linked",
        "ud",
        "commit_sqe",
        "read_ud",
        "plan",
    )

    def __init__(self, queue: UringQueue, hdr: memoryview, payload: memoryview) -> None:
        self.queue = queue
        self.hdr = hdr
        self.in_hdr = hdr[: p.IN_HEADER.size]
        self.arg = hdr[_ARG : _ARG + p.URING_OP_IN_OUT_SZ]
        self.payload = payload
        self.iov = (abi.IoVec * 2)(
            abi.IoVec(buffer_address(hdr, True), HEADER_SIZE),
            abi.IoVec(buffer_address(payload, True), len(payload)),
        )
        self.iov_addr = ctypes.addressof(self.iov)
        self.pay_addr: int = self.iov[1].iov_base
        self.live = False  # the kernel holds this entry (registered or committed)
        self.task: asyncio.Task[None] | None = None
        # What the ring calls with each completion of the entry's command: the queue's
        # handler with the entry bound (one Python frame per request, not two).
        self.on_cqe: Callable[[int], None] = partial(queue._on_cqe, self)
        # ``(payload[:n],)`` per request size n, made once: the inline copy's iovec.
        self.prefixes = fastpath.Prefixes(payload)
        # fast path state: the request being served by a backend SQE
        self.xfer: Any = None  # UringTransfer reporting to _io_done, made once per entry
        self.xfer_backend: Any = None  # what xfer was made for (a pivot may change it)
        self.size = 0
        self.writing = False
        self.pos = 0  # file offset of a linked read (to redo it if the link breaks)
        self.linked = False  # the pending commit waits for a linked backend read
        self.ud = 0  # the entry's pinned user_data on its ring
        self.commit_sqe = b""  # its COMMIT_AND_FETCH, built once; commit_id patched per reply
        self.read_ud = 0  # pinned user_data of its linked backend reads
        self.plan: Any = None  # the plan that routed the fast-path request in flight

    def _linked_read_done(self, res: int) -> None:
        """The linked read finished; a full one already started the commit after it."""
        if res == self.size:
            queue = self.queue
            queue._fast_end()
            queue.stats.bytes_read += res
            plan = self.plan
            if plan.counts is not None:  # a cluster table's reader
                plan.done()
        # else the commit completes -ECANCELED next and _on_cqe has the read redone; the
        # request stays busy on its plan until then (a new plan must not wait for less)

    def _io_done(self, res: int) -> None:
        self.queue._fast_done(self, res)


# --- one kernel queue --------------------------------------------------------------------------
class UringQueue:
    """Kernel queue ``qid``: ``depth`` entries served on ``loop`` through its AsyncRing.

    :meth:`start`, :meth:`aclose` and :meth:`release` run on ``loop``'s thread.
    """

    def __init__(
        self,
        qid: int,
        fd: int,
        engine: FuseEngine,
        loop: asyncio.AbstractEventLoop,
        *,
        depth: int,
        payload_size: int,
        name: str,
    ) -> None:
        self.qid = qid
        self.fd = fd
        self.engine = engine
        self.loop = loop
        self.depth = depth
        self.payload_size = payload_size
        self.name = name
        self.stats = QueueStats()
        self.ring: AsyncRing | None = None
        self.entries: list[_Entry] = []
        self.live = 0
        self.failure: int = 0  # first error a REGISTER/COMMIT got while connected (-errno)
        self.closing = False
        self._drained = asyncio.Event()  # set when nothing is left in the kernel at close
        self._hdr_map: mmap.mmap | None = None
        self._pay_map: mmap.mmap | None = None
        self.plan: fastpath.FastPlan | None = None
        self.reader: int | None = None  # a cluster-table reader slot claimed by the daemon
        # The generation of the export's node (plan_wire.SharedGen): a plan whose ``gen``
        # differs is stale, and requests take the engine until the new one is installed.
        self.gen_view: memoryview = _NO_GEN
        self._retired: list[fastpath.FastPlan] = []  # replaced plans, released at the end
        self.fast_busy = 0  # fast-path requests waiting for their backend SQE
        self.link_reads = False  # READs go as a read SQE linked to their commit
        self.linked_reads = 0
        self.link_breaks = 0
        self.thread_id = 0  # the serving thread's, known once started

    # --- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the entries and queue one REGISTER each (submitted at the end of the turn)."""
        self.ring = ring = ring_for_loop()
        self.thread_id = threading.get_native_id()
        # One mapping per kind: page aligned, committed only where the kernel writes.
        self._hdr_map = mmap.mmap(-1, self.depth * HEADER_STRIDE)
        self._pay_map = mmap.mmap(-1, self.depth * self.payload_size)
        hdrs, pays = memoryview(self._hdr_map), memoryview(self._pay_map)
        for i in range(self.depth):
            h = i * HEADER_STRIDE
            pay = i * self.payload_size
            entry = _Entry(self, hdrs[h : h + HEADER_SIZE], pays[pay : pay + self.payload_size])
            self.entries.append(entry)
        self.install(fastpath.plan_for(self.engine.node, ring_io=True, reader=self.reader))
        for entry in self.entries:
            entry.ud = ud = ring.pin(entry.on_cqe)
            entry.read_ud = ring.pin(entry._linked_read_done)
            entry.commit_sqe = _cmd_sqe(self.fd, _COMMIT_AND_FETCH, 0, 0, ud, self.qid)
            ring.submit_prebuilt(_cmd_sqe(self.fd, _REGISTER, entry.iov_addr, 2, ud, self.qid), ud)
            entry.live = True
            self.live += 1

    def install(self, plan: fastpath.FastPlan | None) -> None:
        """Serve with ``plan`` from now on (None: every request takes the engine); the
        one it replaces is kept until :meth:`release` (requests it routed may be in
        flight: each entry holds its own)."""
        old = self.plan
        if old is not None and old is not plan:
            old.on_change = None
            self._retired.append(old)
        self.plan = plan
        if plan is not None:
            plan.settle = self._settle
        ring = self.ring
        if plan is not None and plan.backend is not None:
            for entry in self.entries:
                if entry.xfer is None:
                    entry.xfer = plan.backend.transfer(entry._io_done)
                    entry.xfer_backend = plan.backend
        if plan is not None and plan.kind not in fastpath.OFF_RING and ring is not None:
            ring.enable_polling()  # nothing on this path waits for a pool thread
        self.link_reads = plan is not None and plan.kind == fastpath.URING

    async def _settle(self) -> None:
        """The node closed its plans to writes: wait for this queue's fast transfers, on
        its loop (fast_settle.py)."""
        await settle_on(self.loop, lambda: self.fast_busy, f"queue {self.qid}")

    def drop_plan(self) -> None:
        """On the queue's loop: every request takes the engine until :meth:`install`."""
        if self.plan is not None:
            self.plan.on_change = None
            self._retired.append(self.plan)
            self.plan = None

    def repoint(self) -> None:
        """On the queue's loop: the engine serves another node (a pivot), a fresh plan.
        Plans dropped before are given back once nothing they routed is in flight (each
        holds a cluster-table reader slot)."""
        if self.reader is None and not self.fast_busy:
            for old in self._retired:
                old.release()
            self._retired.clear()
        gen = self.gen_view[0]
        plan = fastpath.plan_for(self.engine.node, ring_io=True, reader=self.reader)
        if plan is not None:
            plan.gen = gen
        self.install(plan)

    # --- serving -----------------------------------------------------------------------------
    def _on_cqe(self, entry: _Entry, res: int) -> None:
        """The entry's command completed: a request arrived (``res`` 0), a linked read's
        commit was cancelled, or the entry ended (``-errno``)."""
        entry.live = False  # the entry is ours until the next commit
        self.live -= 1
        if entry.linked:
            entry.linked = False
            if res == _ECANCELED:
                if not self.closing:
                    self._read_again(entry)  # the linked read came up short or failed
                    return
                self._fast_end()
        if res:
            self._ended(entry, res)
            if self.live == 0 and self.closing:
                self._drained.set()
            return
        self.stats.requests += 1
        if self.closing:
            if self.live == 0:
                self._drained.set()
            return  # hard teardown: the connection is being aborted, do not answer
        plan = self.plan
        if plan is not None and plan.gen != self.gen_view[0]:
            self._retired.append(plan)
            self.plan = plan = None  # stale: the new plan is on its way; the engine serves
        if plan is not None:
            op = _OP.unpack_from(entry.hdr, 4)[0]
            try:
                if (op == _READ or op == _WRITE) and self._fast(entry, plan, op == _WRITE):
                    return
            except Exception:  # noqa: BLE001 - a bug answers EIO, it does not hang the entry
                log.exception("%s: FUSE fast-path request failed", self.name)
                self._commit(entry, -errno.EIO)
                return
        entry.task = self.loop.create_task(self._serve(entry))

    # --- the READ/WRITE fast path (see the module docstring) ------------------------------------
    def _fast(self, entry: _Entry, plan: fastpath.FastPlan, writing: bool) -> bool:
        """Serve a READ or WRITE as :func:`fastpath.decide` says; False = take the engine."""
        action, a, b = _decide(self.engine, plan, entry.arg, self.payload_size, writing)
        if action == _INLINE:  # a file held in memory: copy now
            pay = entry.payload
            res = _copy_inline(plan.fd, pay, b, a, writing, entry.prefixes[b])
            res = _finish(self.stats, res, b, writing, pay)  # fastpath.inline_io, a call less
            if plan.counts is not None:  # a cluster table's reader (a call less without)
                plan.done()
            if res < 0:
                failed(plan, b, writing)
            if writing and plan.listed[0]:
                plan.mark(_IO_EXTENT.unpack_from(entry.arg)[0], b)
            self._commit(entry, res)
        elif action == _TRANSFER:
            if writing or not self.link_reads:
                self._fast_transfer(entry, plan, a, b, writing)
            else:
                self._linked_read(entry, plan, a, b)
        elif action == _FILL:
            self.stats.bytes_read += a
            if b:
                _memset(entry.pay_addr, 0, a)
            self._commit(entry, a)
        elif action == _ACCEPT:
            self.stats.bytes_written += a
            if a and plan.listed[0]:
                plan.mark(_IO_EXTENT.unpack_from(entry.arg)[0], a)
            _WRITE_OUT.pack_into(entry.payload, 0, a, 0)
            self._commit(entry, _WRITE_OUT.size)
        elif action == _REPLY:
            self._commit(entry, a)
        else:
            return False
        return True

    def _fast_transfer(
        self, entry: _Entry, plan: fastpath.FastPlan, pos: int, size: int, writing: bool
    ) -> None:
        """Start the backend read/write of a fast-path request through the entry's transfer;
        its completion (:meth:`_fast_done`) replies. An entry whose transfer was made for
        another backend (before a pivot; idle now) gets one for this plan's."""
        if entry.xfer_backend is not plan.backend:
            entry.xfer = plan.backend.transfer(entry._io_done)  # type: ignore[union-attr]
            entry.xfer_backend = plan.backend
        self._fast_start(entry, plan, size, writing)
        try:
            if writing:
                entry.xfer.write(plan.fd, entry.pay_addr, size, pos, self.ring)
            else:
                entry.xfer.read(plan.fd, entry.pay_addr, size, pos, self.ring)
        except OSError as err:  # the ring is closing
            self._fast_done(entry, -(err.errno or errno.EBADF))

    def _linked_read(self, entry: _Entry, plan: fastpath.FastPlan, pos: int, size: int) -> None:
        """Read and answer with one trip through the kernel: the read SQE is linked to the
        COMMIT_AND_FETCH, whose reply (header only: the data is the read's) is packed
        before the data exists. The kernel starts the commit once the read moved all
        ``size`` bytes; a short read (a file shorter than the node's sector-rounded length)
        or an error cancels the commit, and :meth:`_read_again` redoes the read the
        ordinary way. The read's own completion only ends its in-flight count, so a
        ``safe`` delete still sees it."""
        ring = self.ring
        assert ring is not None
        try:
            ring.link_rw(_OP_READ_SQE, plan.fd, entry.pay_addr, size, pos, entry.read_ud)
        except OSError:
            plan.done()
            return  # the ring is closing: the request is ended with the connection
        self._fast_start(entry, plan, size, False)  # in flight until the read's own completion
        entry.pos = pos
        entry.linked = True
        self.linked_reads += 1
        self._commit(entry, size)

    def _read_again(self, entry: _Entry) -> None:
        """A linked read's commit was cancelled: read through the transfer (with the plan
        that routed it, still busy until then), then commit."""
        self.link_breaks += 1
        self._fast_end()
        self._fast_transfer(entry, entry.plan, entry.pos, entry.size, False)

    def _fast_start(self, entry: _Entry, plan: fastpath.FastPlan, size: int, writing: bool) -> None:
        entry.plan = plan
        entry.size = size
        entry.writing = writing
        self.stats.in_flight += 1
        self.fast_busy += 1

    def _fast_end(self) -> None:
        self.stats.in_flight -= 1
        self.fast_busy -= 1

    def _fast_done(self, entry: _Entry, res: int) -> None:
        """The backend SQE of a fast-path request completed: reply and re-arm the entry."""
        stats = self.stats
        self._fast_end()
        plan = entry.plan
        if plan.counts is not None:
            plan.done()
        if entry.writing and plan.listed[0]:  # bitmaps this process marks (shared_bits.py)
            plan.mark(_IO_EXTENT.unpack_from(entry.arg)[0], entry.size)
        if res < 0:
            failed(plan, entry.size, entry.writing)
        res = _finish(stats, res, entry.size, entry.writing, entry.payload)
        self._commit(entry, res)

    async def _serve(self, entry: _Entry) -> None:
        stats = self.stats
        stats.in_flight += 1
        stats.engine_requests += 1
        try:
            res = await self.handle(entry)
        except Exception:  # noqa: BLE001 - the request is answered, the entry re-armed
            # The engine answers its own failures; this is a queue worker's forwarding
            # (the daemon gone) or a bug: EIO, never an entry the kernel waits on forever.
            log.exception("%s: FUSE request failed", self.name)
            res = -errno.EIO
        finally:
            stats.in_flight -= 1
            entry.task = None
        if res is HANDLED:
            return  # handed to the fast path, which answers it
        if res is None:
            res = 0  # no-reply opcodes never come through the ring; answer anyway to re-arm
        self._commit(entry, res)  # type: ignore[arg-type]

    def handle(self, entry: _Entry) -> Awaitable[int | object | None]:
        """The engine's answer to the entry's request, in its payload (a queue worker
        process sends the request to the daemon's engine instead: workers.py)."""
        return self.engine.handle(entry.in_hdr, entry.arg, entry.payload, entry.payload, self.stats)

    def _commit(self, entry: _Entry, res: int) -> None:
        """Answer the entry's request (``res``: reply length in the payload, or ``-errno``)
        and re-arm the entry, with its prebuilt COMMIT_AND_FETCH. The request's header is
        still in the entry (the kernel wrote it; nothing of ours overwrites it), so its
        ``unique`` is already where the reply's goes and its ``commit_id`` is read from it."""
        ring = self.ring
        if ring is None or ring.closed:
            return
        hdr = entry.hdr
        if res < 0:
            _LEN_ERROR.pack_into(hdr, 0, _OUT_HEADER_SIZE, res)
            _PAYLOAD_SZ.pack_into(hdr, _PAYLOAD_SZ_AT, 0)
        else:
            _LEN_ERROR.pack_into(hdr, 0, _OUT_HEADER_SIZE + res, 0)
            _PAYLOAD_SZ.pack_into(hdr, _PAYLOAD_SZ_AT, res)
        commit_id = _COMMIT_ID.unpack_from(hdr, _COMMIT_ID_AT)[0]
        ring.submit_prebuilt(entry.commit_sqe, entry.ud, _SQE_COMMIT_ID_AT, commit_id)
        entry.live = True
        self.live += 1

    def _ended(self, entry: _Entry, res: int) -> None:
        """An entry came back with an error: the connection is gone (expected at teardown) or
        the kernel refused a command (the entry is lost to the kernel queue)."""
        if -res not in _GONE or not self.closing:
            if not self.failure:
                self.failure = res
            if -res not in _GONE:
                self.stats.errors += 1
                log.error("%s: io_uring entry failed: %s", self.name, os.strerror(-res))

    # --- stop --------------------------------------------------------------------------------
    async def stop_serving(self, abort: bool) -> None:
        """Take no new request from now on; with ``abort`` cancel the requests in flight, else
        let them finish and reply (their commits re-arm entries that the abort then ends).
        A request that arrives now stays unanswered until the abort ends it (ECONNABORTED)."""
        self.closing = True
        tasks = [e.task for e in self.entries if e.task is not None]
        if abort:
            for task in tasks:
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        while self.fast_busy and self.ring is not None and not self.ring.closed:
            await asyncio.sleep(0.001)  # backend SQEs cannot be taken back: let them finish

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the kernel gave back every entry (after the connection was aborted)."""
        if self.live and self.ring is not None:
            self.ring.flush()  # commits queued this turn must reach the kernel first
        if self.live:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                pass
        return self.live == 0

    def release(self) -> None:
        """Drop buffers; if the kernel may still write into them, keep them alive forever."""
        if self.live:
            log.error("%s: %d io_uring entries never came back; leaking them", self.name, self.live)
            _KERNEL_OWNED.append((self._hdr_map, self._pay_map, self.entries))
        else:
            for entry in self.entries:
                if self.ring is not None and entry.ud:
                    self.ring.unpin(entry.ud)
                    self.ring.unpin(entry.read_ud)
                entry.prefixes.release()
                for view in (entry.in_hdr, entry.arg, entry.hdr, entry.payload):
                    view.release()
            for m in (self._hdr_map, self._pay_map):
                if m is not None:
                    try:
                        m.close()
                    except BufferError:  # a cancelled thread-pool read may still hold a view
                        pass
        self.entries = []
        self._hdr_map = self._pay_map = None
        self.ring = None
        if self.reader is None:
            for plan in (*self._retired, self.plan):
                if plan is not None:
                    plan.release()
        self._retired.clear()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transport": "io_uring",
            "qid": self.qid,
            "thread-id": self.thread_id,
            "depth": self.depth,
            "registered": self.live,
            **self.stats.as_dict(),
            "linked-reads": self.linked_reads,
            "link-breaks": self.link_breaks,
            **fastpath.describe(self.plan),
        }


# --- all queues of one export -------------------------------------------------------------------
class UringTransport:
    """Every kernel queue of one FUSE connection, placed round-robin over ``loops``."""

    def __init__(
        self,
        fd: int,
        engine: FuseEngine,
        loops: list[tuple[asyncio.AbstractEventLoop, str]],
        *,
        depth: int,
        name: str,
    ) -> None:
        self.fd = fd
        self.engine = engine
        self.depth = depth
        payload = engine.payload_size
        self.queues = [
            UringQueue(
                qid,
                fd,
                engine,
                loops[qid % len(loops)][0],
                depth=depth,
                payload_size=payload,
                name=f"{name}/uring-q{qid}@{loops[qid % len(loops)][1]}",
            )
            for qid in range(possible_cpus())
        ]
        self._gen = memoryview(array("Q", [0]))  # plan_wire.SharedGen's role, in-process
        for q in self.queues:
            q.gen_view = self._gen

    def _by_loop(self) -> dict[asyncio.AbstractEventLoop, list[UringQueue]]:
        groups: dict[asyncio.AbstractEventLoop, list[UringQueue]] = {}
        for q in self.queues:
            groups.setdefault(q.loop, []).append(q)
        return groups

    def validate(self) -> None:
        """What the kernel would refuse, refused before any REGISTER (a failed REGISTER
        silently turns the connection back to /dev/fuse)."""
        need = self.engine.payload_size
        for q in self.queues:
            if q.payload_size < need or HEADER_SIZE < p.URING_REQ_HEADER_SZ:
                raise QMPError(
                    f"FUSE-over-io_uring: payload buffer {q.payload_size} is smaller than "
                    f"the negotiated {need} bytes"
                )
            if not 0 <= q.qid < possible_cpus():
                raise QMPError(f"FUSE-over-io_uring: queue {q.qid} out of range")

    async def start(self) -> None:
        """Register every entry of every queue (call only after the INIT reply is written);
        raise QMPError naming the kernel's answer if any REGISTER fails."""
        self.validate()
        for loop, queues in self._by_loop().items():
            await _on_loop(loop, lambda qs=queues: start_queues(qs))
        failed = next((q for q in self.queues if q.failure), None)
        if failed is not None:
            raise QMPError(register_failure(failed.qid, -failed.failure))
        for q in self.queues:
            if q.plan is not None:
                q.plan.on_change = self.repoint

    def refresh_length(self) -> None:
        """Nothing to publish: queues in this process read the node itself."""

    def repoint(self) -> None:
        """The engine's node changed (a pivot, an overlay, a child replaced; also called
        when fast writes are closed or opened): every queue's plan is stale at once (the
        generation); each drops it on its loop, and once the transfers it routed are done
        (settle.py) makes a new one there."""
        from qsd_py.export.fuse.settle import drop_and_settle

        self._gen[0] += 1
        for loop, queues in self._by_loop().items():
            drop_and_settle(
                loop,
                lambda qs=queues: [q.drop_plan() for q in qs],  # type: ignore[misc]
                lambda qs=queues: sum(q.fast_busy for q in qs),  # type: ignore[misc]
                lambda qs=queues: [self._replan(q) for q in qs],  # type: ignore[misc]
                queues[0].name,
            )

    def _replan(self, q: UringQueue) -> None:
        if q.ring is None or q.closing:
            return
        q.repoint()
        if q.plan is not None:
            q.plan.on_change = self.repoint

    def in_flight(self) -> int:
        return sum(q.stats.in_flight for q in self.queues)

    async def stop_serving(self, abort: bool) -> None:
        for loop, queues in self._by_loop().items():
            await _on_loop(loop, lambda qs=queues: _gather(q.stop_serving(abort) for q in qs))

    async def drain_and_release(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """After the connection was aborted: wait for every entry, free the buffers. Returns
        False if some entry never came back (its buffers are then kept alive)."""
        ok = True
        for loop, queues in self._by_loop().items():

            async def one(qs: list[UringQueue] = queues) -> bool:
                done = await _gather(q.wait_drained(timeout) for q in qs)
                for q in qs:
                    q.release()
                return all(done)

            ok &= await _on_loop(loop, one)
        return ok

    def info(self) -> list[dict[str, Any]]:
        return [q.info() for q in self.queues]


async def start_queues(queues: list[UringQueue]) -> None:
    """On the queues' loop: queue every REGISTER, submit them now and reap the immediate
    refusals (a valid REGISTER completes only when a request arrives)."""
    for q in queues:
        q.start()
    ring = queues[0].ring
    assert ring is not None
    ring.flush()
    await asyncio.sleep(0)
    ring.flush()


async def _gather(coros: Any) -> list[Any]:
    return list(await asyncio.gather(*coros))


async def _on_loop(loop: asyncio.AbstractEventLoop, coro_fn: Callable[[], Any]) -> Any:
    """Run ``coro_fn()`` on ``loop`` (the caller may be on another loop)."""
    if asyncio.get_running_loop() is loop:
        return await coro_fn()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro_fn(), loop))
