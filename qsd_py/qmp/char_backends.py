"""The chardev backends chardev-add builds, one small class each, as QEMU 11.1's daemon does.

qemu-storage-daemon has no device front ends: the only user a chardev can have is a monitor
(``--monitor``), a mux or a hub.  So no backend here forwards input anywhere, and nothing
writes output to one except ``ringbuf-write``; a backend's job is to hold what it opened (a
file, a pty, a socket and its client) until it is removed, and to describe itself in
``query-chardev`` with QEMU's ``filename`` notation.

A logfile is created (or appended to) when the chardev is made, as QEMU does, and stays
empty: QEMU's ringbuf-write stores into the ring directly and does not log, and no other
output reaches these chardevs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import termios
import tty
from typing import Any

from qsd_py import sockets
from qsd_py.errors import QMPError

log = logging.getLogger("qsd_py.qmp")

#: query-chardev-backends: what the daemon builds, in QEMU 11.1's (type registration) order.
BACKEND_NAMES = (
    "hub", "serial", "mux", "pipe", "parallel", "null", "ringbuf",
    "socket", "stdio", "memory", "udp", "file", "pty",
)  # fmt: skip

RINGBUF_DEFAULT_SIZE = 65536
MAX_HUB = 4  # QEMU's limit of a hub's chardevs
PPCLAIM = 0x708B  # _IO('p', 0x8b): claim a parallel port (ppdev)


def _open(path: str, flags: int, verb: str = "open") -> int:
    """``open(2)`` with QEMU's ``Could not open 'PATH': strerror`` on failure."""
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise QMPError(f"Could not {verb} '{path}': {os.strerror(err.errno or errno.EIO)}") from err


def _flag(data: dict[str, Any], key: str) -> bool:
    return bool(data.get(key, False))


class Backend:
    """A chardev: its id, what ``query-chardev`` says, and who uses it (``user``)."""

    filename = "null"

    def __init__(self, chardev_id: str, data: dict[str, Any]) -> None:
        self.id = chardev_id
        self.data = data
        self.user: str | None = None  # "monitor", or the id of the mux/hub that holds it
        self.frontend_open = False
        self._fds: list[int] = []

    async def open(self, registry: Any) -> dict[str, Any]:
        """Open what the backend needs; the reply of chardev-add (``{}`` or ``{"pty": ...}``)."""
        logfile = self.data.get("logfile")
        if logfile is not None:
            mode = os.O_APPEND if _flag(self.data, "logappend") else os.O_TRUNC
            self._fds.append(_open(logfile, os.O_WRONLY | os.O_CREAT | mode, "create"))
        return {}

    def describe(self) -> str:
        return self.filename

    def send_break(self) -> None:
        """Only serial lines do anything with a break (QEMU's ioctl is a no-op elsewhere)."""

    async def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class NullBackend(Backend):
    filename = "null"


class RingbufBackend(Backend):
    """``size`` bytes in memory; a write that overflows drops the oldest bytes.

    Only what is stored is kept in memory (QEMU allocates ``size`` at once), so a large size
    costs nothing until it fills.  Size 0 is accepted as by QEMU, and holds nothing.
    """

    filename = "ringbuf"

    def __init__(self, chardev_id: str, data: dict[str, Any], kind: str) -> None:
        super().__init__(chardev_id, data)
        self.filename = kind  # "ringbuf" or its old name "memory", as QEMU shows it
        self.size = data.get("size", RINGBUF_DEFAULT_SIZE)
        self.ring = bytearray()

    async def open(self, registry: Any) -> dict[str, Any]:
        if self.size & (self.size - 1):
            raise QMPError("size of ringbuf chardev must be power of two")
        return await super().open(registry)

    def write(self, data: bytes) -> None:
        self.ring += data
        if len(self.ring) > self.size:
            del self.ring[: len(self.ring) - self.size]

    def read(self, size: int) -> bytes:
        out = bytes(self.ring[:size])
        del self.ring[:size]
        return out


class FileBackend(Backend):
    filename = "file"

    async def open(self, registry: Any) -> dict[str, Any]:
        reply = await super().open(registry)
        mode = os.O_APPEND if _flag(self.data, "append") else os.O_TRUNC
        self._fds.append(_open(self.data["out"], os.O_WRONLY | os.O_CREAT | mode))
        if self.data.get("in") is not None:
            self._fds.append(_open(self.data["in"], os.O_RDONLY))
        return reply


