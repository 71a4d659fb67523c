"""Socket chardevs as QEMU's ``--chardev socket,...``, carrying QMP monitors.

``server=on`` listens (on a UNIX socket, created mode 0600 so only our user can talk to
the daemon, or on TCP with ``host=``/``port=``) and serves one client at a time, as QEMU's
socket chardev does: a second client is accepted by the kernel but waits, unanswered, until
the first one leaves.  With ``wait=on`` (the default for a server) the daemon waits for the
first client before it goes on with the command line.  Without ``server=on`` the daemon
connects to the socket itself: QEMU's iotests listen and let the daemon come to them.

Listening and connecting are :mod:`qsd_py.sockets`' (shared with the NBD server and client):
a stale socket file at the path is replaced, as QEMU does; unlike QEMU, any other kind of
file there is left alone and the bind fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from typing import Any

from qsd_py import sockets
from qsd_py.errors import QMPError
from qsd_py.qmp.protocol import QMPSession

log = logging.getLogger("qsd_py.qmp")

LISTEN_BACKLOG = 8


def _flag(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value == "on"
    return bool(value)


class Chardev:
    """A chardev that a monitor can be attached to (one monitor per chardev, as QEMU)."""

    filename = "socket"

    def __init__(self, chardev_id: str, where: str) -> None:
        self.id = chardev_id
        self.where = where  # QEMU's notation: "unix:PATH,server=on", "tcp:HOST:PORT"
        self.in_use = False
        self.user: str | None = None  # "monitor", or the mux/hub holding it (chardev-remove)
        self.closing = False
        self.session: QMPSession | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def frontend_open(self) -> bool:
        return self.in_use

    def describe(self) -> str:
        """query-chardev's filename: the address, ``disconnected:`` while no client is on."""
        return self.where if self.session is not None else f"disconnected:{self.where}"

    def send_break(self) -> None:
        """A break means nothing to a socket."""

    def attach(self, daemon: Any, pretty: bool) -> None:
        self.in_use = True
        self.user = "monitor"
        self._task = asyncio.create_task(self._run(daemon, pretty), name=f"chardev-{self.id}")

    async def _run(self, daemon: Any, pretty: bool) -> None:
        raise NotImplementedError

    async def _serve(self, daemon: Any, sock: socket.socket, pretty: bool) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        self.session = QMPSession(daemon, reader, writer, pretty)
        try:
            await self.session.serve()
        except Exception:  # noqa: BLE001 - one broken session must not stop the chardev
            log.exception("QMP session on chardev %s failed", self.id)
        finally:
            self.session = None

    async def close(self) -> None:
        """Flush and close the current client, stop serving, release the socket."""
        self.closing = True
        if self.session is not None:
            await self.session.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class ServerChardev(Chardev):
    """``server=on``: a listening socket, one client at a time."""

    def __init__(self, chardev_id: str, where: str, listener: sockets.Listener) -> None:
        super().__init__(chardev_id, f"{where},server=on")
        self.listener = listener
        self._first: socket.socket | None = None

    async def wait_for_client(self, daemon: Any, description: str) -> None:
        """``wait=on``: hold the command line until a client is there, saying so like QEMU.

        Unlike QEMU, a shutdown request (SIGTERM) ends the wait: the daemon then goes
        through the rest of its start-up straight into shutdown.
        """
        print(
            f"qsd-py: info: QEMU waiting for connection on: {description},server=on",
            file=sys.stderr,
            flush=True,
        )
        accept = asyncio.ensure_future(self.listener.accept())
        waits: set[asyncio.Future[Any]] = {accept}
        shutdown = getattr(daemon, "shutdown_event", None)
        if shutdown is not None:
            waits.add(asyncio.ensure_future(shutdown.wait()))
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
        if accept in done:
            self._first = accept.result()

    async def _run(self, daemon: Any, pretty: bool) -> None:
        while not self.closing:
            sock, self._first = self._first, None
            if sock is None:
                sock = await self.listener.accept()
            await self._serve(daemon, sock, pretty)

    async def close(self) -> None:
        await super().close()
        if self._first is not None:
            self._first.close()
        self.listener.close()  # removes our socket file, not one a successor bound there


class ClientChardev(Chardev):
    """Without ``server=on``: the daemon connected out to a listening client."""

    def __init__(self, chardev_id: str, where: str, sock: socket.socket) -> None:
        super().__init__(chardev_id, where)
        self.sock = sock

    async def _run(self, daemon: Any, pretty: bool) -> None:
        await self._serve(daemon, self.sock, pretty)

    async def close(self) -> None:
        await super().close()
        self.sock.close()


# --- creation ------------------------------------------------------------------------------
def _address(path: str | None, host: str | None, port: str | None) -> dict[str, Any]:
    """The chardev's ``path`` or ``host``/``port`` as a flat ``SocketAddress``."""
    if path is not None:
        return {"type": "unix", "path": path}
    return {"type": "inet", "host": host, "port": port}


