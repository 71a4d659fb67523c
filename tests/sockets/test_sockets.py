"""qsd_py.sockets: listening and connecting for SocketAddress, with QEMU 11.1's texts.

These run in the test process: the module only creates sockets, and what a client sees of
them (a connection, a refused one, a socket file) is what is checked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from qsd_py import sockets
from qsd_py.errors import QMPError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def roundtrip(listener: sockets.Listener, addr: dict) -> None:
    """A client connects to ``addr`` and the listener's accepted side reads what it sent."""
    client = await sockets.connect(addr)
    server = await asyncio.wait_for(listener.accept(), 5)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(client, b"ping")
        assert await asyncio.wait_for(loop.sock_recv(server, 4), 5) == b"ping"
    finally:
        client.close()
        server.close()


def test_flatten_legacy_address() -> None:
    legacy = {"type": "inet", "data": {"host": "::1", "port": "10809", "ipv6": True}}
    assert sockets.flatten(legacy) == {"type": "inet", "host": "::1", "port": "10809", "ipv6": True}
    assert sockets.flatten({"type": "fd", "data": {"str": "3"}}) == {"type": "fd", "str": "3"}


# --- UNIX ------------------------------------------------------------------------------------
async def test_unix_listen_connect_and_remove_on_close(tmp_path: Path) -> None:
    addr = {"type": "unix", "path": str(tmp_path / "s.sock")}
    listener = sockets.listen(addr, 4)
    try:
        assert stat.S_ISSOCK(os.stat(addr["path"]).st_mode)
        await roundtrip(listener, addr)
    finally:
        listener.close()
    assert not os.path.exists(addr["path"])


def test_unix_mode_private_or_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        shared = sockets.listen({"type": "unix", "path": str(tmp_path / "a")}, 1)
        private = sockets.listen({"type": "unix", "path": str(tmp_path / "b")}, 1, private=True)
    finally:
        os.umask(old)
    try:
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600
    finally:
        shared.close()
        private.close()


def test_unix_stale_socket_replaced_other_files_kept(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(stale))
    sockets.listen({"type": "unix", "path": str(stale)}, 1).close()
    precious = tmp_path / "precious"
    precious.write_text("data")
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "unix", "path": str(precious)}, 1)
    assert err.value.desc == f"Failed to bind socket to {precious}: Address already in use"
    assert precious.read_text() == "data"


def test_unix_bind_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nodir" / "x.sock"
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "unix", "path": str(missing)}, 1)
    assert err.value.desc == f"Failed to bind socket to {missing}: No such file or directory"
    long = "/tmp/" + "x" * 104
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "unix", "path": long}, 1)
    assert err.value.desc == f"UNIX socket path '{long}' is too long"
    assert err.value.hint == "Path must be less than 108 bytes"


def test_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    first = sockets.listen({"type": "unix", "path": path}, 1)
    second = sockets.listen({"type": "unix", "path": path}, 1)  # replaces the first's file
    first.close()
    assert os.path.exists(path)
    second.close()
    assert not os.path.exists(path)


async def test_abstract_unix(tmp_path: Path) -> None:
    name = f"qsd-py-test-{os.getpid()}-{tmp_path.name}"
    for tight in (True, False):
        addr = {"type": "unix", "path": name, "abstract": True, "tight": tight}
        listener = sockets.listen(addr, 1)
        try:
            await roundtrip(listener, addr)
        finally:
            listener.close()


async def test_unix_connect_refused(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(QMPError) as err:
        await sockets.connect({"type": "unix", "path": str(path)})
    assert err.value.desc == f"Failed to connect to '{path}': No such file or directory"


# --- TCP -------------------------------------------------------------------------------------
async def test_inet_listen_connect() -> None:
    port = str(free_port())
    addr = {"type": "inet", "host": "127.0.0.1", "port": port}
    listener = sockets.listen(addr, 4)
    try:
        assert [s.getsockname() for s in listener.sockets] == [("127.0.0.1", int(port))]
        await roundtrip(listener, addr)
    finally:
        listener.close()


async def test_inet_every_resolved_address_listens() -> None:
    """``localhost`` is 127.0.0.1 and ::1 where both exist: a client of either is served."""
    port = str(free_port())
    resolved = {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
    listener = sockets.listen({"type": "inet", "host": "localhost", "port": port}, 4)
    try:
        assert {s.getsockname()[0] for s in listener.sockets} == resolved
        for host in sorted(resolved):
            await roundtrip(listener, {"type": "inet", "host": host, "port": port})
    finally:
        listener.close()


def test_inet_port_in_use_and_port_range() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        addr = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        with pytest.raises(QMPError) as err:
            sockets.listen(addr, 1)
        assert err.value.desc == "Failed to find an available port: Address already in use"
        ranged = sockets.listen({**addr, "to": port + 20}, 1)
        try:
            bound = ranged.sockets[0].getsockname()[1]
            assert port < bound <= port + 20
        finally:
            ranged.close()


async def test_inet_errors() -> None:
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "inet", "host": "127.0.0.1", "port": "abc"}, 1)
    assert err.value.desc == (
        "address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype"
    )
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "inet", "host": "", "port": "1", "ipv4": False, "ipv6": False}, 1)
    assert err.value.desc == "Cannot disable IPv4 and IPv6 at same time"
    closed = free_port()
    with pytest.raises(QMPError) as err:
        await sockets.connect({"type": "inet", "host": "127.0.0.1", "port": str(closed)})
    assert err.value.desc == f"Failed to connect to '127.0.0.1:{closed}': Connection refused"


