"""One NBD client connection on an asyncio loop: the socket, TLS, and the engine's events.

:func:`connect` opens a stream to a QAPI ``SocketAddress`` (qsd_py/sockets.py), runs the
:class:`~qsd_py.nbd.client.Handshake` over it (upgrading to TLS when the engine asks), and
hands the transport to an :class:`NbdConnection`, an ``asyncio.BufferedProtocol`` that lets
the :class:`~qsd_py.nbd.client.Transmission` place read payloads straight into callers'
buffers. Reconnecting is the session's business (session.py), not this module's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qsd_py import sockets
from qsd_py.errors import QMPError
from qsd_py.nbd.client import (
    NEED_DATA,
    START_TLS,
    ExportInfo,
    Handshake,
    ProtocolError,
    Request,
    Transmission,
)
from qsd_py.nbd.constants import Cmd

#: Requests one connection keeps in flight; more wait (bounds the memory of queued writes).
MAX_IN_FLIGHT = 64
#: Requests of one loop iteration go out in one send; payloads larger than this are sent
#: from the caller's buffer instead of being copied into the batch.
BATCH_PAYLOAD_MAX = 64 * 1024
READ_CHUNK = 64 * 1024


class ConnectError(Exception):
    """Connecting or negotiating failed; the text is what blockdev-add reports."""


class ConnectionLost(OSError):
    """The connection broke before the request's reply arrived (it may be sent again on
    another connection). ``protocol`` tells a server that broke the protocol from one
    that went away."""

    def __init__(self, reason: str, protocol: bool = False) -> None:
        super().__init__(errno.EIO, reason)
        self.protocol = protocol


# --- sockets --------------------------------------------------------------------------------
async def open_stream(addr: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a ``SocketAddress`` through the daemon's socket layer (QEMU's texts)."""
    try:
        sock = await sockets.connect(addr)
    except QMPError as err:
        raise ConnectError(err.desc) from err
    try:
        return await asyncio.open_connection(sock=sock)
    except OSError:
        sock.close()
        raise


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


# --- handshake ------------------------------------------------------------------------------
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the one verification failure QEMU words apart.
_HOSTNAME_MISMATCH = 62


@dataclass(frozen=True)
class TlsSetup:
    """What STARTTLS needs: the client context of a TLS credentials object, and the name
    the server's certificate must carry. ``server_hostname()`` may refuse (QMPError: no
    name to check a certificate against); it is asked at the handshake, as QEMU does."""

    context: ssl.SSLContext
    server_hostname: Callable[[], str | None]


async def _start_tls(writer: asyncio.StreamWriter, tls: TlsSetup) -> None:
    """Upgrade the stream; failures with QEMU's (GnuTLS's) texts where Python's ssl
    can tell them apart."""
    try:
        hostname = tls.server_hostname()
    except QMPError as err:
        raise ConnectError(err.desc) from err
    try:
        await writer.start_tls(tls.context, server_hostname=hostname)
    except ssl.SSLCertVerificationError as err:
        if err.verify_code == _HOSTNAME_MISMATCH:
            raise ConnectError(f"Certificate does not match the hostname {hostname}") from err
        raise ConnectError("The certificate is not trusted") from err
    except ssl.SSLError as err:
        raise ConnectError(f"TLS handshake failed: {err.reason or err}") from err


async def negotiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hs: Handshake,
    tls: TlsSetup | None,
) -> ExportInfo:
    """Run ``hs`` over the stream until the export is negotiated."""
    while True:
        try:
            event = hs.next_event()
        except ProtocolError:
            writer.write(hs.data_to_send())  # the polite abort, if any
            raise
        out = hs.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        if event is NEED_DATA:
            hs.receive_data(await reader.read(READ_CHUNK))
        elif event is START_TLS:
            assert tls is not None
            await _start_tls(writer, tls)
            hs.tls_started()
        else:
            assert isinstance(event, ExportInfo)
            return event