def _check_options(opts: dict[str, Any]) -> None:
    """QEMU's checks of a socket chardev's options, with its texts."""
    backend = opts.get("backend")
    if backend != "socket":
        raise QMPError(f"'{backend}' is not a valid char driver name")
    path, host = opts.get("path"), opts.get("host")
    if path is not None and host is not None:
        raise QMPError("None or one of 'path', 'fd' or 'host' option required.")
    if path is None and host is None:
        raise QMPError("Unable to parse FD number ")
    if not _flag(opts.get("server"), False) and opts.get("wait") is not None:
        raise QMPError("'wait' option is incompatible with socket in client connect mode")
    if host is not None and opts.get("port") is None:
        raise QMPError("chardev: socket: no port given")


async def create_chardev(daemon: Any, opts: dict[str, Any]) -> Chardev:
    """Create the chardev ``opts`` describes (keys id, backend, path, server, wait, host, port).

    Raises :class:`QMPError` with QEMU's text.  The chardev is closed by ``daemon.close()``,
    which also removes a listening socket's file.
    """
    _check_options(opts)
    path, host = opts.get("path"), opts.get("host")
    port = None if opts.get("port") is None else str(opts["port"])
    address = _address(path, host, port)
    chardev: Chardev
    where = f"unix:{path}" if path is not None else f"tcp:{host}:{port}"
    if _flag(opts.get("server"), False):
        listener = sockets.listen(address, LISTEN_BACKLOG, private=True)
        chardev = ServerChardev(opts["id"], where, listener)
        daemon.closers.append(chardev.close)
        if _flag(opts.get("wait"), True):
            await chardev.wait_for_client(daemon, f"disconnected:{where}")
    else:
        chardev = ClientChardev(opts["id"], where, await sockets.connect(address))
        daemon.closers.append(chardev.close)
    return chardev


class StdioMonitor:
    """QMP on the daemon's stdin and stdout (``--chardev stdio`` under ``--monitor``), the
    way QEMU's shell iotests drive a daemon: requests piped in, replies and events piped
    out. stdin is read by a thread (it may be a pipe, a terminal or a file: a here-document);
    at its end the session ends and the daemon goes on, as QEMU's does. stdout may be a
    pipe, a terminal or a file."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.session: QMPSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._serving = False

    async def start(self, daemon: Any, pretty: bool) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        threading.Thread(target=_pump_stdin, args=(loop, reader), daemon=True).start()
        protocol = asyncio.streams.FlowControlMixin()
        transport: asyncio.BaseTransport
        try:
            transport, _ = await loop.connect_write_pipe(
                lambda: protocol, os.fdopen(os.dup(1), "wb")
            )
        except ValueError:  # a regular file: written in place, it never blocks for long
            transport = _FileTransport(1)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)  # type: ignore[arg-type]
        self.session = QMPSession(daemon, reader, writer, pretty)
        self.session.greet()  # at once, as QEMU's: before a later option can fail
        self._task = asyncio.create_task(self._serve(daemon), name="chardev-stdio")
        daemon.closers.append(self.close)

    async def _serve(self, daemon: Any) -> None:
        """From when the whole command line is set up (``daemon.started``): stdin may be at
        its end long before, and a session whose input ended drops what it had not run."""
        await daemon.started.wait()
        assert self.session is not None
        self._serving = True
        await self.session.serve(greet=False)

    async def close(self) -> None:
        """End the session; one still waiting for the command line (a later option failed,
        the daemon exits) is cancelled: it would wait for ``started`` forever."""
        if self._task is not None and not self._serving:
            self._task.cancel()
        if self.session is not None:
            await self.session.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class _FileTransport(asyncio.WriteTransport):
    """Writes to an fd that is a regular file (no event loop can wait on those)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._closing = False

    def write(self, data: Any) -> None:
        view = memoryview(data)
        while view and not self._closing:
            try:
                view = view[os.write(self._fd, view) :]
            except OSError:
                self._closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True


def _pump_stdin(loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> None:
    """In a thread: stdin's bytes into ``reader`` until its end (then EOF)."""
    while True:
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        try:
            if not data:
                loop.call_soon_threadsafe(reader.feed_eof)
                return
            loop.call_soon_threadsafe(reader.feed_data, data)
        except RuntimeError:  # the loop is closed: the daemon is gone
            return


async def add_monitor(daemon: Any, chardev: Chardev, pretty: bool) -> None:
    """Serve QMP on ``chardev`` (``--monitor chardev=X[,pretty=on]``)."""
    if getattr(chardev, "filename", None) == "stdio" and not isinstance(chardev, Chardev):
        if chardev.user is not None:
            raise QMPError(f"chardev '{chardev.id}' is already in use")
        chardev.user = "monitor"
        chardev.frontend_open = True
        await StdioMonitor(chardev).start(daemon, pretty)
        return
    if not isinstance(chardev, Chardev):
        raise QMPError(f"chardev '{chardev.id}' is no socket: qsd-py serves QMP on sockets only")
    if chardev.user is not None:
        raise QMPError(f"chardev '{chardev.id}' is already in use")
    chardev.attach(daemon, pretty)
