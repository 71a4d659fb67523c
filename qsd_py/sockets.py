"""Listening on and connecting to a QAPI ``SocketAddress``, as QEMU's socket layer does.

The QMP chardevs, the NBD server and the NBD client driver all reach the network through
this module, so a path, a port or a file descriptor is handled (and refused, with QEMU 11.1's
texts) the same way everywhere. Addresses are the flat ``SocketAddress`` dicts of
``qapi/sockets.json`` (``{"type": "unix", "path": ...}``); :func:`flatten` turns the older
``SocketAddressLegacy`` (``{"type": "unix", "data": {...}}``, nbd-server-start's form) into
one.

* :func:`listen` is synchronous (binding never waits) and returns a :class:`Listener`: a TCP
  name may resolve to several addresses (``localhost``: 127.0.0.1 and ::1) and, as QEMU does,
  one socket listens on each that can be bound; the start fails only if none can.
  ``await listener.accept()`` takes the next client from any of them, or serve each of
  ``listener.sockets`` with asyncio yourself. ``listener.close()`` closes them and removes the
  UNIX socket file it created.
* ``await connect(addr)`` returns a connected, non-blocking socket.

``fd`` addresses name a socket the daemon already holds. On the command line that is its
number (inherited from the parent); from a QMP command it would be a name given with
``getfd``, which qemu-storage-daemon does not offer ("only QEMU supports file descriptor
passing", QEMU 11.1's answer to any fd address over QMP). Which of the two applies is the
``cli`` argument, or when it is None, :data:`ON_COMMAND_LINE`, which :meth:`Daemon.execute`
sets for the command a start-up option runs.

Unlike QEMU, a file at a UNIX socket path is replaced only when it is a socket: deleting a
user's file over a typo in a path is worse than an error (``Address already in use``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import os
import socket
import stat
from collections import deque
from typing import Any

from qsd_py.errors import QMPError

# True while a start-up option (rather than a QMP command) is being applied: ``fd`` addresses
# are then numbers, not getfd names.
ON_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qsd_py_on_command_line", default=False
)

UNIX_PATH_MAX = 108  # sizeof(sun_path) on Linux
IPPROTO_MPTCP = 262


def flatten(legacy: dict[str, Any]) -> dict[str, Any]:
    """``SocketAddressLegacy`` (the address one level down in ``data``) as a ``SocketAddress``."""
    return {"type": legacy["type"], **legacy["data"]}


def describe(addr: dict[str, Any]) -> str:
    """The address as QEMU writes it in messages (``unix:/p``, ``tcp:h:p``, ``fd:3``...)."""
    kind = addr["type"]
    if kind == "inet":
        return f"tcp:{addr['host']}:{addr['port']}"
    if kind == "unix":
        return f"unix:{addr['path']}"
    if kind == "fd":
        return f"fd:{addr['str']}"
    return f"vsock:{addr['cid']}:{addr['port']}"


def _fail(text: str, err: OSError | None = None) -> QMPError:
    """QEMU's ``error_setg_errno`` form: ``text: strerror``."""
    if err is None:
        return QMPError(text)
    return QMPError(f"{text}: {os.strerror(err.errno or errno.EIO)}")


# --- listening -----------------------------------------------------------------------------
class Listener:
    """The listening sockets of one address, closed (and its socket file removed) together."""

    def __init__(self, sockets: list[socket.socket], unix_path: str | None = None) -> None:
        self.sockets = sockets
        for sock in sockets:
            sock.setblocking(False)
        self.unix_path = unix_path
        self._inode = os.stat(unix_path).st_ino if unix_path else None
        self._ready: deque[socket.socket] = deque()

    async def accept(self) -> socket.socket:
        """The next client of any of the sockets (non-blocking, as asyncio wants it)."""
        if self._ready:
            return self._ready.popleft()
        loop = asyncio.get_running_loop()
        if len(self.sockets) == 1:
            sock, _ = await loop.sock_accept(self.sockets[0])
            return sock
        waits = [asyncio.ensure_future(loop.sock_accept(s)) for s in self.sockets]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        for wait in waits:  # two may have completed at once: keep the second for later
            if wait.done() and not wait.cancelled() and wait.exception() is None:
                self._ready.append(wait.result()[0])
        if not self._ready:
            raise next(w.exception() for w in waits if w.done() and not w.cancelled())  # type: ignore[misc]
        return self._ready.popleft()

    def close(self) -> None:
        """Close every socket and remove our socket file (not one bound there since)."""
        for sock in self._ready:
            sock.close()
        self._ready.clear()
        for sock in self.sockets:
            sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.unix_path).st_ino == self._inode:
                    os.unlink(self.unix_path)
            self.unix_path = None


