"""Listening sockets of the NBD server, for a flat ``SocketAddress``.

Stand-in until ``qsd_py/sockets.py`` (shared with QMP) arrives: the server only needs
"give me listening sockets for this address", with QEMU's errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Any

from qsd_py.errors import QMPError

BACKLOG = socket.SOMAXCONN


def open_listeners(addr: dict[str, Any], from_monitor: bool) -> list[socket.socket]:
    """Non-blocking listening sockets for ``addr``: one for every address an inet host
    resolves to. ``from_monitor``: the address came over QMP, where an fd would be one
    passed to the monitor, which qemu-storage-daemon cannot do."""
    kind = addr["type"]
    if kind == "unix":
        socks = [_listen_unix(addr)]
    elif kind == "inet":
        socks = _listen_inet(addr)
    elif kind == "vsock":
        socks = [_listen_vsock(addr)]
    else:
        socks = [_listen_fd(addr["str"], from_monitor)]
    for sock in socks:
        sock.setblocking(False)
    return socks


def _listen_unix(addr: dict[str, Any]) -> socket.socket:
    path: str = addr["path"]
    abstract = bool(addr.get("abstract", False))
    if not abstract:
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + path if abstract else path)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise QMPError(f"Failed to bind socket to {path}: {err.strerror}") from err
    return sock


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a previous server is replaced; any other file stays."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _listen_inet(addr: dict[str, Any]) -> list[socket.socket]:
    """Every address the host resolves to, each on the first free port of the range."""
    host, port = addr["host"], addr["port"]
    family = socket.AF_UNSPEC
    if addr.get("ipv4") and not addr.get("ipv6"):
        family = socket.AF_INET
    elif addr.get("ipv6") and not addr.get("ipv4"):
        family = socket.AF_INET6
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if addr.get("numeric") else 0)
    try:
        infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as err:
        raise QMPError(f"address resolution failed for {host}:{port}: {err.strerror}") from err
    socks: list[socket.socket] = []
    last: OSError = OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    for fam, kind, proto, _name, sockaddr in infos:
        first = sockaddr[1]
        for number in range(first, max(first, addr.get("to", first)) + 1):
            try:
                socks.append(_bind_inet(fam, kind, proto, (sockaddr[0], number, *sockaddr[2:])))
                break
            except OSError as err:
                last = err
    if not socks:
        raise QMPError(f"Failed to find an available port: {last.strerror}") from last
    return socks


def _bind_inet(family: int, kind: int, proto: int, sockaddr: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _listen_vsock(addr: dict[str, Any]) -> socket.socket:
    cid, port = _u32(addr["cid"], "cid"), _u32(addr["port"], "port")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((cid, port))
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise QMPError(f"Failed to bind socket: {err.strerror}") from err
    return sock


def _u32(text: str, what: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise QMPError(f"Failed to parse {what} '{text}'")
    return int(text)


def _listen_fd(name: str, from_monitor: bool) -> socket.socket:
    """A socket the daemon was started with, by number (command line only)."""
    if from_monitor:
        raise QMPError("only QEMU supports file descriptor passing")
    if not name.isdigit():
        raise QMPError(f"Unable to parse FD number {name}")
    try:
        fd = os.dup(int(name))
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise QMPError(f"File descriptor '{name}' is not a socket") from err
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        raise QMPError(f"File descriptor '{name}' is not a socket")
    with contextlib.suppress(OSError):
        sock.listen(BACKLOG)
    return sock


def tune_client(sock: socket.socket) -> None:
    """As QEMU does for NBD clients: no Nagle delay on TCP; a 2 MiB send buffer on UNIX
    sockets (replies of big reads go out in fewer, larger writes)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