class SerialBackend(Backend):
    """A tty device (any file QEMU would open: /dev/null works, as in QEMU)."""

    filename = "serial"

    async def open(self, registry: Any) -> dict[str, Any]:
        reply = await super().open(registry)
        self.fd = _open(self.data["device"], os.O_RDWR | os.O_NONBLOCK)
        self._fds.append(self.fd)
        return reply

    def send_break(self) -> None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsendbreak(self.fd, 0)


class PipeBackend(Backend):
    """``PATH.in`` and ``PATH.out`` if both exist, else ``PATH`` both ways (QEMU's rule)."""

    filename = "pipe"

    async def open(self, registry: Any) -> dict[str, Any]:
        reply = await super().open(registry)
        path = self.data["device"]
        pair: list[int] = []
        try:
            for end in ("in", "out"):
                pair.append(os.open(f"{path}.{end}", os.O_RDWR | os.O_CLOEXEC))
        except OSError:
            for fd in pair:
                os.close(fd)
            pair = [_open(path, os.O_RDWR)]
        self._fds += pair
        return reply


class ParallelBackend(Backend):
    filename = "parallel"

    async def open(self, registry: Any) -> dict[str, Any]:
        reply = await super().open(registry)
        fd = _open(self.data["device"], os.O_RDWR)
        self._fds.append(fd)
        try:
            fcntl.ioctl(fd, PPCLAIM)
        except OSError as err:
            raise QMPError(f"not a parallel port: {os.strerror(err.errno or errno.EIO)}") from err
        return reply


class StdioBackend(Backend):
    """The daemon's stdin/stdout; at most one at a time.  Nothing is read (no front end),
    and unlike QEMU, removing it does not close fds 0 and 1."""

    filename = "stdio"

    async def open(self, registry: Any) -> dict[str, Any]:
        if any(isinstance(c, StdioBackend) for c in registry.all() if c is not self):
            raise QMPError("cannot use stdio by multiple character devices")
        return await super().open(registry)


class PtyBackend(Backend):
    """A new pseudo-terminal in raw mode; ``path`` also gets a symlink to it, as in QEMU.

    The daemon holds the master side and, like QEMU without a front end, does not read it.
    """

    def __init__(self, chardev_id: str, data: dict[str, Any]) -> None:
        super().__init__(chardev_id, data)
        self.pty = ""
        self.link: str | None = None  # our symlink, removed with the chardev

    async def open(self, registry: Any) -> dict[str, Any]:
        reply = await super().open(registry)
        master, slave = os.openpty()
        self._fds += [master, slave]
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.pty = os.ttyname(slave)
        if "path" in self.data:
            try:
                os.symlink(self.pty, self.data["path"])
            except OSError as err:
                text = os.strerror(err.errno or errno.EIO)
                raise QMPError(f"Failed to create PTY symlink: {text}") from err
            self.link = self.data["path"]
        os.close(slave)  # the master alone keeps the pty; a client opens the slave by name
        self._fds.remove(slave)
        return {**reply, "pty": self.pty}

    def describe(self) -> str:
        return f"pty:{self.pty}"

    async def close(self) -> None:
        if self.link is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.link)
        await super().close()


class UdpBackend(Backend):
    """A datagram socket connected to ``remote`` (bound to ``local`` if given)."""

    filename = "udp"

    def __init__(self, chardev_id: str, data: dict[str, Any]) -> None:
        super().__init__(chardev_id, data)
        self.sock: socket.socket | None = None

    async def open(self, registry: Any) -> dict[str, Any]:
        reply = await super().open(registry)
        remote = sockets.flatten(self.data["remote"])
        if remote["type"] != "inet":
            raise QMPError("socket type unsupported for datagram")
        family, kind, proto, _, address = _resolve_dgram(remote["host"], remote["port"], 0)[0]
        self.sock = socket.socket(family, kind, proto)
        local = _udp_local(self.data.get("local"))
        bind_to = _resolve_dgram(local[0], local[1], family)[0][4]
        try:
            self.sock.bind(bind_to)
        except OSError as err:
            raise QMPError(f"Failed to bind socket: {os.strerror(err.errno or errno.EIO)}") from err
        try:
            self.sock.connect(address)
        except OSError as err:
            text = os.strerror(err.errno or errno.EIO)
            raise QMPError(
                f"Failed to connect to '{remote['host']}:{remote['port']}': {text}"
            ) from err
        return reply

    async def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        await super().close()


