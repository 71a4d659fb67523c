"""Bad input against the NBD server: each case gets the protocol's error or a closed
connection, the daemon and its other clients go on, and its memory stays bounded."""

from __future__ import annotations

import random
import socket
import struct
import time
from pathlib import Path

import pytest
from nbd_bytes import (
    IHAVEOPT,
    open_export,
    option,
    read_chunk,
    read_simple_reply,
    recv_exactly,
    request,
)
from nbd_support import MIB, NbdDaemon, data_image

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
EINVAL, ENOSPC = 22, 28


@pytest.fixture
def served(nbd_daemon, tmp_path: Path) -> NbdDaemon:
    img = tmp_path / "disk.img"
    data_image(img)
    return nbd_daemon(
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
        "--export", "type=nbd,id=e0,node-name=d0,writable=on",
        server_opts=",max-connections=10,handshake-max-seconds=2",
    )  # fmt: skip


def rss_kib(daemon: NbdDaemon) -> int:
    status = Path(f"/proc/{daemon.daemon.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


def healthy(daemon: NbdDaemon) -> None:
    """A well-behaved client still gets the right bytes, and the daemon still answers QMP."""
    sock, size = open_export(str(daemon.sock), "d0")
    with sock:
        assert size == 4 * MIB
        sock.sendall(request(READ, 3 * MIB, 4096, cookie=99))
        assert read_simple_reply(sock) == (0, 99)
        with open(daemon.sock.parent / "disk.img", "rb") as image:
            image.seek(3 * MIB)
            assert recv_exactly(sock, 4096) == image.read(4096)
    qmp = daemon.qmp()
    try:
        assert qmp.cmd("query-block-exports")[0]["id"] == "e0"
    finally:
        qmp.close()
    assert daemon.daemon.proc.poll() is None


def closed_by_server(sock: socket.socket, timeout: float = 5) -> bool:
    """Whether the server hangs up (reading whatever it still sends)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def connect(daemon: NbdDaemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(daemon.sock))
    assert recv_exactly(sock, 18)[:8] == b"NBDMAGIC"
    return sock


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 0xFF),  # unknown client flags
        struct.pack(">I", 3) + b"\0" * 16,  # bad option magic
        struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF),  # absurd length
        struct.pack(">I", 0) + option(3),  # old newstyle client asking for a list
        struct.pack(">I", 3) + option(1, b"nope"),  # EXPORT_NAME of nothing
    ],
)
def test_malformed_handshakes_are_closed(served: NbdDaemon, garbage: bytes) -> None:
    sock = connect(served)
    with sock:
        sock.sendall(garbage)
        assert closed_by_server(sock)
    healthy(served)


def test_long_options_cost_no_memory(served: NbdDaemon) -> None:
    before = rss_kib(served)
    sock = connect(served)
    with sock:
        sock.sendall(struct.pack(">I", 3))
        for opt in (99, 6):  # an unknown option, then INFO with a name that is all junk
            sock.sendall(struct.pack(">QII", IHAVEOPT, opt, 32 * MIB))
            chunk = b"\xee" * MIB
            for _ in range(32):
                sock.sendall(chunk)
            magic, _opt, rep, length = struct.unpack(">QIII", recv_exactly(sock, 20))
            assert rep & 0x80000000  # an error reply, after the payload was skipped
            recv_exactly(sock, length)
    assert rss_kib(served) - before < 16 * 1024
    healthy(served)


def test_bad_requests_get_errors_and_the_connection_goes_on(served: NbdDaemon) -> None:
    sock, _ = open_export(str(served.sock), "d0")
    with sock:
        cases = [
            (request(READ, 4 * MIB - 512, 1024, cookie=1), EINVAL),  # past the end
            (request(WRITE_ZEROES, 4 * MIB, 1, cookie=2), ENOSPC),
            (request(TRIM, 1 << 62, 4096, cookie=3), EINVAL),
            (request(READ, 0, 512, cookie=4, flags=0x4), EINVAL),  # DF without structured
            (request(77, 0, 0, cookie=5), EINVAL),  # unknown command
            (request(BLOCK_STATUS, 0, 4096, cookie=6), EINVAL),  # not negotiated
            (request(READ, 0, 64 * MIB, cookie=7), EINVAL),  # more than 32 MiB at once
            (request(FLUSH, 0, 0, cookie=8, flags=0x20), EINVAL),  # PAYLOAD_LEN: no
        ]
        for raw, err in cases:
            sock.sendall(raw)
            assert read_simple_reply(sock) == (err, struct.unpack(">Q", raw[8:16])[0])
        sock.sendall(request(CACHE, 0, 4096, cookie=9) + request(FLUSH, 0, 0, cookie=10))
        assert {read_simple_reply(sock) for _ in range(2)} == {(0, 9), (0, 10)}
    healthy(served)


def test_structured_errors_carry_qemus_message(served: NbdDaemon) -> None:
    sock, _ = open_export(str(served.sock), "d0", structured=True)
    with sock:
        sock.sendall(request(READ, 4 * MIB, 1, cookie=3))
        flags, kind, cookie, payload = read_chunk(sock)
        assert (flags, kind, cookie) == (1, 0x8001, 3)
        err, length = struct.unpack(">IH", payload[:6])
        assert err == EINVAL
        assert payload[6:] == b"operation past EOF; From: 4194304, Len: 1, Size: 4194304"


def test_oversized_write_is_answered_then_closed(served: NbdDaemon) -> None:
    sock, _ = open_export(str(served.sock), "d0")
    with sock:
        sock.sendall(request(WRITE, 0, 64 * MIB, cookie=5) + b"\0" * 4096)
        assert read_simple_reply(sock) == (EINVAL, 5)
        assert closed_by_server(sock)
    healthy(served)


def test_bad_request_magic_closes(served: NbdDaemon) -> None:
    sock, _ = open_export(str(served.sock), "d0")
    with sock:
        sock.sendall(b"\x12\x34\x56\x78" + request(READ, 0, 512)[4:])
        assert closed_by_server(sock)
    healthy(served)


def test_half_a_request_then_silence(served: NbdDaemon) -> None:
    stalled, _ = open_export(str(served.sock), "d0")
    stalled.sendall(request(WRITE, 0, 65536)[:20])
    half_write, _ = open_export(str(served.sock), "d0")
    half_write.sendall(request(WRITE, 0, 1 * MIB) + b"\x01" * 1000)
    healthy(served)  # others are served meanwhile
    stalled.close()
    half_write.close()
    healthy(served)
    assert (served.sock.parent / "disk.img").read_bytes()[:1000] != b"\x01" * 1000


def test_client_vanishing_with_requests_in_flight(served: NbdDaemon) -> None:
    for _ in range(5):
        sock, _ = open_export(str(served.sock), "d0")
        burst = b"".join(request(READ, (i * 4096) % (4 * MIB), 65536, cookie=i) for i in range(200))
        sock.sendall(burst + request(WRITE, 0, 4096) + b"\x07" * 4096)
        sock.close()
    healthy(served)


def test_silent_client_is_dropped_after_handshake_max_seconds(served: NbdDaemon) -> None:
    sock = connect(served)
    with sock:
        start = time.monotonic()
        assert closed_by_server(sock, timeout=10)
        assert 1.5 < time.monotonic() - start < 8


def test_max_connections_queues_the_rest(served: NbdDaemon) -> None:
    socks = []
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(served.sock))  # the kernel's backlog takes them all
            socks.append(sock)
        greeted = []
        for sock in socks:
            sock.settimeout(0.05 if len(greeted) >= 10 else 2)
            try:
                if recv_exactly(sock, 18)[:8] == b"NBDMAGIC":
                    greeted.append(sock)
            except TimeoutError:
                pass
        assert len(greeted) == 10  # max-connections
        for sock in greeted:  # hang up: waiting clients take their places
            socks.remove(sock)
            sock.close()
        waiting = socks[:5]
        for sock in waiting:
            sock.settimeout(5)
            assert recv_exactly(sock, 18)[:8] == b"NBDMAGIC"
    finally:
        for sock in socks:
            sock.close()
    healthy(served)


def test_random_mutations(served: NbdDaemon) -> None:
    """A seeded stream of valid requests with bytes flipped: whatever happens to that
    connection, the daemon and a clean client are unaffected."""
    rng = random.Random(1234)
    before = rss_kib(served)
    for _ in range(30):
        sock, _ = open_export(str(served.sock), "d0", structured=rng.random() < 0.5)
        stream = bytearray()
        for i in range(40):
            cmd = rng.choice([READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS])
            length = rng.choice([0, 1, 512, 4096, 65536, 1 << 20])
            stream += request(cmd, rng.randrange(0, 5 * MIB), length, cookie=i)
            if cmd == WRITE:
                stream += bytes(length)
        for _ in range(rng.randrange(1, 20)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        sock.settimeout(5)
        try:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
            closed_by_server(sock)
        except OSError:
            pass  # the server may hang up first
        sock.close()
    healthy(served)
    assert rss_kib(served) - before < 64 * 1024


def test_big_reads_nobody_reads_stay_bounded(nbd_daemon) -> None:
    """64 reads of 32 MiB sent at once by a client that never reads a reply: the daemon
    takes on a bounded share (tasks' data, unsent replies), not 2 GiB."""
    daemon = nbd_daemon(
        "--blockdev", "driver=null-co,node-name=z0,size=1073741824,read-zeroes=on",
        "--export", "type=nbd,id=e0,node-name=z0",
    )  # fmt: skip
    before = rss_kib(daemon)
    sock, _ = open_export(str(daemon.sock), "z0")
    with sock:
        burst = b"".join(
            request(READ, i * 32 * MIB % (1 << 30), 32 * MIB, cookie=i) for i in range(64)
        )
        sock.sendall(burst)
        time.sleep(3)
        grown = rss_kib(daemon) - before
        assert grown < 320 * 1024, f"RSS grew by {grown} KiB"
        # the client reads after all: every reply arrives
        sock.settimeout(30)
        for _ in range(64):
            error, _cookie = read_simple_reply(sock)
            assert error == 0
            recv_exactly(sock, 32 * MIB)
