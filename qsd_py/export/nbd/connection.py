"""One client of the NBD server: its negotiation, then its requests.

The negotiation is a coroutine on the daemon's loop feeding the engine
(:class:`qsd_py.nbd.server.Handshake`). Once the client chose an export the connection moves
to that export's loop (an iothread's, or the daemon's) and serves requests from callbacks,
without a coroutine per request where it can:

* the socket is read into a receive buffer until a receive comes back short (at most
  :data:`RECV_SIZE` bytes a readiness callback); every whole request in it is parsed in
  place. A data payload above :data:`BIG_PAYLOAD` is received straight into a page-aligned
  buffer of its own (qsd_py/export/nbd/buffers.py); a smaller one is a view of the receive
  buffer, which is replaced, not overwritten, while a write still uses it. After a large
  WRITE the next header and payload come in one ``recvmsg`` (:meth:`_recv_ahead`);
* READ and WRITE take the fast road the node's plan allows (:func:`qsd_py.block.fast_io.route`,
  the same decision as the FUSE export's): a ``preadv``/``pwritev`` right there for a file
  held in memory, an SQE on the loop's io_uring ring for a file on disk, the cluster table
  for qcow2. A READ's data goes into a page-aligned buffer (what ``O_DIRECT`` needs without a
  bounce copy) and leaves after its header as a second iovec; a READ of
  :data:`SENDFILE_MIN` or more of a raw file held in memory leaves by ``sendfile`` from the
  page cache instead (no copy in the daemon). A structured read is answered
  as one data chunk when cheap facts say the range is data (the table, or the file's last
  SEEK_HOLE span), as a hole chunk when the table says zeroes;
* replies are queued and leave in batches: one ``sendmsg`` per readiness callback or loop
  iteration for every reply ready by then, a partial send keeps the rest (no copy);
* everything else, and anything the fast road cannot serve, runs as a task awaiting the
  node's coroutines; tasks complete in any order and their replies join the queue.

A connection holds at most :data:`MAX_IN_FLIGHT` tasks and transfers, :data:`MAX_RESERVED`
bytes of data they read or write, and :data:`MAX_QUEUED` bytes of replies: beyond that it stops
reading the socket until some are done, so a client can never make the daemon buffer without
bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
from collections import deque
from itertools import islice, takewhile
from typing import TYPE_CHECKING, Any, Protocol

from qsd_py.block import fast_io
from qsd_py.block.fast_io import FILL, INLINE, NULL, RBD, TRANSFER, URING, copy_inline, route
from qsd_py.block.fast_settle import settle_on
from qsd_py.block.node import STATUS_DATA, STATUS_ZERO
from qsd_py.errors import QMPError
from qsd_py.export.nbd import buffers, eager
from qsd_py.export.nbd.buffers import AlignedBuffer
from qsd_py.nbd.constants import STATE_HOLE, STATE_ZERO, Cmd, CmdFlag
from qsd_py.nbd.server import (
    META_ID_ALLOCATION_DEPTH,
    META_ID_BASE_ALLOCATION,
    META_ID_DIRTY_BITMAP,
    Closed,
    Handshake,
    Ready,
    StartTLS,
    Transmission,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine

    from qsd_py.block.drivers.file import FileNode
    from qsd_py.block.fast_io import FastPlan
    from qsd_py.block.node import BlockNode
    from qsd_py.export.nbd.export import NbdExport
    from qsd_py.export.nbd.server import NbdServer
    from qsd_py.nbd.server import Extents

log = logging.getLogger("qsd_py.export.nbd")

RECV_SIZE = 256 << 10  #: receive buffer of a connection in the transmission phase
BIG_PAYLOAD = 64 << 10  #: larger WRITE payloads are received into a buffer of their own
#: Largest payload received ahead (see :meth:`Connection._recv_ahead`): what a guess that
#: misses copies back into the receive buffer at most.
AHEAD_MAX = 4 << 20
HANDSHAKE_BUFFER = 64 << 10
MAX_IN_FLIGHT = 128  #: requests served by tasks at once, per connection
MAX_RESERVED = 64 << 20  #: data bytes of the requests tasks serve, per connection
MAX_QUEUED = 64 << 20  #: reply bytes not yet sent before the connection stops reading
IOV_MAX = 1024  #: buffers per sendmsg
#: READs and WRITEs up to this long of a file held in memory are copied on the loop (fast_io's
#: INLINE) instead of going to an io-wq thread (fast_io's bound is 128 KiB, FUSE's): an NBD
#: client moving large requests (nbdcopy, qemu-img) keeps both CPUs busy, and the hand-off to
#: io-wq (wake-up, two context switches) cost more CPU than the parallel copy saved: 256 KiB
#: nbdcopy writes took 0.39-0.52 s of daemon CPU per GiB inline against 0.54-0.63 s through
#: io-wq (docs/benchmarks.rst, session 11). A 1 MiB copy holds the loop ~100 us at most.
MEMORY_INLINE_MAX = 1 << 20
#: READs at least this long from a file held in memory leave by ``sendfile`` (page cache to
#: socket, no copy in the daemon); shorter ones are copied (one ``sendmsg`` carries many).
SENDFILE_MIN = 64 << 10
#: Structured reads at least this long report holes as OFFSET_HOLE chunks (block status per
#: read); shorter ones are one data chunk: a hole chunk would save less than the lookup costs.
SPARSE_READ_MIN = 64 << 10
# Request flags as plain ints: ``flags & _FUA`` runs enum code (a Python call) per
# request, ``flags & _FUA`` one C operation.
_FUA, _DF, _REQ_ONE = int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.REQ_ONE)
_NO_HOLE, _FAST_ZERO = int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)
# Commands too: ``Cmd.READ`` is an enum member lookup, a Python call each time.
_READ, _WRITE, _CACHE, _DISC = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.CACHE), int(Cmd.DISC)
_READ_OR_CACHE = (_READ, _CACHE)
# What an error reply says when a request fails, as QEMU words it per command.
READ_FAILED = "reading from file failed"
WRITE_FAILED = "writing to file failed"
FLUSH_FAILED = "flush failed"
TRIM_FAILED = "discard failed"
STATUS_FAILED = "can't get block status"


def _not_range(item: object) -> bool:
    return type(item) is not _FileRange


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Channel(Protocol):
    """The byte stream of a connection: the socket itself, or TLS over it (tls.py)."""

    def recv_into(self, view: memoryview) -> int: ...

    def send(self, buffers: Any) -> int: ...

    def flush(self) -> bool: ...

    def buffered(self) -> bool: ...


class PlainChannel:
    """The socket as it is (no TLS). Non-blocking: calls raise BlockingIOError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # The socket's own (C) methods in place of the two below: no Python frame per
        # receive or send (the connection skips flush() and buffered() itself, _plain).
        self.recv_into = sock.recv_into  # type: ignore[method-assign]
        self.send = sock.sendmsg  # type: ignore[method-assign]

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def send(self, buffers: Any) -> int:
        """Send what the socket takes of ``buffers`` now; returns bytes taken."""
        return self.sock.sendmsg(buffers)

    def flush(self) -> bool:
        """Push out bytes the channel holds itself (none without TLS)."""
        return True

    def buffered(self) -> bool:
        """Whether bytes were received but not returned yet (never without TLS)."""
        return False


