"""The daemon's NBD server: ``nbd-server-start`` / ``--nbd-server`` and ``nbd-server-stop``.

One per daemon, as in QEMU. It owns the listening sockets, the NBD exports by name (the
protocol engine's :class:`~qsd_py.nbd.server.ExportCatalog`) and every client connection,
negotiating or not. At ``max-connections`` it stops accepting: further clients wait in the
listen backlog until one leaves, as QEMU's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any

from qsd_py import sockets
from qsd_py.errors import QMPError
from qsd_py.export.nbd.connection import Connection

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon
    from qsd_py.export.nbd.export import NbdExport
    from qsd_py.objects.authz import Authz
    from qsd_py.objects.tls_creds import TlsCreds

log = logging.getLogger("qsd_py.export.nbd")

BACKLOG = socket.SOMAXCONN  # QEMU's: the server is persistent, clients may queue
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_HANDSHAKE_MAX_SECONDS = 10


class NbdServer:
    """Listening sockets, exports by name, connections."""

    def __init__(self, daemon: Daemon, opts: dict[str, Any], from_monitor: bool) -> None:
        self.daemon = daemon
        self.from_monitor = from_monitor
        self.addr: dict[str, Any] = opts["addr"]
        self.tls_creds_id: str | None = opts.get("tls-creds")
        self.tls_authz_id: str | None = opts.get("tls-authz")
        self.max_connections: int = opts.get("max-connections", DEFAULT_MAX_CONNECTIONS)
        self.handshake_max_seconds: int = opts.get(
            "handshake-max-seconds", DEFAULT_HANDSHAKE_MAX_SECONDS
        )
        self.tls: TlsCreds | None = None  # with tls-creds: every client must STARTTLS
        self.authz: Authz | None = None  # with tls-authz: who may, by certificate name
        self.listener: sockets.Listener | None = None
        self.connections: set[Connection] = set()
        self._exports: dict[str, NbdExport] = {}
        self._watching = False
        self._loop = asyncio.get_running_loop()

    # --- the engine's catalog -------------------------------------------------------------------
    def find(self, name: str) -> NbdExport | None:
        return self._exports.get(name)

    def listing(self) -> list[NbdExport]:
        """Exports in the order they were added (NBD_OPT_LIST)."""
        return list(self._exports.values())

    def add_export(self, export: NbdExport) -> None:
        self._exports[export.name] = export

    def remove_export(self, export: NbdExport) -> None:
        if self._exports.get(export.name) is export:
            del self._exports[export.name]

    # --- start and stop -----------------------------------------------------------------------
    async def start(self) -> None:
        """Listen (QEMU's order: the address first, then the credentials)."""
        self._load_ring_io()
        self.listener = sockets.listen(self.addr, BACKLOG, cli=not self.from_monitor)
        try:
            if self.tls_creds_id is not None:
                self.tls = self.daemon.objects.tls_creds(self.tls_creds_id, "server")
                self.tls.server_context()  # built now: a bad file fails the start, not a client
        except BaseException:
            self._close_listeners()
            raise
        self._update_watch()

    def _load_ring_io(self) -> None:
        """Before listening, when a file node exists: load the io_uring backend that the
        connections' fast road takes for files (~25 ms of imports, which a client
        connecting as soon as the socket listens would wait for; exports make their loop's
        ring when they start)."""
        from qsd_py.block import aio
        from qsd_py.block.drivers.file import FileNode

        if any(isinstance(node, FileNode) for node in self.daemon.graph):
            aio.get_backend("io_uring")

    def resolve_authz(self) -> Authz | None:
        """The ``tls-authz`` object, looked up when a client needs it (QEMU accepts an id
        that does not exist yet at start)."""
        if self.tls_authz_id is None:
            return None
        return self.daemon.objects.authz(self.tls_authz_id)

    async def close(self) -> None:
        """Stop listening and hang up on every client (exports are deleted by the caller)."""
        self._close_listeners()
        connections = list(self.connections)
        for conn in connections:
            conn.close()
        if connections:
            await asyncio.gather(*(conn.closed for conn in connections))

    def _close_listeners(self) -> None:
        if self.listener is None:
            return
        if self._watching:
            for sock in self.listener.sockets:
                self._loop.remove_reader(sock.fileno())
            self._watching = False
        self.listener.close()
        self.listener = None

    # --- accepting ----------------------------------------------------------------------------
    def _full(self) -> bool:
        return bool(self.max_connections) and len(self.connections) >= self.max_connections

    def _update_watch(self) -> None:
        """Watch the listeners while below max-connections, not beyond."""
        want = self.listener is not None and not self._full()
        if want == self._watching or self.listener is None:
            return
        self._watching = want
        for sock in self.listener.sockets:
            if want:
                self._loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        while self._watching and not self._full():
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:  # e.g. EMFILE: try again on the next readiness
                log.warning("NBD server: accept failed: %s", err)
                break
            tune_client(sock)
            conn = Connection(self, sock)
            self.connections.add(conn)
            conn.start()
        self._update_watch()

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._update_watch()


def tune_client(sock: socket.socket) -> None:
    """As QEMU does for NBD clients: no Nagle delay on TCP; a 2 MiB send buffer on UNIX
    sockets (replies of big reads go out in fewer, larger writes)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)


async def start_server(daemon: Daemon, opts: dict[str, Any], from_monitor: bool) -> None:
    """``nbd-server-start`` and ``--nbd-server`` (``opts['addr']`` a flat SocketAddress)."""
    if daemon.nbd_server is not None:
        raise QMPError("NBD server already running")
    server = NbdServer(daemon, opts, from_monitor)
    await server.start()
    daemon.nbd_server = server


async def stop_server(daemon: Daemon) -> None:
    """``nbd-server-stop``: every NBD export is deleted (with its event), then the server
    stops listening and hangs up on the clients still negotiating."""
    server = daemon.nbd_server
    if server is None:
        raise QMPError("NBD server not running")
    await daemon.exports.delete_all_of_type("nbd")
    daemon.nbd_server = None
    await server.close()