async def connect(
    addr: dict[str, Any],
    export: str,
    *,
    tls: TlsSetup | None = None,
    meta_contexts: Sequence[str] = (),
) -> NbdConnection:
    """A negotiated connection to ``export`` at ``addr``. Failures raise
    :class:`ConnectError` (socket, TLS) or :class:`ProtocolError` (negotiation)."""
    reader, writer = await open_stream(addr)
    hs = Handshake(export, tls=tls is not None, meta_contexts=meta_contexts)
    try:
        info = await negotiate(reader, writer, hs, tls)
    except ssl.SSLError as err:  # after the handshake: the TLS stream broke
        writer.close()
        raise ConnectError(f"TLS handshake failed: {err.reason or err}") from err
    except OSError as err:
        writer.close()
        raise ConnectError(f"Failed to read data: {_strerror(err)}") from err
    except BaseException:
        writer.close()
        raise
    conn = NbdConnection(Transmission(info))
    conn.stream_writer = writer  # its __del__ would close the transport
    transport = writer.transport
    transport.set_protocol(conn)
    conn.connection_made(transport)
    trailing = hs.trailing_data()
    if trailing:
        conn.feed(trailing)
    return conn


# --- transmission ---------------------------------------------------------------------------
class NbdConnection(asyncio.BufferedProtocol):
    """Requests out, replies in, on the loop that made the connection."""

    def __init__(self, engine: Transmission) -> None:
        self.engine = engine
        self.info = engine.info
        self.transport: asyncio.Transport | None = None
        self.stream_writer: asyncio.StreamWriter | None = None  # of the handshake
        self.lost: ConnectionLost | None = None  # why the connection is over, once it is
        self._waiters: dict[int, asyncio.Future[Request]] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self._batch = bytearray()  # requests waiting for the end of the loop iteration

    # --- the caller's side ----------------------------------------------------------------
    async def submit(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        buf: memoryview | None = None,
        payload: memoryview | bytes | None = None,
    ) -> Request:
        """Send one request and wait for its reply; raises :class:`ConnectionLost` if the
        connection breaks first."""
        async with self._slots:
            await self._can_write.wait()
            if self.lost is not None:
                raise self.lost
            req, header = self.engine.request(cmd, offset, length, flags, buf)
            fut = asyncio.get_running_loop().create_future()
            self._waiters[req.cookie] = fut
            self._queue(header, payload)
            try:
                return await fut
            except asyncio.CancelledError:
                self.engine.abandon(req)
                raise
            finally:
                self._waiters.pop(req.cookie, None)

    def _queue(self, header: bytes, payload: memoryview | bytes | None) -> None:
        """Send a request: batched with the others of this loop iteration (one send for
        many small requests), large payloads straight from the caller's buffer."""
        assert self.transport is not None
        if payload is not None and len(payload) > BATCH_PAYLOAD_MAX:
            self._flush()
            self.transport.write(header)
            self.transport.write(payload)
            return
        if not self._batch:
            self._loop.call_soon(self._flush)
        self._batch += header
        if payload is not None:
            self._batch += payload

    def _flush(self) -> None:
        if self._batch and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._batch)
        self._batch = bytearray()

    def disconnect(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close; requests in flight fail."""
        if self.lost is None and self.transport is not None:
            _, header = self.engine.request(Cmd.DISC, 0, 0)
            self._batch += header
            self._flush()
        self.close("connection closed by the client")

    def close(self, reason: str) -> None:
        self._fail(ConnectionLost(reason))
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> ConnectionLost:
        """Return (the reason) once the connection is over."""
        return await asyncio.shield(self._closed)

    def feed(self, data: bytes) -> None:
        """Bytes that arrived before this protocol took over the transport."""
        try:
            self.engine.receive_data(data)
        except ProtocolError as err:
            self._protocol_error(err)
            return
        self._deliver()

    # --- asyncio's side -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.engine.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.engine.buffer_updated(nbytes)
        except ProtocolError as err:
            self._protocol_error(err)
            return
        self._deliver()

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "connection lost" if exc is None else f"connection lost: {exc}"
        self._fail(ConnectionLost(reason))
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- internals ------------------------------------------------------------------------
    def _deliver(self) -> None:
        while True:
            req = self.engine.next_event()
            if not isinstance(req, Request):
                return
            fut = self._waiters.get(req.cookie)
            if fut is not None and not fut.done():
                fut.set_result(req)

    def _protocol_error(self, err: ProtocolError) -> None:
        self._fail(ConnectionLost(f"protocol error: {err}", protocol=True))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, lost: ConnectionLost) -> None:
        """End the connection: every waiter gets ``lost`` (the first reason stays)."""
        if self.lost is None:
            self.lost = lost
            self._closed.set_result(lost)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(self.lost)
        self._waiters.clear()
        self._can_write.set()