class _PageCache:
    """The file of a plan, opened once more without ``O_DIRECT`` for ``sendfile`` (which
    would copy through a buffer of its own with it). Closed when the last queued range
    that reads it is gone: a pivot or the node's close cannot pull it from under them."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = -1  # until the open succeeds (__del__ runs after a failed __init__ too)
        self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


class _FileRange:
    """A READ's data queued as a range of a file held in memory, sent by ``sendfile``
    when its turn comes (after its header)."""

    __slots__ = ("file", "pos", "length")

    def __init__(self, file: _PageCache, pos: int, length: int) -> None:
        self.file = file
        self.pos = pos
        self.length = length

    def __len__(self) -> int:
        return self.length


class _Transfer:
    """One READ or WRITE on the backend (the loop's ring, or the pool): what its reply
    needs once the I/O is done. Reused: a connection keeps the idle ones."""

    __slots__ = ("xfer", "cookie", "offset", "length", "buf", "writing", "plan")

    def __init__(self, conn: Connection, plan: FastPlan) -> None:
        # The backend calls conn._transfer_done(self, res) straight (a partial: no Python
        # frame of its own between the ring's dispatch and the reply)
        done = functools.partial(conn._transfer_done, self)
        self.xfer: Any = plan.backend.transfer(done)  # type: ignore[union-attr]
        self.plan = plan  # the plan that routed it (a pivot may replace the connection's)
        self.cookie = self.offset = self.length = 0
        self.buf: AlignedBuffer | None = None
        self.writing = False


class Connection:
    """One client connection, from accept to close."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.channel: Channel = PlainChannel(sock)
        self.main_loop = asyncio.get_running_loop()
        self.loop = self.main_loop  # the loop that owns the socket now
        self.closed: asyncio.Future[None] = self.main_loop.create_future()
        self.export: NbdExport | None = None
        self.node: BlockNode | None = None
        self.t: Transmission | None = None
        self.plan: FastPlan | None = None  # READ/WRITE without a task (fast_io)
        self._file: FileNode | None = None  # the file under a plan without cluster table
        self._ring: Any = None  # the loop's io_uring ring for the plan's transfers
        self._idle: list[_Transfer] = []
        self._transfers = 0  # in flight
        self._retired: list[FastPlan] = []  # plans a pivot replaced, until their transfers end
        self.writethrough = False
        self.closing = False  # no more requests are read
        self._hard = False  # replies are dropped, the socket is shut down
        self._finished = False
        self._negotiation: asyncio.Task[None] | None = None
        # transmission state
        self.rbuf = bytearray()
        self._rview = memoryview(self.rbuf)
        self.rpos = 0
        self.rend = 0
        self._need = 0  # bytes from rpos the next request needs whole
        self._pins = 0  # tasks still using a payload view of rbuf
        self._big: AlignedBuffer | None = None  # a large WRITE payload being received
        self._big_got = 0
        self._big_request: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._ahead = 0  # payload length received ahead of the next header (0: none)
        self._spare: AlignedBuffer | None = None  # the buffer it goes to, while unused
        self._plain = True  # no TLS: the socket itself can scatter a receive
        self._page_cache: _PageCache | None = None  # READs to send with sendfile
        self._ranges = 0  # _FileRange items in the reply queue
        self._hsize = 0  # request header size (the transmission's)
        self._reading = False
        # Each task's data bytes, and its request's cookie, offset and failure text (what
        # its error reply says should the task raise: :meth:`_task_done`).
        self._tasks: dict[asyncio.Task[None], tuple[int, int, int, str]] = {}
        self._reserved = 0
        self._out: deque[bytes | bytearray | memoryview | _FileRange] = deque()
        self._owners: deque[AlignedBuffer | None] = deque()  # the pool buffer under each
        self._out_bytes = 0
        self._writer_armed = False
        self._flush_scheduled = False
        self._in_read = False  # in _on_readable, which flushes at its end
        self._pause: list[int] = [0]  # the export's drained sections (NbdExport.paused)
        self._idle_waiters: list[asyncio.Future[None]] = []
        # A large WRITE to copy on the loop after the next receive (see _write_inline)
        self._deferred: tuple[Any, ...] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Begin the negotiation (on the daemon's loop)."""
        self._negotiation = self.main_loop.create_task(self._negotiate_then_serve())

    def close(self) -> None:
        """Hang up now (export deleted, server stopped): requests still running finish,
        but their replies are dropped. Safe from any thread."""
        loop = self.loop
        if loop is _running_loop():
            self._hard_close()
        else:
            loop.call_soon_threadsafe(self._hard_close)

    def _hard_close(self) -> None:
        if self._finished:
            return
        if self._deferred is not None:  # received whole: written, its reply dropped
            self._run_deferred()
        self._hard = True
        self.closing = True
        if self._negotiation is not None and not self._negotiation.done():
            self._negotiation.cancel()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._stop_reading()
        self._disarm_writer()
        self._out.clear()
        self._owners.clear()
        self._out_bytes = 0
        self._ranges = 0
        if not self._serving() and self.t is not None:
            self._finish()

    def _finish(self) -> None:
        """Close the socket and tell the server and the export (on the daemon's loop)."""
        if self._finished:
            return
        self._finished = True
        self._stop_reading()
        self._disarm_writer()
        self.sock.close()
        self._page_cache = None
        if self._spare is not None:
            buffers.give(self._spare)
            self._spare = None
        if self.plan is not None:
            self.plan.release()  # no transfer routed by it is still running
        self._release_retired()
        self._wake_idle()
        if self.loop is self.main_loop:
            self._forget()
        else:
            self.main_loop.call_soon_threadsafe(self._forget)

    def _forget(self) -> None:
        if self.export is not None:
            self.export.clients.discard(self)
        self.server.connection_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- negotiation -----------------------------------------------------------------------
    async def _negotiate_then_serve(self) -> None:
        ready: Ready | None = None
        pending = b""
        try:
            limit = self.server.handshake_max_seconds
            async with asyncio.timeout(limit or None):
                found = await self._negotiate()
            if found is not None:
                ready, pending = found
        except TimeoutError:
            log.warning("NBD client did not finish negotiating in %s seconds", limit)
        except asyncio.CancelledError:
            pass  # hung up on (export deleted, server stopped): close below
        except (OSError, QMPError) as err:
            log.warning("option negotiation failed: %s", err)
        if ready is None or self.closing:
            self._finish()
            return
        self._attach(ready, pending)

    async def _negotiate(self) -> tuple[Ready, bytes] | None:
        hs = Handshake(self.server, tls=self.server.tls is not None)
        buf = bytearray(HANDSHAKE_BUFFER)
        view = memoryview(buf)
        greeted = False
        while True:
            if hs.out:
                data = bytes(hs.out)
                hs.out.clear()
                try:
                    await self._send_all(data)
                except OSError:
                    if greeted and not hs.aborted:
                        raise
                    return None  # a port probe, or a client gone after NBD_OPT_ABORT: quiet
                greeted = True
            event = hs.next_event()
            if event is None:
                n = await self._recv(view)
                if n == 0:
                    return None
                hs.receive_data(view[:n])
            elif isinstance(event, StartTLS):
                await self._start_tls(hs.take_unread())
                hs.tls_started()
            elif isinstance(event, Closed):
                if event.error is not None:
                    log.warning("%s", event.error)
                return None
            else:
                return event, hs.take_unread()

    async def _start_tls(self, unread: bytes) -> None:
        """Replace the channel by a TLS one (the server's credentials, then its check of
        the client: certificate name against ``tls-authz``); ``unread`` is the start of the
        client's TLS handshake. A client that fails gets no data: the caller closes."""
        import ssl

        from qsd_py.export.nbd.tls import TlsChannel
        from qsd_py.objects.tls_creds import verify_error_text

        creds = self.server.tls
        assert creds is not None
        channel = TlsChannel(self.sock, creds.server_context(), unread)
        try:
            await self._tls_handshake(channel)
        except ssl.SSLCertVerificationError as err:
            raise QMPError(verify_error_text(err, None)) from err
        creds.check_peer(channel.ssl, self.server.resolve_authz())
        self.channel = channel
        self._plain = False

    async def _tls_handshake(self, channel: Any) -> None:
        while not channel.handshake_step():
            while not channel.flush():
                await self._wait(writing=True)
            while True:
                try:
                    if not channel.receive_ciphertext():
                        raise ConnectionError("TLS handshake: the client hung up")
                    break
                except (BlockingIOError, InterruptedError):
                    await self._wait(writing=False)
        while not channel.flush():
            await self._wait(writing=True)

    async def _wait(self, writing: bool) -> None:
        loop = self.loop
        fut = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        if writing:
            loop.add_writer(self.fd, wake)
        else:
            loop.add_reader(self.fd, wake)
        try:
            await fut
        finally:
            if writing:
                loop.remove_writer(self.fd)
            else:
                loop.remove_reader(self.fd)

    async def _recv(self, view: memoryview) -> int:
        while True:
            try:
                return self.channel.recv_into(view)
            except (BlockingIOError, InterruptedError):
                await self._wait(writing=False)

    async def _send_all(self, data: bytes) -> None:
        rest = memoryview(data)
        while rest:
            try:
                rest = rest[self.channel.send([rest]) :]
            except (BlockingIOError, InterruptedError):
                pass
            if rest:
                await self._wait(writing=True)
        while not self.channel.flush():
            await self._wait(writing=True)

    # --- switching to the transmission phase ----------------------------------------------
    def _attach(self, ready: Ready, pending: bytes) -> None:
        export: NbdExport = ready.export  # type: ignore[assignment]
        if export.shutting_down or self.server.find(export.name) is not export:
            self._finish()  # deleted while the client was choosing it
            return
        self.export = export
        self._pause = export.paused
        export.clients.add(self)
        self.node = export.node
        self.t = ready.transmission
        self.writethrough = export.writethrough
        self.loop = export.loop
        if self.loop is self.main_loop:
            self._serve(pending)
        else:
            self.loop.call_soon_threadsafe(self._serve, pending)

    def _serve(self, pending: bytes) -> None:
        """On the export's loop: read requests from now on."""
        if self.closing:
            self._finish()
            return
        self._plain = type(self.channel) is PlainChannel
        self._plan()
        self._hsize = self.t.header_size  # type: ignore[union-attr]
        self.rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self.rbuf)
        self.rbuf[: len(pending)] = pending
        self.rend = len(pending)
        self._start_reading()
        self._parse()
        self._on_readable()  # a TLS channel may hold decrypted bytes already
        self._flush()

    def _plan(self) -> None:
        """On the export's loop: how READ and WRITE reach the node's bytes without a task.
        Files go through the loop's io_uring ring whatever their ``aio`` (what the FUSE
        io_uring queues do: the ring costs no thread hop), or the node's pool without one."""
        node = self.node
        assert node is not None
        writable = self.export.writable  # type: ignore[union-attr]
        plan = fast_io.plan_for(node, ring_io=True, writable=writable)
        if plan is not None and plan.kind == URING:
            self._ring = plan.backend.ring()  # type: ignore[union-attr]
            if self._ring is None:  # no io_uring here
                plan.release()
                plan = fast_io.plan_for(node, writable=writable)
        if plan is not None and plan.inline_max:  # a file held in memory
            plan.inline_max = MEMORY_INLINE_MAX
        self.plan = plan
        if plan is not None:
            plan.settle = self._settle
        target = node.fast_target() if plan is not None and plan.kind != NULL else None
        self._page_cache = None
        if target is not None and target.table is None and target.file is not None:
            self._file = target.file
            if self._plain and target.file.in_memory and plan is not None:
                with contextlib.suppress(OSError):  # then reads are copied
                    self._page_cache = _PageCache(plan.fd)

    async def _settle(self) -> None:
        """The node closed its plans to writes: wait for the transfers in flight (fast
        writes among them), on the connection's loop (fast_settle.py)."""
        await settle_on(self.loop, lambda: self._transfers, "NBD connection")

    def repoint(self, node: BlockNode) -> None:
        """Serve ``node`` from now on (a pivot): a fresh fast plan for it at once. The old
        plan is released once the transfers it routed are done (they count on it), and the
        idle transfers, made for its backend, are dropped."""
        if self._finished:
            return
        if self.plan is not None:
            self._retired.append(self.plan)
            self.plan = None
            if not self._transfers:
                self._release_retired()
        self._idle.clear()
        self._file = None
        self.node = node
        self._plan()

    def _release_retired(self) -> None:
        for plan in self._retired:
            plan.release()
        self._retired.clear()

    def _serving(self) -> int:
        """Requests still being served (tasks and transfers)."""
        return len(self._tasks) + self._transfers

    # --- reading -----------------------------------------------------------------------------
    def _start_reading(self) -> None:
        if not self._reading and not self.closing:
            self._reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.fd)

    def _busy(self) -> bool:
        """Whether the connection holds all it may (tasks, their data, unsent replies), or
        may start nothing now (its export's node is drained)."""
        return (
            self._pause[0]
            or self._serving() >= MAX_IN_FLIGHT
            or self._reserved >= MAX_RESERVED
            or self._out_bytes >= MAX_QUEUED
        )

    async def wait_idle(self) -> None:
        """On the connection's loop: until no request of it is being served (a drain; the
        export's ``paused`` keeps new ones from starting meanwhile)."""
        if self._deferred is not None:
            self._run_deferred()  # a WRITE received whole but not copied yet
            if not self._hard:
                self._flush()
        while self._serving() and not self._finished:
            fut = self.loop.create_future()
            self._idle_waiters.append(fut)
            await fut

    def _wake_idle(self) -> None:
        if self._idle_waiters and (self._finished or not self._serving()):
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def resume(self) -> None:
        """On the connection's loop, after a drain: serve the requests that waited."""
        if self._finished:
            return
        self._resume_if_possible()
        if not self._hard:
            self._flush()

    def _resume_if_possible(self) -> None:
        """After a task or a send: read again if the limits allow it."""
        if self.closing or self._reading or self._busy():
            return
        self._start_reading()
        self._parse()  # requests already received wait in the buffer

    def _on_readable(self) -> None:
        """Receive and serve what the socket holds; the replies that are ready by then
        leave together at the end (one ``sendmsg``), not in a loop turn of their own."""
        self._in_read = True
        ring = self._ring
        claimed = ring is not None and ring.claim_flush()
        try:
            self._receive()
        finally:
            if claimed:  # the transfers of the requests just read go out now, and the
                ring.release_flush()  # replies of those done join this callback's send
            self._in_read = False
        if not self._hard:
            self._flush()

    def _receive(self) -> None:
        """Receive again while a receive fills all it asked for (more is likely waiting),
        up to :data:`RECV_SIZE` bytes a call (then the loop's other callbacks, the ring's
        submission among them, get their turn), else back to the loop without an EAGAIN
        round."""
        channel = self.channel
        plain = self._plain  # nothing buffered in the channel: no buffered() call
        total = 0
        while self._reading:
            big = self._big
            deferred = self._deferred  # run after this receive, not one it makes
            copied = False
            try:
                if big is not None:
                    want = self._big_request[4] - self._big_got
                    n = channel.recv_into(big.view[self._big_got : self._big_request[4]])
                else:
                    self._make_room()
                    if self._ahead and self._plain and self.rend - self.rpos < self._hsize:
                        want, n = self._recv_ahead()
                    else:
                        view = self._rview[self.rend :]
                        want = len(view)
                        n = channel.recv_into(view)
                        self.rend += n
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self._abort(f"read failed: {err}")
                return
            finally:
                if deferred is not None and deferred is self._deferred:
                    self._run_deferred()
                    copied = True
            if n == 0:
                self._end_of_input()
                break
            if big is not None:
                self._big_got += n
                if self._big_got == self._big_request[4]:
                    self._big_done()
            self._parse()
            total += n
            # A deferred WRITE waits for one more receive, within bounds; after its copy the
            # client has likely refilled the socket: receive again rather than poll.
            enough = total >= RECV_SIZE and (self._deferred is None or total >= 4 * RECV_SIZE)
            if (n < want and not copied or enough) and (plain or not channel.buffered()):
                break
        if self._deferred is not None:
            self._run_deferred()

    def _recv_ahead(self) -> tuple[int, int]:
        """After a large WRITE: receive the rest of the next header into the receive buffer
        and, in the same ``recvmsg``, what follows it into a pool buffer of the last
        payload's length. When the request is a WRITE that fits (nbdcopy and qemu-img send
        one size throughout) its payload is already where the write uses it: no copy out of
        the receive buffer, one receive per request instead of two. Anything else has its
        bytes copied behind the header and the guessing stops until the next large WRITE.
        Returns (bytes asked for, bytes received)."""
        need = self._hsize - (self.rend - self.rpos)
        ahead = self._ahead
        spare = self._spare
        if spare is None or spare.size < ahead:
            if spare is not None:
                buffers.give(spare)
            spare = buffers.take(ahead)
        self._spare = None
        end = self.rend
        n = self.sock.recvmsg_into([self._rview[end : end + need], spare.view[:ahead]])[0]
        if n <= need:
            self.rend = end + n
            self._spare = spare
        else:
            self.rend = end + need
            self._adopt(spare, n - need)
        return need + ahead, n

    def _adopt(self, spare: AlignedBuffer, got: int) -> None:
        """The header is whole and ``got`` bytes after it are in ``spare``: make ``spare``
        the request's payload buffer if it is a WRITE that fits, else copy them behind."""
        t = self.t
        assert t is not None
        fields = t.parse_header(self.rbuf, self.rpos)
        if fields is not None and not self.closing and not self._busy():
            flags, cmd, cookie, offset, length = fields
            if (
                cmd == _WRITE
                and BIG_PAYLOAD < length <= spare.size
                and t.check_length(flags, cmd, length) is None
            ):
                self.rpos += self._hsize
                self._big = spare
                self._big_request = fields
                self._ahead = min(length, AHEAD_MAX)
                if got > length:  # the next request's start: behind, in the receive buffer
                    self._append(spare.view[length:got])
                    got = length
                self._big_got = got
                if got == length:
                    self._big_done()
                return
        self._ahead = 0
        self._append(spare.view[:got])
        self._spare = spare

    def _append(self, data: memoryview) -> None:
        """Put ``data`` at the receive buffer's end (a larger buffer if it must)."""
        pos, end = self.rpos, self.rend
        if len(self.rbuf) - end < len(data):
            unparsed = end - pos
            fresh = bytearray(max(RECV_SIZE, unparsed + len(data)))
            fresh[:unparsed] = self._rview[pos:end]
            self.rbuf = fresh
            self._rview = memoryview(fresh)
            self._pins = 0
            self.rpos, end = 0, unparsed
        self._rview[end : end + len(data)] = data
        self.rend = end + len(data)

    def _make_room(self) -> None:
        """Room at the buffer's end for what the next request needs: move the unparsed
        bytes to the start, or into a new buffer while tasks still use views of this one."""
        pos, end = self.rpos, self.rend
        if pos == end and not self._pins:
            self.rpos = self.rend = 0
            if len(self.rbuf) > RECV_SIZE:  # grown by _append: back to its usual size
                self.rbuf = bytearray(RECV_SIZE)
                self._rview = memoryview(self.rbuf)
            return
        size = len(self.rbuf)
        if size - end >= max(self._need - (end - pos), 4096):
            return
        unparsed = end - pos
        if self._pins:  # the old buffer lives on as long as the tasks' views of it
            fresh = bytearray(size)
            fresh[:unparsed] = self._rview[pos:end]
            self.rbuf = fresh
            self._rview = memoryview(fresh)
            self._pins = 0
        else:
            self.rbuf[:unparsed] = self._rview[pos:end].tobytes()
        self.rpos, self.rend = 0, unparsed

    def _parse(self) -> None:
        """Serve every whole request in the receive buffer."""
        t = self.t
        if t is None or self._big is not None:
            return
        hsize = t.header_size
        view = self._rview
        buf = self.rbuf
        pos, end = self.rpos, self.rend
        self._need = hsize
        unpack, request_magic, plain = t.header.unpack_from, t.request_magic, t.plain
        tasks, pause = self._tasks, self._pause
        # The loop's test is _busy()'s, inline: two calls a request less.
        while not (
            self.closing
            or pause[0]
            or len(tasks) + self._transfers >= MAX_IN_FLIGHT
            or self._reserved >= MAX_RESERVED
            or self._out_bytes >= MAX_QUEUED
        ):
            if end - pos < hsize:
                break
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)  # t.parse_header's
            if magic != request_magic:
                self.rpos = pos
                self._abort("invalid request magic")
                return
            if cmd == _WRITE:
                plen = length
            else:
                plen = t.payload_length(flags, cmd, length) if flags and length else 0
            if plen:
                error = t.check_length(flags, cmd, length)
                if error is not None:  # the payload cannot be skipped: answer, then close
                    self._queue(t.reply_error(cookie, offset, error.errno, error.message))
                    self.rpos = pos
                    self._close_when_done()
                    return
                have = end - pos - hsize
                if have < plen:
                    if plen > BIG_PAYLOAD:
                        self._big_start(
                            (flags, cmd, cookie, offset, length), view[pos + hsize : end]
                        )
                        pos = end
                    else:
                        self._need = hsize + plen
                    break
                payload = view[pos + hsize : pos + hsize + plen]
                pos += hsize + plen
                if cmd == _WRITE and self._deferred is None and plain(flags, cmd, offset, length):
                    try:
                        self._write(flags, cookie, offset, payload, buf)
                    except Exception as err:  # noqa: BLE001 - as in _request
                        self._request_failed(err, cookie, offset, WRITE_FAILED)
                else:
                    self._request(flags, cmd, cookie, offset, length, payload, buf)
            else:
                pos += hsize
                if (
                    cmd == _READ
                    and length
                    and self._deferred is None
                    and plain(flags, cmd, offset, length)
                ):
                    try:
                        self._read(flags, cookie, offset, length)
                    except Exception as err:  # noqa: BLE001 - as in _request
                        self._request_failed(err, cookie, offset, READ_FAILED)
                else:
                    self._request(flags, cmd, cookie, offset, length, None, None)
        self.rpos = pos
        if self._busy():
            self._stop_reading()  # resumed as tasks finish and replies leave

    def _big_start(self, fields: tuple[int, int, int, int, int], have: memoryview) -> None:
        """A WRITE too large for the receive buffer: its data goes to a buffer of its own,
        the part already received copied, the rest received straight into it."""
        plen = fields[4]
        self._ahead = min(plen, AHEAD_MAX)
        self._big = big = buffers.take(plen)
        big.view[: len(have)] = have
        self._big_got = len(have)
        self._big_request = fields

    def _big_done(self) -> None:
        data = self._big
        assert data is not None
        self._big = None
        flags, cmd, cookie, offset, length = self._big_request
        self._request(flags, cmd, cookie, offset, length, data.view[:length], data)

    def _end_of_input(self) -> None:
        """The client closed its side: finish what it asked for, then close."""
        self._close_when_done()

    # --- requests ---------------------------------------------------------------------------
    def _request(
        self,
        flags: int,
        cmd: int,
        cookie: int,
        offset: int,
        length: int,
        payload: memoryview | None,
        owner: bytearray | AlignedBuffer | None,
    ) -> None:
        """Check one request and serve it (right now, or with a task)."""
        t = self.t
        assert t is not None
        if self._deferred is not None:
            self._run_deferred()  # requests are served in the order they came
        contexts = None
        if payload is not None and cmd != _WRITE:
            if cmd == Cmd.BLOCK_STATUS:
                length, contexts = t.parse_block_status_payload(payload)
            else:
                length = 0  # a payload no command here takes: dropped, the flag refused
            payload = owner = None
        if cmd == _DISC:
            self._close_when_done()
            return
        error = t.check_length(flags, cmd, length) if cmd in _READ_OR_CACHE else None
        if error is None:
            error = t.check(flags, cmd, offset, length)
        if error is not None:
            self._queue(t.reply_error(cookie, offset, error.errno, error.message))
            return
        try:
            if cmd == _READ:
                self._read(flags, cookie, offset, length)
            elif cmd == _WRITE:
                self._write(flags, cookie, offset, payload or memoryview(b""), owner)
            elif cmd == Cmd.FLUSH:
                self._spawn(self._flush_node(cookie, offset), cookie, offset, FLUSH_FAILED)
            elif cmd == Cmd.TRIM:
                work = self._trim(flags, cookie, offset, length)
                self._spawn(work, cookie, offset, TRIM_FAILED)
            elif cmd == Cmd.WRITE_ZEROES:
                work = self._write_zeroes(flags, cookie, offset, length)
                self._spawn(work, cookie, offset, WRITE_FAILED)
            elif cmd == Cmd.CACHE:
                self._queue(t.reply_ok(cookie, offset))  # nothing to prefetch into: a no-op
            elif cmd == Cmd.BLOCK_STATUS:
                self._block_status(flags, cookie, offset, length, contexts)
            else:
                message = f"invalid request type ({cmd}) received"
                self._queue(t.reply_error(cookie, offset, errno.EINVAL, message))
        except Exception as err:  # noqa: BLE001 - a bug answers EIO, it does not hang
            self._request_failed(err, cookie, offset, READ_FAILED if cmd == _READ else WRITE_FAILED)

    def _request_failed(self, err: BaseException, cookie: int, offset: int, failure: str) -> None:
        """Serving a request raised something unexpected (a driver's bug, a node closed
        under it): log it, and answer EIO as QEMU maps an unexpected error, so the client
        is never left waiting for the reply. Tasks queue their reply whole once done, so
        none of it left yet and the stream stays in step: the connection goes on."""
        log.error("NBD request failed", exc_info=err)
        t = self.t
        if t is not None and not self._hard:
            self._queue(t.reply_error(cookie, offset, errno.EIO, failure))

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        t = self.t
        assert t is not None
        plan = self.plan
        if flags & _FUA or plan is None or not length:
            self._spawn_read(flags, cookie, offset, length)
            return
        sparse = t.structured and length >= SPARSE_READ_MIN and not flags & _DF
        if sparse and (plan.kind == NULL or plan.kind == RBD):  # its block status decides:
            # null-co's, librbd's diff iterate (QEMU's answer): the node's road
            self._spawn_read(flags, cookie, offset, length)
            return
        action, pos, size = route(plan, offset, length, False)
        if action == FILL:
            if sparse:
                self._queue(t.hole_chunk(cookie, offset, offset, length, True))
                return
            buf = buffers.take(length)
            buffers.zero(buf, length)
            self._queue_read(cookie, offset, length, buf)
            return
        if action != INLINE and action != TRANSFER:
            self._spawn_read(flags, cookie, offset, length)
            return
        if sparse and self._file is not None and not self._is_data(pos, length):
            plan.done()
            fast_io.failed(plan, length, False, redone=True)  # the node counts it
            self._spawn_read(flags, cookie, offset, length)
            return
        if self._page_cache is not None and length >= SENDFILE_MIN:
            plan.done()
            self._queue_range(cookie, offset, length, pos)
            return
        buf = buffers.take(length)
        if action == TRANSFER:
            self._start_transfer(False, cookie, offset, length, buf, pos)
            return
        res = copy_inline(plan.fd, buf.view, length, pos, False)
        plan.done()
        if res < 0:
            fast_io.failed(plan, length, False)
        self._read_done(cookie, offset, length, buf, res)

    def _is_data(self, pos: int, length: int) -> bool:
        """Whether the file's ``[pos, +length)`` is all data (a structured read of it is
        one data chunk): known from the last SEEK_HOLE, or asked now for a file held in
        memory (a walk of its page cache, as QEMU's coroutine does it); False sends the
        read to the node, which splits it into hole and data chunks."""
        file = self._file
        assert file is not None
        if file.known_data(pos, length):
            return True
        if not file.in_memory:
            return False  # the node's block status (in the pool) learns the span
        try:
            is_data, n = file.seek_status(pos, length)
        except OSError:
            return False  # the node's road reports it
        return is_data and n >= length

    def _read_done(
        self, cookie: int, offset: int, length: int, buf: AlignedBuffer, res: int
    ) -> None:
        """A READ's data is in ``buf`` (``res``: bytes, or ``-errno``): reply."""
        if res < 0:
            buffers.give(buf)
            t = self.t
            assert t is not None
            self._queue(t.reply_error(cookie, offset, -res, "reading from file failed"))
            return
        self._queue_read(cookie, offset, length, buf)

    def _queue_read(self, cookie: int, offset: int, length: int, buf: AlignedBuffer) -> None:
        """The reply header, then the data as a view of ``buf`` (given back once sent):
        :meth:`_queue`'s work for both at once."""
        if self._hard:
            buffers.give(buf)
            return
        header = self.t.data_header(cookie, offset, length)  # type: ignore[union-attr]
        out, owners = self._out, self._owners
        out.append(header)
        out.append(buf.view[:length])
        owners.append(None)
        owners.append(buf)
        self._out_bytes += len(header) + length
        if not self._flush_scheduled and not self._in_read:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Send the queued replies soon: once the ring's completions being dispatched now
        all are (their replies leave together, in this loop turn), else next turn."""
        self._flush_scheduled = True
        ring = self._ring
        if ring is None or not ring.after_dispatch(self._flush):
            self.loop.call_soon(self._flush)

    def _queue_range(self, cookie: int, offset: int, length: int, pos: int) -> None:
        """The reply header, then the data as file ``pos`` onwards, sent from the page
        cache when the queue reaches it (a failure then can only hang up, as a structured
        read's does)."""
        t = self.t
        assert t is not None and self._page_cache is not None
        header = bytearray(t.read_header_size)
        t.pack_read_header(header, cookie, offset, offset, length)
        self._queue(header)
        if not self._hard:
            self._ranges += 1
            self._queue(_FileRange(self._page_cache, pos, length))

    def _write(
        self,
        flags: int,
        cookie: int,
        offset: int,
        data: memoryview,
        owner: bytearray | AlignedBuffer | None,
    ) -> None:
        t = self.t
        assert t is not None
        plan = self.plan
        length = len(data)
        fresh = False  # clusters the table says are fresh: allocated first (_write_fresh)
        if (
            plan is not None
            and plan.writable
            and length
            and not flags & _FUA
            and not self.writethrough
        ):
            action, pos, size = route(plan, offset, length, True)
            if action == fast_io.ACCEPT:
                plan.mark(offset, size)  # the node's recording bitmaps (shared_bits.py)
                self._release(owner)
                self._queue(t.reply_ok(cookie, offset))
                return
            if action == INLINE or action == TRANSFER:
                defer = length > BIG_PAYLOAD and self._in_read
                self._write_routed(plan, action, pos, size, cookie, offset, data, owner, defer)
                return
            fresh = plan.entries is not None and fast_io.all_zeroes(plan, offset, length)
        if length and type(owner) is not AlignedBuffer:
            # The node's road (a dirty bitmap, a filter, a format): a payload in the receive
            # buffer is not page-aligned, and an O_DIRECT file node would bounce it through a
            # pool thread; a copy into an aligned buffer costs far less.
            buf = buffers.take(length)
            buf.view[:length] = data
            data, owner = buf.view[:length], buf
        elif owner is not None and owner is self.rbuf:
            self._pins += 1
        if fresh:
            work = self._write_fresh(flags, cookie, offset, data, owner)
            self._spawn_eager(work, cookie, offset, WRITE_FAILED, length)
        else:
            work = self._write_task(flags, cookie, offset, data, owner)
            self._spawn(work, cookie, offset, WRITE_FAILED, len(data))

    def _write_routed(
        self,
        plan: FastPlan,
        action: int,
        pos: int,
        size: int,
        cookie: int,
        offset: int,
        data: memoryview,
        owner: bytearray | AlignedBuffer | None,
        defer: bool,
    ) -> None:
        """A WRITE :func:`route` sent to ``INLINE`` or ``TRANSFER`` (at file ``pos``): start
        it, or with ``defer`` leave it for :meth:`_run_deferred`. ``data`` is no longer used
        once this returns, unless it is ``owner``'s, which the write gives back."""
        length = len(data)
        buf = owner if type(owner) is AlignedBuffer else None
        if buf is None and (plan.align_mask or action == TRANSFER):
            buf = buffers.take(length)  # O_DIRECT or the ring need it to stay put
            buf.view[:length] = data
        if action == TRANSFER:
            assert buf is not None
            self._start_transfer(True, cookie, offset, length, buf, pos)
            return
        work = (plan, cookie, offset, buf.view if buf is not None else data, buf, size, pos)
        if defer:
            self._deferred = work  # copied after the next receive
        else:
            self._write_inline(*work)

    def _write_inline(
        self,
        plan: FastPlan,
        cookie: int,
        offset: int,
        data: memoryview,
        buf: AlignedBuffer | None,
        size: int,
        pos: int,
    ) -> None:
        """Copy a WRITE's data into a file held in memory now, and answer it."""
        res = copy_inline(plan.fd, data, size, pos, True)
        plan.done()
        if res < 0:
            fast_io.failed(plan, size, True)
        plan.mark(offset, size)  # well or not, as the node marks; before the reply
        self._release(buf)
        self._write_done(cookie, offset, res)

    def _run_deferred(self) -> None:
        """Copy the large WRITE received last, now that the next receive emptied the
        socket: a client whose send buffer is smaller than one request (a UNIX socket's is
        ~208 KiB, nbdcopy's requests 256 KiB) was waiting for that room, and refills the
        socket on its CPU while this copy runs on ours, instead of after it."""
        work = self._deferred
        self._deferred = None
        assert work is not None
        self._write_inline(*work)

    def _write_done(self, cookie: int, offset: int, res: int) -> None:
        t = self.t
        assert t is not None
        if res < 0:
            self._queue(t.reply_error(cookie, offset, -res, "writing to file failed"))
        else:
            self._queue(t.reply_ok(cookie, offset))

    @staticmethod
    def _release(owner: object) -> None:
        if type(owner) is AlignedBuffer:
            buffers.give(owner)

    # --- transfers (the loop's ring, or the pool) --------------------------------------------
    def _start_transfer(
        self, writing: bool, cookie: int, offset: int, length: int, buf: AlignedBuffer, pos: int
    ) -> None:
        plan = self.plan
        assert plan is not None
        tr = self._idle.pop() if self._idle else _Transfer(self, plan)
        tr.plan = plan
        tr.writing = writing
        tr.cookie = cookie
        tr.offset = offset
        tr.length = length
        tr.buf = buf
        self._transfers += 1
        self._reserved += length
        try:
            if writing:
                tr.xfer.write(plan.fd, buf.addr, length, pos, self._ring)
            else:
                tr.xfer.read(plan.fd, buf.addr, length, pos, self._ring)
        except OSError as err:  # the loop's ring is closing
            self._transfer_done(tr, -(err.errno or errno.EBADF))

    def _transfer_done(self, tr: _Transfer, res: int) -> None:
        """A transfer's I/O is over: count it, mark a write's bitmaps, reply. Every READ and
        WRITE of a file on disk passes here: calls that would do nothing are skipped."""
        plan, length, buf = tr.plan, tr.length, tr.buf
        assert buf is not None
        self._transfers -= 1
        self._reserved -= length
        if self._idle_waiters:
            self._wake_idle()
        if plan.counts is not None:  # what plan.done() counts (a cluster table's readers)
            plan.done()
        if res < 0:
            fast_io.failed(plan, length, tr.writing)
        if self._retired and not self._transfers:
            self._release_retired()
        tr.buf = None
        self._idle.append(tr)
        if tr.writing:
            if plan.listed[0]:  # the node's recording bitmaps (shared_bits.py), before the reply
                plan.mark(tr.offset, length)
            free = buf.free  # buffers.give(buf), inline
            if len(free) < buf.keep:
                free.append(buf)
            if res < 0:
                self._write_done(tr.cookie, tr.offset, res)
            else:  # _write_done's reply, without its frame
                self._queue(self.t.reply_ok(tr.cookie, tr.offset))  # type: ignore[union-attr]
        elif res < 0:
            self._read_done(tr.cookie, tr.offset, length, buf, res)
        else:
            self._queue_read(tr.cookie, tr.offset, length, buf)
        if self._hard or (self.closing and not self._reading):
            if not self._serving() and not self._out and not self._writer_armed:
                self._finish()
        elif not self._reading:
            self._resume_if_possible()

    def _block_status(
        self, flags: int, cookie: int, offset: int, length: int, contexts: tuple[int, ...] | None
    ) -> None:
        t = self.t
        assert t is not None
        if contexts is None:
            contexts = t.contexts
        if not contexts:
            if t.contexts:
                message = "CMD_BLOCK_STATUS payload not valid"
            else:
                message = "CMD_BLOCK_STATUS not negotiated"
            self._queue(t.reply_error(cookie, offset, errno.EINVAL, message))
        elif not length:
            self._queue(t.reply_error(cookie, offset, errno.EINVAL, "need non-zero length"))
        else:
            req_one = bool(flags & _REQ_ONE)
            work = self._block_status_task(cookie, offset, length, contexts, req_one)
            self._spawn(work, cookie, offset, STATUS_FAILED)

    # --- tasks ------------------------------------------------------------------------------
    def _spawn(
        self,
        coro: Coroutine[Any, Any, None],
        cookie: int,
        offset: int,
        failure: str,
        data: int = 0,
    ) -> None:
        """Serve a request with a task; ``data``: the bytes it reads or writes; ``failure``:
        the text of the error reply should the task raise."""
        task = self.loop.create_task(coro)
        self._tasks[task] = (data, cookie, offset, failure)
        self._reserved += data
        task.add_done_callback(self._task_done)

    def _spawn_eager(
        self,
        coro: Coroutine[Any, Any, None],
        cookie: int,
        offset: int,
        failure: str,
        data: int = 0,
    ) -> None:
        """:meth:`_spawn` for work that mostly finishes without waiting (a fresh qcow2
        cluster's allocation): run at once, a task only for what is left after a wait."""
        try:
            rest = eager.start(coro)
        except Exception as err:  # as _task_done reports a task's
            self._request_failed(err, cookie, offset, failure)
            return
        if rest is not None:
            self._spawn(rest, cookie, offset, failure, data)

    def _spawn_read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        work = self._read_task(flags, cookie, offset, length)
        self._spawn(work, cookie, offset, READ_FAILED, length)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        data, cookie, offset, failure = self._tasks.pop(task)
        self._reserved -= data
        if self._idle_waiters:
            self._wake_idle()
        if not task.cancelled() and task.exception() is not None:
            self._request_failed(task.exception(), cookie, offset, failure)  # type: ignore[arg-type]
        if self._hard or (self.closing and not self._reading):
            if not self._serving() and not self._out and not self._writer_armed:
                self._finish()
            return
        self._resume_if_possible()

    async def _read_task(self, flags: int, cookie: int, offset: int, length: int) -> None:
        t = self.t
        node = self.node
        assert t is not None and node is not None
        if flags & _FUA:
            try:
                await node.flush()
            except OSError as err:
                self._queue(t.reply_error(cookie, offset, err.errno or errno.EIO, "flush failed"))
                return
        if length == 0:
            self._queue(t.reply_done(cookie, offset))
            return
        sparse = t.structured and not flags & _DF
        if sparse and length >= SPARSE_READ_MIN:
            self._queue_all(await self._sparse_read(cookie, offset, length))
            return
        hsize = t.read_header_size
        buf = bytearray(hsize + length)
        try:
            await node.read(offset, memoryview(buf)[hsize:])
        except OSError as err:
            if sparse:  # QEMU answers this read as a sparse one, which hangs up on errors
                self._read_failed(err)
                return
            message = "reading from file failed"
            self._queue(t.reply_error(cookie, offset, err.errno or errno.EIO, message))
            return
        t.pack_read_header(buf, cookie, offset, offset, length)
        self._queue(buf)

    async def _sparse_read(self, cookie: int, offset: int, length: int) -> list[Any]:
        """A structured read as QEMU answers it: ranges that read as zeroes become hole
        chunks, the rest data chunks; an error ends the reply with an error chunk."""
        t = self.t
        node = self.node
        assert t is not None and node is not None
        chunks: list[Any] = []
        pos, end = offset, offset + length
        hsize = t.read_header_size
        while pos < end:
            try:
                status = await node.block_status_above(pos, end - pos)
            except OSError as err:
                message = f"unable to check for holes: {os.strerror(err.errno or errno.EIO)}"
                chunks.append(t.reply_error(cookie, offset, err.errno or errno.EIO, message))
                return chunks
            n = min(max(status.length, 1), end - pos)
            final = pos + n == end
            if status.flags & STATUS_ZERO:
                chunks.append(t.hole_chunk(cookie, offset, pos, n, final))
            else:
                buf = bytearray(hsize + n)
                try:
                    await node.read(pos, memoryview(buf)[hsize:])
                except OSError as err:
                    self._read_failed(err)
                    return []
                t.pack_read_header(buf, cookie, offset, pos, n, final)
                chunks.append(buf)
            pos += n
        return chunks

    def _read_failed(self, err: OSError) -> None:
        """A structured read that fails: QEMU's server sends no error chunk for it but
        disconnects the client (its sparse read gives up the connection), so the client
        sees the connection lost, as blkdebug's users in QEMU's iotests do."""
        strerror = os.strerror(err.errno or errno.EIO)
        self._abort(f"Failed to send reply: reading from file failed: {strerror}")

    async def _write_task(
        self,
        flags: int,
        cookie: int,
        offset: int,
        data: memoryview,
        owner: bytearray | AlignedBuffer | None,
    ) -> None:
        node = self.node
        assert node is not None
        flush = bool(flags & _FUA) or self.writethrough
        try:
            work = node.write(offset, data)
            await self._answer(cookie, offset, work, flush, "writing to file failed")
        finally:
            if owner is not None and owner is self.rbuf:
                self._pins -= 1
            self._release(owner)

    async def _write_fresh(
        self,
        flags: int,
        cookie: int,
        offset: int,
        data: memoryview,
        owner: bytearray | AlignedBuffer | None,
    ) -> None:
        """A WRITE into clusters the table says are fresh (no host cluster, reading as
        zeroes, a new image's): the node allocates them as its own write would
        (``prepare_fast_write``, no data passes), then the data goes on the fast path in
        one request (the FUSE queue workers' PREPARE). Anything else: the node's write."""
        node = self.node
        plan = self.plan
        assert node is not None
        try:
            ok = await node.prepare_fast_write(offset, len(data))
        except OSError:
            ok = False  # the node's write meets the error and reports it
        if ok and plan is not None and plan is self.plan and not self._hard:
            action, pos, size = route(plan, offset, len(data), True)
            if action == INLINE or action == TRANSFER:
                try:
                    self._write_routed(plan, action, pos, size, cookie, offset, data, owner, False)
                finally:
                    if owner is not None and owner is self.rbuf:
                        self._pins -= 1
                return
        await self._write_task(flags, cookie, offset, data, owner)

    async def _flush_node(self, cookie: int, offset: int) -> None:
        node = self.node
        assert node is not None
        await self._answer(cookie, offset, node.flush(), False, "flush failed")

    async def _trim(self, flags: int, cookie: int, offset: int, length: int) -> None:
        node = self.node
        assert node is not None
        work = node.discard(offset, length)
        await self._answer(cookie, offset, work, bool(flags & _FUA), "discard failed")

    async def _write_zeroes(self, flags: int, cookie: int, offset: int, length: int) -> None:
        node = self.node
        assert node is not None
        unmap, no_fallback = not flags & _NO_HOLE, bool(flags & _FAST_ZERO)
        work = node.write_zeroes(offset, length, unmap=unmap, no_fallback=no_fallback)
        flush = bool(flags & _FUA) or self.writethrough
        await self._answer(cookie, offset, work, flush, "writing to file failed")

    async def _answer(
        self, cookie: int, offset: int, work: Awaitable[Any], flush: bool, failure: str
    ) -> None:
        """Run a request's ``work`` (and a flush after it when ``flush``), then reply: done,
        or the error with ``failure`` as QEMU words it."""
        t = self.t
        node = self.node
        assert t is not None and node is not None
        try:
            await work
            if flush:
                await node.flush()
        except OSError as err:
            self._queue(t.reply_error(cookie, offset, err.errno or errno.EIO, failure))
        else:
            self._queue(t.reply_ok(cookie, offset))

    async def _block_status_task(
        self, cookie: int, offset: int, length: int, contexts: tuple[int, ...], req_one: bool
    ) -> None:
        """One chunk per context, in the contexts' order; the last one is final."""
        t = self.t
        assert t is not None
        chunks: list[Any] = []
        for i, context in enumerate(contexts):
            extents = t.new_extents(req_one)
            try:
                await self._extents(context, extents, offset, length)
            except OSError as err:
                message = "can't get block status"
                chunks.append(t.reply_error(cookie, offset, err.errno or errno.EIO, message))
                break
            final = i == len(contexts) - 1
            chunks.append(t.block_status_chunk(cookie, offset, context, extents.pairs(), final))
        self._queue_all(chunks)

    async def _extents(self, context: int, extents: Extents, offset: int, length: int) -> None:
        node = self.node
        export = self.export
        assert node is not None and export is not None
        if context >= META_ID_DIRTY_BITMAP:
            source = export.bitmap_sources[context - META_ID_DIRTY_BITMAP]
            source.extents(extents, offset, length)
            return
        pos, end = offset, offset + length
        while pos < end:
            status = await node.block_status_above(pos, end - pos)
            n = min(max(status.length, 1), end - pos)
            if context == META_ID_BASE_ALLOCATION:
                flags = 0 if status.flags & STATUS_DATA else STATE_HOLE
                if status.flags & STATUS_ZERO:
                    flags |= STATE_ZERO
            else:
                assert context == META_ID_ALLOCATION_DEPTH
                flags = status.depth
            if not extents.add(n, flags):
                return
            pos += n

    # --- replies ------------------------------------------------------------------------------
    def _queue(
        self, data: bytes | bytearray | memoryview, owner: AlignedBuffer | None = None
    ) -> None:
        """Queue ``data`` for the client; ``owner``: the pool buffer ``data`` views, given
        back once sent."""
        if self._hard:
            if owner is not None:
                buffers.give(owner)
            return
        self._out.append(data)
        self._owners.append(owner)
        self._out_bytes += len(data)
        if not self._flush_scheduled and not self._in_read:
            self._schedule_flush()

    def _queue_all(self, chunks: list[Any]) -> None:
        """A reply of several chunks: queued together, so no other reply comes between."""
        for chunk in chunks:
            self._queue(chunk)

    def _flush(self) -> None:
        """Send every queued reply the socket takes now; arm the writer for the rest."""
        self._flush_scheduled = False
        if self._writer_armed or self._finished:
            return
        self._send_queued()

    def _send_queued(self) -> None:
        out = self._out
        owners = self._owners
        channel = self.channel
        while out:
            if self._ranges:
                if type(out[0]) is _FileRange:
                    if not self._send_range():
                        return
                    continue
                batch = list(islice(takewhile(_not_range, out), IOV_MAX))
            else:
                batch = out if len(out) <= IOV_MAX else list(islice(out, IOV_MAX))
            try:
                if len(batch) < len(out) and type(out[len(batch)]) is _FileRange:
                    sent = self.sock.sendmsg(batch, (), socket.MSG_MORE)  # its data follows
                else:
                    sent = channel.send(batch)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                self._abort(f"write failed: {err}")
                return
            self._out_bytes -= sent
            while sent:
                first = out[0]
                size = len(first)
                if size <= sent:
                    out.popleft()
                    owner = owners.popleft()
                    if owner is not None:  # buffers.give(owner), inline: one per READ
                        free = owner.free
                        if len(free) < owner.keep:
                            free.append(owner)
                    sent -= size
                else:
                    out[0] = memoryview(first)[sent:]
                    sent = 0
            if out and type(out[0]) is not _FileRange:
                self._arm_writer()
                return
        if not self._plain and not channel.flush():
            self._arm_writer()
            return
        if self._writer_armed:
            self._disarm_writer()
        if self.closing and not self._reading:
            if not self._serving():
                self._finish()
            return
        if self._out_bytes < MAX_QUEUED:
            self._resume_if_possible()

    def _send_range(self) -> bool:
        """Send the file range at the head of the queue: True once it is all gone, False
        when the socket is full (the writer is armed) or the connection broke."""
        rng = self._out[0]
        assert type(rng) is _FileRange
        try:
            sent = os.sendfile(self.fd, rng.file.fd, rng.pos, rng.length)
        except (BlockingIOError, InterruptedError):
            self._arm_writer()
            return False
        except OSError as err:
            self._abort(f"write failed: {err}")
            return False
        if sent == 0:  # the file ends before the range: its promised bytes cannot come
            self._abort("write failed: reading from file failed: end of file")
            return False
        self._out_bytes -= sent
        if sent < rng.length:
            rng.pos += sent
            rng.length -= sent
            self._arm_writer()
            return False
        self._out.popleft()
        self._owners.popleft()
        self._ranges -= 1
        return True

    def _arm_writer(self) -> None:
        if not self._writer_armed:
            self._writer_armed = True
            self.loop.add_writer(self.fd, self._send_queued)

    def _disarm_writer(self) -> None:
        if self._writer_armed:
            self._writer_armed = False
            self.loop.remove_writer(self.fd)

    # --- ending -------------------------------------------------------------------------------
    def _close_when_done(self) -> None:
        """NBD_CMD_DISC or the end of the client's input: no more requests are read; the
        ones running finish and their replies are sent, then the connection closes."""
        self.closing = True
        self._stop_reading()
        if not self._serving() and not self._out:
            self._finish()

    def _abort(self, reason: str) -> None:
        """A broken stream: say why (as QEMU does) and hang up."""
        log.warning("Disconnect client, due to: %s", reason)
        self._hard_close()
