"""The ``nbd`` driver: a node whose bytes live on an NBD server.

The protocol is qsd_py/nbd/client.py's, the connection and its reconnecting
qsd_py/block/nbd/session.py's; this module turns block layer requests into NBD requests:
split to the server's maximum payload, aligned to its minimum block size (read-modify-write
where a caller is not aligned), and answers mapped back (``base:allocation`` into
:class:`BlockStatus`, NBD errors into OSError).

The connection belongs to the loop that opened the node; requests from other loops
(iothreads) are run there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qsd_py.block.nbd.connection import ConnectError, TlsSetup
from qsd_py.block.nbd.session import ClientSession, Target, open_connection
from qsd_py.block.node import (
    STATUS_DATA,
    STATUS_OFFSET_VALID,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
    Buffer,
    fill_zeroes,
    round_to_sectors,
)
from qsd_py.errors import QMPError
from qsd_py.nbd.client import ExportInfo, Mode, ProtocolError, Request
from qsd_py.nbd.constants import (
    MAX_BUFFER,
    META_BASE_ALLOCATION,
    STATE_HOLE,
    STATE_ZERO,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

T = TypeVar("T")

# Longest effect length of a request without a payload (zeroes, trim, block status) with
# compact headers: QEMU's INT_MAX, aligned down to the minimum block size.
MAX_COMPACT_EFFECT = (1 << 31) - 1


def _align_down(n: int, align: int) -> int:
    return n - n % align


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align


class NbdNode(BlockNode):
    driver = "nbd"
    format_name = "nbd"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.server: dict[str, Any] = opts["server"]
        self.export: str | None = opts.get("export")
        self.bitmap: str | None = opts.get("x-dirty-bitmap")
        self.reconnect_delay: int = opts.get("reconnect-delay", 0)
        self.open_timeout: int = opts.get("open-timeout", 0)
        self.session: ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ranges = _RangeLocks()

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        tls = self._tls_setup()
        # x-dirty-bitmap names a whole meta context ("qemu:dirty-bitmap:NAME"), as in QEMU.
        context = META_BASE_ALLOCATION if self.bitmap is None else self.bitmap
        target = Target(self.server, self.export or "", tls=tls, meta_contexts=[context])
        try:
            conn = await open_connection(target, self.open_timeout)
        except (ConnectError, ProtocolError) as err:
            raise QMPError(str(err)) from err
        except OSError as err:
            raise QMPError(f"Failed to connect: {os.strerror(err.errno or errno.EIO)}") from err
        self._loop = asyncio.get_running_loop()
        self.session = ClientSession(target, conn, self.reconnect_delay)
        try:
            self._check_export(conn.info, context)
        except BaseException:
            self.session.close()
            raise

    def _tls_setup(self) -> TlsSetup | None:
        """``tls-creds`` (an object of the daemon's, for a client endpoint) and the name
        the server's certificate must carry: ``tls-hostname``, else the TCP host."""
        creds_id = self.opts.get("tls-creds")
        if creds_id is None:
            return None
        objects = self.graph.objects
        if objects is None:
            raise QMPError(f"No TLS credentials with id '{creds_id}'")
        creds = objects.tls_creds(creds_id, "client")
        hostname = self.opts.get("tls-hostname")
        if hostname is None and self.server["type"] == "inet":
            hostname = self.server["host"]
        return TlsSetup(creds.client_context(), lambda: creds.client_hostname(hostname))

    def _check_export(self, info: ExportInfo, context: str) -> None:
        if self.bitmap is not None and context not in info.contexts:
            raise QMPError("Could not open image: Invalid argument")  # QEMU 11.1's text
        if info.flags & TransmissionFlag.READ_ONLY and not self.read_only:
            if not self.opts.get("auto-read-only"):
                raise QMPError("Could not open image: Permission denied")
            self.read_only = True

    def close(self) -> None:
        if self.session is None:
            return
        session, self.session = self.session, None
        if self._loop is None or self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            session.close()
        else:
            self._loop.call_soon_threadsafe(session.close)

    @property
    def export_info(self) -> ExportInfo:
        if self.session is None:
            raise OSError(errno.EIO, "NBD node is closed")
        return self.session.info

    # --- the owner loop -------------------------------------------------------------------
    async def _on_loop(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop the connection belongs to."""
        if self._loop is None or asyncio.get_running_loop() is self._loop:
            return await fn(*args)
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        return await asyncio.wrap_future(future)

    async def _send(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        buf: memoryview | None = None,
        payload: Buffer | None = None,
    ) -> Request:
        """One request; a server error becomes OSError with its errno."""
        if self.session is None:
            raise OSError(errno.EIO, "NBD node is closed")
        req = await self.session.request(cmd, offset, length, flags, buf, payload)
        if req.error:
            raise OSError(req.error, req.message or os.strerror(req.error))
        return req

    # --- geometry -------------------------------------------------------------------------
    @property
    def align(self) -> int:
        return self.export_info.min_block

    def _max_payload(self) -> int:
        return _align_down(min(self.export_info.max_block, MAX_BUFFER), self.align)

    def _max_zeroes(self, length: int) -> int:
        """Longest write-zeroes request: the maximum payload with compact headers (QEMU's
        limit), anything with extended headers (64-bit lengths)."""
        return length if self.export_info.mode == Mode.EXTENDED else self._max_payload()

    def _max_effect(self, length: int) -> int:
        """Longest trim or block status request (QEMU's INT_MAX, aligned, with compact
        headers)."""
        if self.export_info.mode == Mode.EXTENDED:
            return length
        return min(length, _align_down(MAX_COMPACT_EFFECT, self.align))

    @staticmethod
    def _pieces(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """``[offset, +length)`` cut into requests of at most ``limit`` bytes."""
        end = offset + length
        return [(pos, min(limit, end - pos)) for pos in range(offset, end, limit)]

    def length(self) -> int:
        return round_to_sectors(self.export_info.size)

    async def do_truncate(self, length: int, prealloc: str) -> None:
        """NBD exports have a fixed size: a no-op truncate (format drivers making sure their
        file is long enough) passes, anything else fails with QEMU's texts."""
        if length > self.length():
            raise OSError(errno.EINVAL, "Cannot grow NBD nodes")
        if length != self.length():
            raise OSError(errno.ENOTSUP, "Cannot resize NBD nodes")

    async def do_allocated_size(self) -> int:
        return 0

    # --- I/O ------------------------------------------------------------------------------
    async def do_read(self, offset: int, buf: memoryview) -> None:
        await self._on_loop(self._read, offset, memoryview(buf))

    async def _read(self, offset: int, buf: memoryview) -> None:
        """Bytes past the export's real end (the node is whole sectors) read as zeroes."""
        size = self.export_info.size
        inside = max(0, min(len(buf), size - offset))
        if inside < len(buf):
            fill_zeroes(buf[inside:])
        if not inside:
            return
        buf = buf[:inside]
        start, end = self._aligned(offset, inside)
        if (start, end) == (offset, offset + inside):
            await self._read_pieces(offset, buf)
            return
        bounce = memoryview(bytearray(end - start))
        await self._read_pieces(start, bounce)
        buf[:] = bounce[offset - start : offset - start + inside]

    async def _read_pieces(self, offset: int, buf: memoryview) -> None:
        pieces = self._pieces(offset, len(buf), self._max_payload())
        await _all(
            self._send(Cmd.READ, pos, n, buf=buf[pos - offset : pos - offset + n])
            for pos, n in pieces
        )

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The range ``[offset, +length)`` widened to the server's minimum block size."""
        align = self.align
        return _align_down(offset, align), _align_up(offset + length, align)

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        await self._on_loop(self._write, offset, memoryview(data).cast("B"))

    async def _write(self, offset: int, data: memoryview) -> None:
        """Aligned writes go as they are; others become read-modify-write of the blocks
        they touch, with no other write overlapping meanwhile."""
        if self.align == 1:  # nothing to read-modify-write, nothing to keep apart
            await self._write_pieces(offset, data)
            return
        start, end = self._aligned(offset, len(data))
        if (start, end) == (offset, offset + len(data)):
            async with self._ranges.hold(start, end, exclusive=False):
                await self._write_pieces(offset, data)
            return
        async with self._ranges.hold(start, end, exclusive=True):
            bounce = memoryview(bytearray(end - start))
            await self._read_edges(start, bounce, offset - start, len(data))
            bounce[offset - start : offset - start + len(data)] = data
            await self._write_pieces(start, bounce)

    async def _read_edges(self, start: int, bounce: memoryview, at: int, n: int) -> None:
        """Read the partly written head and tail blocks of a read-modify-write: ``bounce``
        holds the blocks from ``start``, the new data goes to ``[at, at + n)`` of it."""
        align = self.align
        if at % align:
            await self._read_pieces(start, bounce[:align])
        tail = _align_down(at + n, align)
        if (at + n) % align and not (tail == 0 and at % align):
            await self._read_pieces(start + tail, bounce[tail : tail + align])

    async def _write_pieces(self, offset: int, data: memoryview) -> None:
        pieces = self._pieces(offset, len(data), self._max_payload())
        await _all(
            self._send(Cmd.WRITE, pos, n, payload=data[pos - offset : pos - offset + n])
            for pos, n in pieces
        )

    async def do_flush(self) -> None:
        if self.export_info.flags & TransmissionFlag.SEND_FLUSH:
            await self._on_loop(self._send, Cmd.FLUSH, 0, 0)

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        await self._on_loop(self._write_zeroes, offset, length, unmap, no_fallback)

    async def _write_zeroes(self, offset: int, length: int, unmap: bool, no_fallback: bool) -> None:
        """Zeroes with NBD_CMD_WRITE_ZEROES (NO_HOLE unless unmapping is allowed,
        FAST_ZERO for no_fallback); unaligned edges and servers without the command get
        zeroes written as data."""
        flags = self.export_info.flags
        can_zero = flags & TransmissionFlag.SEND_WRITE_ZEROES
        if no_fallback and not (can_zero and flags & TransmissionFlag.SEND_FAST_ZERO):
            raise OSError(errno.ENOTSUP, "NBD server cannot zero fast")
        start = _align_up(offset, self.align)
        end = max(start, _align_down(offset + length, self.align))
        if not can_zero or start == end:
            await self._zero_as_data(offset, length)
            return
        if start > offset:
            await self._zero_as_data(offset, start - offset)
        if end < offset + length:
            await self._zero_as_data(end, offset + length - end)
        cmd_flags = 0 if unmap and self.discard_unmap else CmdFlag.NO_HOLE
        if no_fallback:
            cmd_flags |= CmdFlag.FAST_ZERO
        async with self._ranges.hold(start, end, exclusive=False):
            await _all(
                self._send(Cmd.WRITE_ZEROES, pos, n, cmd_flags)
                for pos, n in self._pieces(start, end - start, self._max_zeroes(end - start))
            )

    async def _zero_as_data(self, offset: int, length: int) -> None:
        """Zeroes written as data, through the read-modify-write path where unaligned."""
        await self.write_zero_buffers(offset, length)

    async def do_discard(self, offset: int, length: int) -> None:
        """Only whole blocks are discarded (a discard is a hint: the edges stay)."""
        if not self.discard_unmap or self.read_only:
            return
        if not self.export_info.flags & TransmissionFlag.SEND_TRIM:
            return
        start = _align_up(offset, self.align)
        end = _align_down(offset + length, self.align)
        if end > start:
            await self._on_loop(self._discard, start, end - start)

    async def _discard(self, offset: int, length: int) -> None:
        async with self._ranges.hold(offset, offset + length, exclusive=False):
            await _all(
                self._send(Cmd.TRIM, pos, n)
                for pos, n in self._pieces(offset, length, self._max_effect(length))
            )

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._on_loop(self._block_status, offset, length)

    async def _block_status(self, offset: int, length: int) -> BlockStatus:
        """``base:allocation``, or the context of x-dirty-bitmap (a bitmap's dirty bit is
        where the hole bit would be: dirty reads as unallocated, as in QEMU); all data
        where the server agreed to no context. The sector rounding past the export's end
        reads as zeroes."""
        info = self.export_info
        mapped = STATUS_OFFSET_VALID
        if offset >= info.size:
            return BlockStatus(STATUS_ZERO | mapped, length, self, offset)
        length = min(length, info.size - offset)
        context = next(iter(info.contexts), None)
        align = self.align
        if context is None or offset % align:
            n = length if context is None else min(length, align - offset % align)
            return BlockStatus(STATUS_DATA | mapped, n, self, offset)
        want = self._max_effect(min(_align_up(length, align), info.size - offset))
        req = await self._send(Cmd.BLOCK_STATUS, offset, want, CmdFlag.REQ_ONE)
        extent_len, state = req.extents[context][0]
        n = min(extent_len, length)
        flags = mapped | (0 if state & STATE_HOLE else STATUS_DATA)
        if state & STATE_ZERO:
            flags |= STATUS_ZERO
        return BlockStatus(flags, n, self, offset)

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        """QEMU's pseudo URL of the server and export, or a ``json:`` description where no
        URL can say it (fd and vsock addresses, inet addresses with family options)."""
        addr = self.server
        export = self.export
        if addr["type"] == "unix" and not addr.get("abstract"):
            where = f"nbd+unix:///{export}" if export is not None else "nbd+unix://"
            return f"{where}?socket={addr['path']}"
        if addr["type"] == "inet" and not any(k in addr for k in ("ipv4", "ipv6", "to")):
            url = f"nbd://{addr['host']}:{addr['port']}"
            return f"{url}/{export}" if export is not None else url
        return "json:" + json.dumps(self.full_options())

    def full_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": "nbd", "server": dict(self.server)}
        for key in ("export", "tls-creds", "tls-hostname"):
            if key in self.opts:
                opts[key] = self.opts[key]
        return opts

    def limits(self) -> dict[str, int]:
        """QEMU's limits of an nbd node: the server's block sizes, 32 MiB transfers, and
        with compact headers the longest zeroes and discards."""
        info = self.export_info
        limits = {
            "request-alignment": self.align,
            "opt-transfer": max(info.pref_block, 4096),
            "min-mem-alignment": 512,
            "max-transfer": self._max_payload(),
            "opt-mem-alignment": 4096,
            "max-iov": 1024,
        }
        if info.mode != Mode.EXTENDED:
            limits["max-write-zeroes"] = self._max_payload()
            limits["max-discard"] = _align_down(MAX_COMPACT_EFFECT, self.align)
        return limits

    def allocated_size_now(self) -> int | None:
        """Unknown: what the server allocates is not known here (QEMU's too)."""
        return None


NODE = NbdNode


async def _all(coros: Any) -> None:
    """Run requests concurrently; the first failure is raised once all have ended (no
    request is left running with a buffer the caller takes back). One request (the common
    case) is simply awaited: no task for it."""
    coros = list(coros)
    if len(coros) == 1:
        await coros[0]
        return
    results = await asyncio.gather(*coros, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            raise res


class _RangeLocks:
    """Keeps read-modify-write cycles (exclusive) apart from any overlapping write, so
    that no write lands between the read and the write back of the blocks it shares.
    Writes that need no read-modify-write only wait for those."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, bool, asyncio.Future[None]]] = []

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int, exclusive: bool) -> AsyncIterator[None]:
        while True:
            blockers = [
                fut
                for s, e, excl, fut in self._held
                if s < end and start < e and (excl or exclusive)
            ]
            if not blockers:
                break
            await asyncio.wait(blockers)
        entry = (start, end, exclusive, asyncio.get_running_loop().create_future())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[3].set_result(None)