async def test_inet_keep_alive_on_connect() -> None:
    port = str(free_port())
    addr = {"type": "inet", "host": "127.0.0.1", "port": port}
    listener = sockets.listen(addr, 1)
    try:
        client = await sockets.connect({**addr, "keep-alive": True})
        with client:
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        listener.close()


# --- file descriptors ------------------------------------------------------------------------
def test_fd_from_qmp_is_refused_as_qemu_storage_daemon_does() -> None:
    assert sockets.ON_COMMAND_LINE.get() is False  # QMP commands: getfd names, none here
    for name in ("3", "myfd"):
        with pytest.raises(QMPError) as err:
            sockets.listen({"type": "fd", "str": name}, 1)
        assert err.value.desc == "only QEMU supports file descriptor passing"


async def test_fd_number_on_command_line(tmp_path: Path) -> None:
    path = str(tmp_path / "fd.sock")
    raw = socket.socket(socket.AF_UNIX)
    raw.bind(path)
    fd = raw.detach()  # the listener takes the descriptor over, as QEMU's fd= does
    listener = sockets.listen({"type": "fd", "str": str(fd)}, 2, cli=True)
    try:
        assert listener.sockets[0].fileno() == fd
        await roundtrip(listener, {"type": "unix", "path": path})
    finally:
        listener.close()
    with pytest.raises(OSError) as gone:
        os.fstat(fd)
    assert gone.value.errno == errno.EBADF


def test_fd_errors_on_command_line() -> None:
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "fd", "str": "abc"}, 1, cli=True)
    assert err.value.desc == "Unable to parse FD number abc"
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "fd", "str": "99999999999"}, 1, cli=True)
    assert err.value.desc == "Unable to parse FD number 99999999999: Numerical result out of range"
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    with pytest.raises(QMPError) as err:
        sockets.listen({"type": "fd", "str": str(closed)}, 1, cli=True)
    assert err.value.desc == f"File descriptor '{closed}' is not a socket"
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(QMPError) as err:
            sockets.listen({"type": "fd", "str": str(rfd)}, 1, cli=True)
        assert err.value.desc == f"File descriptor '{rfd}' is not a socket"
        with pytest.raises(OSError):
            os.fstat(rfd)  # closed, as QEMU closes what it refuses
    finally:
        os.close(wfd)
    connected, peer = socket.socketpair()
    with peer:
        fd = connected.detach()
        with pytest.raises(QMPError) as err:
            sockets.listen({"type": "fd", "str": str(fd)}, 1, cli=True)
        assert err.value.desc.startswith("Failed to listen on fd socket: ")


async def test_accept_keeps_clients_that_arrive_together() -> None:
    """Two sockets, a client on each before accept() runs: neither is lost."""
    first = sockets.listen({"type": "inet", "host": "127.0.0.1", "port": "0"}, 4)
    second = sockets.listen({"type": "inet", "host": "127.0.0.1", "port": "0"}, 4)
    both = sockets.Listener([*first.sockets, *second.sockets])
    clients = [socket.create_connection(s.getsockname()[:2]) for s in both.sockets]
    try:
        await asyncio.sleep(0.05)
        accepted = [await asyncio.wait_for(both.accept(), 5) for _ in clients]
        peers = sorted(a.getpeername() for a in accepted)
        assert peers == sorted(c.getsockname() for c in clients)
        for sock in accepted:
            sock.close()
    finally:
        for client in clients:
            client.close()
        both.close()