class MuxBackend(Backend):
    """Shares ``chardev`` between front ends; that chardev is busy while the mux exists."""

    filename = "mux"

    def __init__(self, chardev_id: str, data: dict[str, Any]) -> None:
        super().__init__(chardev_id, data)
        self.members: list[Any] = []  # the chardevs it holds (made busy)

    async def open(self, registry: Any) -> dict[str, Any]:
        base = registry.find(self.data["chardev"])
        if base is None:
            raise QMPError(f"mux: base chardev {self.data['chardev']} not found")
        if base.user is not None:
            raise QMPError(f"chardev '{base.id}' is already in use")
        reply = await super().open(registry)
        base.user = self.id
        self.members = [base]
        return reply

    async def close(self) -> None:
        for member in self.members:
            member.user = None
        await super().close()


class HubBackend(MuxBackend):
    """Output to every one of ``chardevs``, input from all; each is busy while the hub is."""

    filename = "hub"

    async def open(self, registry: Any) -> dict[str, Any]:
        ids = self.data["chardevs"]
        if not ids:
            raise QMPError("hub: 'chardevs' list is not defined")
        if len(ids) > MAX_HUB:
            raise QMPError(f"hub: too many uses of chardevs '{self.id}' (maximum is {MAX_HUB})")
        members: list[Backend] = []
        for member_id in ids:
            member = registry.find(member_id)
            if member is None:
                raise QMPError(f"hub: chardev can't be found by id '{member_id}'")
            if isinstance(member, MuxBackend):
                raise QMPError(
                    "hub: multiplexers and hub devices can't be stacked, check chardev "
                    f"'{member_id}', chardev should not be a hub device or have 'mux=on' enabled"
                )
            if member.user is not None or member in members:
                raise QMPError(f"chardev '{member_id}' is already in use")
            members.append(member)
        reply = await Backend.open(self, registry)
        for member in members:
            member.user = self.id
        self.members = members
        return reply


class SocketBackend(Backend):
    """A stream socket that holds one connection at a time and ignores what arrives.

    As a server it accepts the next client when the current one leaves.  As a client with
    ``reconnect-ms`` it connects again that long after the connection fails or ends.
    """

    def __init__(self, chardev_id: str, data: dict[str, Any]) -> None:
        super().__init__(chardev_id, data)
        self.server = data.get("server", True)
        self.reconnect = max(0, data.get("reconnect-ms", 0))
        self.addr = sockets.flatten(data["addr"])
        self.peer: socket.socket | None = None
        self.listener: sockets.Listener | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, registry: Any) -> dict[str, Any]:
        data = self.data
        if self.server and self.reconnect:
            raise QMPError(
                "'reconnect-ms' option is incompatible with socket in server listen mode"
            )
        if not self.server and "wait" in data:
            raise QMPError("'wait' option is incompatible with socket in client connect mode")
        self._check_protocols(registry)
        reply = await super().open(registry)
        if self.server:
            self.listener = sockets.listen(self.addr, 1)
            if _flag(data, "wait"):
                self.peer = await self.listener.accept()
        elif not self.reconnect:
            self.peer = await sockets.connect(self.addr)
        self._task = asyncio.create_task(self._run(), name=f"chardev-{self.id}")
        return reply

    def _check_protocols(self, registry: Any) -> None:
        """QEMU's checks of tls-creds, tls-authz and websocket, with its texts.  The
        protocols themselves (TLS, telnet, tn3270, websocket) are not spoken: no front end
        ever reads or writes the connection."""
        data = self.data
        if "tls-creds" in data:
            registry.objects.tls_creds(data["tls-creds"], "server" if self.server else "client")
            raise QMPError("TLS on chardevs is not supported by qsd-py")
        if "tls-authz" in data:
            raise QMPError("'tls_authz' option requires 'tls_creds' option")
        if _flag(data, "websocket") and not self.server:
            raise QMPError("Websocket client is not implemented")

    async def _next_peer(self) -> socket.socket:
        if self.listener is not None:
            return await self.listener.accept()
        reported = False
        while True:
            try:
                return await sockets.connect(self.addr)
            except QMPError as err:
                if not reported:  # once until a connection succeeds, as QEMU says it
                    print(
                        f"qsd-py: Unable to connect character device {self.id}: {err.desc}",
                        file=sys.stderr,
                        flush=True,
                    )
                    reported = True
                await asyncio.sleep(self.reconnect / 1000)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.peer is None:
                if self.listener is None and not self.reconnect:
                    return
                self.peer = await self._next_peer()
            with contextlib.suppress(OSError):
                while await loop.sock_recv(self.peer, 65536):
                    pass  # no front end: input is dropped
            self.peer.close()
            self.peer = None
            if self.listener is None:
                await asyncio.sleep(self.reconnect / 1000)

    def describe(self) -> str:
        """QEMU's notation; a TCP connection adds `` <-> PEER:PORT``.

        Unlike QEMU, which reads nothing without a front end and so notices only a hang-up
        (a UNIX peer's close, not a TCP FIN), input is read and dropped here, so the chardev
        shows ``disconnected:`` as soon as the peer has gone, on TCP too.
        """
        where = self._where()
        if self.peer is None:
            return f"disconnected:{where}"
        if self.peer.family in (socket.AF_INET, socket.AF_INET6):
            host, port = self.peer.getpeername()[:2]
            return f"{where} <-> {_bracket(host)}:{port}"
        return where

    def _where(self) -> str:
        suffix = ",server=on" if self.server else ""
        if self.addr["type"] == "inet":
            protocol = "telnet" if _flag(self.data, "telnet") else "tcp"
            protocol = "websocket" if _flag(self.data, "websocket") else protocol
            sock = self.listener.sockets[0] if self.listener is not None else self.peer
            if sock is not None:
                host, port = sock.getsockname()[:2]
                return f"{protocol}:{_bracket(host)}:{port}{suffix}"
            return f"{protocol}:{self.addr['host']}:{self.addr['port']}{suffix}"
        return f"{sockets.describe(self.addr)}{suffix}"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.peer is not None:
            self.peer.close()
        if self.listener is not None:
            self.listener.close()
        await super().close()