def listen(
    addr: dict[str, Any], backlog: int, *, private: bool = False, cli: bool | None = None
) -> Listener:
    """Listen on ``addr`` (a flat ``SocketAddress``) with QEMU's checks and texts.

    ``private``: a UNIX socket file is created mode 0600 (QMP monitors) instead of after the
    umask (QEMU's NBD server). ``cli``: see the module text. Raises :class:`QMPError`.
    """
    kind = addr["type"]
    if kind == "unix":
        return _listen_unix(addr, backlog, private)
    if kind == "inet":
        return Listener(_listen_inet(addr, backlog))
    if kind == "fd":
        return Listener([_listen_fd(addr["str"], backlog, cli)])
    return Listener([_listen_vsock(addr, backlog)])


def _unix_address(addr: dict[str, Any]) -> str:
    """The ``sun_path`` for ``addr``: a path, or a name in Linux's abstract namespace."""
    path = addr["path"]
    abstract = bool(addr.get("abstract", False))
    limit = UNIX_PATH_MAX - 1 if abstract else UNIX_PATH_MAX
    if len(path.encode()) > limit:
        raise QMPError(
            f"UNIX socket path '{path}' is too long",
            hint=f"Path must be less than {limit} bytes",
        )
    if not abstract:
        return str(path)
    if addr.get("tight", True):
        return "\0" + path
    return ("\0" + path).ljust(UNIX_PATH_MAX, "\0")  # the whole sun_path, NUL-padded


def _listen_unix(addr: dict[str, Any], backlog: int, private: bool) -> Listener:
    abstract = bool(addr.get("abstract", False))
    if not addr["path"] and not abstract:
        # QEMU picks a fresh name in the temporary directory for an empty path.
        import tempfile  # only here: it costs milliseconds at start-up

        fd, temp = tempfile.mkstemp(prefix="qemu-socket-")
        os.close(fd)
        os.unlink(temp)  # only the name was wanted
        addr = {**addr, "path": temp}
    name = _unix_address(addr)
    path = None if abstract else name
    if path is not None:
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177) if private else None
    try:
        sock.bind(name)
    except OSError as err:
        sock.close()
        raise _fail(f"Failed to bind socket to {addr['path']}", err) from err
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    try:
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise _fail("Failed to listen on socket", err) from err
    return Listener([sock], path)


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _fail(f"Failed to unlink socket {path}", err) from err


def _inet_family(addr: dict[str, Any]) -> socket.AddressFamily:
    """QEMU's choice of address family from ``ipv4``/``ipv6``."""
    ipv4, ipv6 = addr.get("ipv4"), addr.get("ipv6")
    if ipv4 is False and ipv6 is False:
        raise QMPError("Cannot disable IPv4 and IPv6 at same time")
    if ipv4 and ipv6:
        return socket.AF_INET6 if not addr["host"] else socket.AF_UNSPEC
    if ipv6 or ipv4 is False:
        return socket.AF_INET6
    if ipv4 or ipv6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _resolve(addr: dict[str, Any], flags: int) -> list[Any]:
    host, port = addr["host"], addr["port"]
    if addr.get("numeric"):
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    try:
        return socket.getaddrinfo(
            host or None, port or None, _inet_family(addr), socket.SOCK_STREAM, 0, flags
        )
    except socket.gaierror as err:
        raise QMPError(f"address resolution failed for {host}:{port}: {err.strerror}") from err


def _listen_inet(addr: dict[str, Any], backlog: int) -> list[socket.socket]:
    """One socket on every address the name resolves to that can be bound; the first
    failure is the error when none can."""
    sockets: list[socket.socket] = []
    first: QMPError | None = None
    for family, kind, proto, _, sockaddr in _resolve(addr, socket.AI_PASSIVE):
        try:
            sockets.append(_listen_inet_one(addr, backlog, (family, kind, proto), sockaddr))
        except QMPError as err:
            first = first or err
    if not sockets:
        assert first is not None
        raise first
    return sockets


def _listen_inet_one(
    addr: dict[str, Any], backlog: int, spec: tuple[Any, Any, int], sockaddr: Any
) -> socket.socket:
    """Listen on the first free port of ``port``..``to`` at one resolved address."""
    low = sockaddr[1]
    high = addr["to"] if addr.get("to") is not None else low
    # Without ipv4/ipv6, or with both, an IPv6 socket also takes IPv4 clients (when it can).
    both = (addr.get("ipv4") is None and addr.get("ipv6") is None) or bool(
        addr.get("ipv4") and addr.get("ipv6")
    )
    last: OSError | None = None
    created = False
    for port in range(low, high + 1):
        try:
            sock = socket.socket(*spec)
        except OSError as err:
            last = err
            continue
        created = True
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            _bind_inet(sock, (sockaddr[0], port, *sockaddr[2:]), both)
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE:
                raise _fail("Failed to bind socket", err) from err
            last = err
            continue
        try:
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            raise _fail("Failed to listen on socket", err) from err
        return sock
    text = "Failed to find an available port" if created else "Failed to create a socket"
    raise _fail(text, last)


