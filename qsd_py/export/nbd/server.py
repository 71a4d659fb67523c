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
import os
import socket
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.export.nbd.connection import Connection
from qsd_py.export.nbd.listener import open_listeners, tune_client

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon
    from qsd_py.export.nbd.export import NbdExport

log = logging.getLogger("qsd_py.export.nbd")

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
        self.tls: Any = None  # the TLS credentials object, when tls-creds is given
        self.listeners: list[socket.socket] = []
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
        self.listeners = open_listeners(self.addr, self.from_monitor)
        try:
            if self.tls_creds_id is not None:
                self.tls = self._tls_credentials(self.tls_creds_id)
        except BaseException:
            self._close_listeners()
            raise
        self._update_watch()

    def _tls_credentials(self, creds_id: str) -> Any:
        try:
            self.daemon.objects.iothread(creds_id)
        except QMPError as err:
            raise QMPError(f"No TLS credentials with id '{creds_id}'") from err
        raise QMPError(f"Object with id '{creds_id}' is not TLS credentials")

    async def close(self) -> None:
        """Stop listening and hang up on every client (exports are deleted by the caller)."""
        self._close_listeners()
        connections = list(self.connections)
        for conn in connections:
            conn.close()
        if connections:
            await asyncio.gather(*(conn.closed for conn in connections))

    def _close_listeners(self) -> None:
        self._watching = False
        for sock in self.listeners:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            path = _unix_path(sock)
            sock.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self.listeners = []

    # --- accepting ----------------------------------------------------------------------------
    def _full(self) -> bool:
        return bool(self.max_connections) and len(self.connections) >= self.max_connections

    def _update_watch(self) -> None:
        """Watch the listeners while below max-connections, not beyond."""
        want = bool(self.listeners) and not self._full()
        if want == self._watching:
            return
        self._watching = want
        for sock in self.listeners:
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


def _unix_path(sock: socket.socket) -> str | None:
    """The file a listening UNIX socket was bound to (removed when the server stops)."""
    if sock.family != socket.AF_UNIX:
        return None
    with contextlib.suppress(OSError):
        name = sock.getsockname()
        if isinstance(name, str) and name and not name.startswith("\0"):
            return name
    return None


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
    for export in list(daemon.exports):
        if export.type == "nbd":
            await daemon.exports.finish_deleting(export)
    daemon.nbd_server = None
    await server.close()