def _udp_local(local: dict[str, Any] | None) -> tuple[str | None, str]:
    """Where a UDP chardev binds: any address by default.  QEMU reads a non-inet ``local``
    as if it were inet, so a UNIX path is looked up as a host name (and fails as there)."""
    if local is None:
        return None, "0"
    data = local["data"]
    if local["type"] == "inet":
        return data["host"], data["port"]
    return data.get("path", ""), "0"


def _resolve_dgram(host: str | None, port: str, family: int) -> list[Any]:
    """``getaddrinfo`` for a datagram socket, with QEMU's text on failure."""
    try:
        return socket.getaddrinfo(
            host, port, family, socket.SOCK_DGRAM, flags=socket.AI_PASSIVE if host is None else 0
        )
    except socket.gaierror as err:
        raise QMPError(f"address resolution failed for {host}:{port}: {err.strerror}") from err


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_CLASSES: dict[str, type[Backend]] = {
    "null": NullBackend,
    "file": FileBackend,
    "serial": SerialBackend,
    "pipe": PipeBackend,
    "parallel": ParallelBackend,
    "stdio": StdioBackend,
    "pty": PtyBackend,
    "udp": UdpBackend,
    "mux": MuxBackend,
    "hub": HubBackend,
    "socket": SocketBackend,
}


def make_backend(chardev_id: str, backend: dict[str, Any]) -> Backend:
    """The (not yet opened) backend a ``ChardevBackend`` value describes."""
    kind, data = backend["type"], backend.get("data", {})
    if kind in ("ringbuf", "memory"):
        return RingbufBackend(chardev_id, data, kind)
    cls = _CLASSES.get(kind)
    if cls is None:
        raise QMPError(f"'{kind}' is not a valid char driver name")
    return cls(chardev_id, data)


_CLI_COMMON = ("logfile", "logappend", "logtimestamp")


def cli_backend(opts: dict[str, Any]) -> dict[str, Any]:
    """The ``ChardevBackend`` of a non-socket ``--chardev`` (QemuOpts' flat keys)."""
    kind = opts["backend"]
    data = {key: opts[key] for key in _CLI_COMMON if key in opts}
    if kind in ("ringbuf", "memory") and "size" in opts:
        data["size"] = opts["size"]
    if kind == "file":
        if "path" not in opts:
            raise QMPError("chardev: file: no filename given")
        data["out"] = opts["path"]
        if "input-path" in opts:
            data["in"] = opts["input-path"]
        if "append" in opts:
            data["append"] = opts["append"]
    return {"type": kind, "data": data}