def _bind_inet(sock: socket.socket, sockaddr: tuple[Any, ...], both: bool) -> None:
    """QEMU's bind: a dual-stack IPv6 bind that finds the IPv4 port taken retries IPv6-only."""
    if sock.family != socket.AF_INET6:
        sock.bind(sockaddr)
        return
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if both else 1)
    try:
        sock.bind(sockaddr)
    except OSError as err:
        if not both or err.errno != errno.EADDRINUSE:
            raise
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)


def _listen_fd(name: str, backlog: int, cli: bool | None) -> socket.socket:
    sock = _socket_from_fd(name, cli)
    try:
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise _fail("Failed to listen on fd socket", err) from err
    return sock


def _socket_from_fd(name: str, cli: bool | None) -> socket.socket:
    """The socket an ``fd`` address names: a number on the command line; from QMP a getfd
    name, none of which exist in qsd-py yet."""
    if not (ON_COMMAND_LINE.get() if cli is None else cli):
        # qemu-storage-daemon's monitor has no getfd either: its text for any name.
        raise QMPError("only QEMU supports file descriptor passing")
    fd = _parse_fd_number(name)
    try:
        return socket.socket(fileno=fd)
    except OSError as err:
        if err.errno != errno.EBADF:
            # QEMU closes what it was handed when it is no socket.
            with contextlib.suppress(OSError):
                os.close(fd)
        raise QMPError(f"File descriptor '{name}' is not a socket") from err


def _parse_fd_number(text: str) -> int:
    """qemu_strtoi's rules: base 10, optional leading space and sign, nothing after. QEMU
    adds the reason only when the number is out of range."""
    stripped = text.lstrip(" \t\n\v\f\r")
    digits = stripped[1:] if stripped[:1] in "+-" else stripped
    if not digits or not digits.isascii() or not digits.isdigit():
        raise QMPError(f"Unable to parse FD number {text}")
    value = int(stripped)
    if not -(2**31) <= value < 2**31:
        raise QMPError(f"Unable to parse FD number {text}: {os.strerror(errno.ERANGE)}")
    return value


def _vsock_address(addr: dict[str, Any]) -> tuple[int, int]:
    values = []
    for key, what in (("cid", "cid"), ("port", "port")):
        text = addr[key]
        if not (text.isascii() and text.isdigit()) or int(text) > 0xFFFFFFFF:
            raise QMPError(f"Failed to parse {what} '{text}'")
        values.append(int(text))
    return values[0], values[1]


def _listen_vsock(addr: dict[str, Any], backlog: int) -> socket.socket:
    target = _vsock_address(addr)
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as err:
        raise _fail("Failed to create socket", err) from err
    try:
        sock.bind(target)
    except OSError as err:
        sock.close()
        raise _fail("Failed to bind socket", err) from err
    try:
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise _fail("Failed to listen on socket", err) from err
    return sock


# --- connecting ----------------------------------------------------------------------------
async def connect(addr: dict[str, Any], *, cli: bool | None = None) -> socket.socket:
    """A non-blocking socket connected to ``addr``; :class:`QMPError` with QEMU's text."""
    kind = addr["type"]
    if kind == "fd":
        sock = _socket_from_fd(addr["str"], cli)
        sock.setblocking(False)
        return sock
    if kind == "unix":
        targets = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, _unix_address(addr))]
        where = addr["path"]
    elif kind == "inet":
        flags = socket.AI_CANONNAME | socket.AI_ADDRCONFIG | socket.AI_V4MAPPED
        proto = IPPROTO_MPTCP if addr.get("mptcp") else None
        targets = [(f, k, proto or p, a) for f, k, p, _, a in _resolve(addr, flags)]
        where = f"{addr['host']}:{addr['port']}"
    else:
        targets = [(socket.AF_VSOCK, socket.SOCK_STREAM, 0, _vsock_address(addr))]
        where = f"{addr['cid']}:{addr['port']}"
    sock = await _connect_first(targets, where)
    if addr.get("keep-alive"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError as err:
            sock.close()
            raise _fail("Unable to set keep-alive option on socket", err) from err
    return sock


async def _connect_first(targets: list[tuple[Any, Any, int, Any]], where: str) -> socket.socket:
    """Try each resolved address in turn; the last failure is the error."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, kind, proto, address in targets:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as err:
            raise _fail(f"Failed to create socket family {int(family)}", err) from err
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise _fail(f"Failed to connect to '{where}'", last or OSError(errno.ENOENT, ""))
