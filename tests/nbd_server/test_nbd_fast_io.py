"""The NBD export's fast road (qsd_py/block/fast_io.py through the connection): O_DIRECT
files on disk (io_uring SQEs into aligned buffers) and on tmpfs (copies on the loop), qcow2
through its cluster table; aligned and unaligned requests, small and large, reads and writes,
and structured reads answered with hole chunks where the image reads as zeroes."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_bytes import open_export, read_simple_reply, recv_exactly, request
from nbd_support import MIB, data_image, libnbd

# Writes of every size class at aligned and unaligned places (the unaligned ones take the
# node's bounce path with O_DIRECT), then reads of the same shapes; prints the mismatches.
LIBNBD_PATTERNS = r"""
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rng = random.Random(7)
image = bytearray(open(sys.argv[2], "rb").read())
shapes = [(0, 4096), (8192, 65536), (MIB := 1 << 20, 1 << 20), (512, 4096), (4096 * 5 + 1, 3000),
          (2 * MIB + 4096, 256 * 1024), (size - 4096, 4096), (3 * MIB - 100, 200)]
cookies = []
for off, n in shapes:
    data = rng.randbytes(n)
    image[off:off + n] = data
    cookies.append(h.aio_pwrite(data, off))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)
bad = [(off, n) for off, n in shapes if h.pread(n, off) != bytes(image[off:off + n])]
bad += [(0, size)] if h.pread(size, 0) != bytes(image) else []
print(bad)
h.shutdown()
open(sys.argv[3], "wb").write(image)
"""

# A structured read of MiB 1-3 of data_image(): chunk kinds and ranges as the server sent them.
LIBNBD_CHUNKS = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
chunks = []
def chunk(buf, offset, status, err):
    kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}.get(status, status)
    chunks.append((kind, offset, len(buf), buf == bytes(len(buf))))
    return 0
off, n = int(sys.argv[2]), int(sys.argv[3])
h.pread_structured(n, off, chunk)
print(repr(chunks))
h.shutdown()
"""


@pytest.fixture(params=["disk", "tmpfs"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the image lives: tmp_path (a disk file system here) or /dev/shm (tmpfs, where
    requests are copied on the loop)."""
    if request.param == "disk":
        yield tmp_path
        return
    where = Path("/dev/shm") / f"qsd-nbd-fast-{uuid.uuid4().hex}"
    where.mkdir()
    try:
        yield where
    finally:
        for f in where.iterdir():
            f.unlink()
        where.rmdir()


def _file_export(nbd_daemon, image: Path, fmt: str = "raw"):  # noqa: ANN001, ANN202
    return nbd_daemon(
        "--blockdev",
        f"driver=file,node-name=f0,filename={image},cache.direct=on",
        "--blockdev",
        f"driver={fmt},node-name=d0,file=f0",
        "--export",
        "type=nbd,id=e0,node-name=d0,writable=on",
    )


def test_direct_raw_writes_and_reads_every_shape(nbd_daemon, image_dir: Path) -> None:
    image = image_dir / "disk.img"
    data_image(image)
    expect = image_dir / "expect.img"
    daemon = _file_export(nbd_daemon, image)
    out = libnbd(LIBNBD_PATTERNS, daemon.uri("d0"), str(image), str(expect))
    assert out.strip() == "[]"  # every read returned what was written
    assert image.read_bytes() == expect.read_bytes()  # and the file holds it


def test_direct_raw_structured_read_has_a_hole_chunk(nbd_daemon, image_dir: Path) -> None:
    image = image_dir / "disk.img"
    data_image(image)  # MiB 2 is a hole
    daemon = _file_export(nbd_daemon, image)
    # Twice: the second read of MiB 3 is answered from the span the first one found.
    for _ in range(2):
        out = libnbd(LIBNBD_CHUNKS, daemon.uri("d0"), str(MIB), str(3 * MIB))
        chunks = eval(out)  # noqa: S307 - our own script's repr
        assert ("hole", 2 * MIB, MIB, True) in chunks
        assert [c for c in chunks if c[1] == 3 * MIB] == [("data", 3 * MIB, MIB, False)]
        covered = sorted((c[1], c[2]) for c in chunks)
        assert sum(n for _, n in covered) == 3 * MIB  # no gap, no overlap


def test_qcow2_zero_clusters_are_hole_chunks(nbd_daemon, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    io = ["qemu-io", "-f", "qcow2", str(image)]
    subprocess.run([*io, "-c", "write -P 0x5a 0 4M", "-c", "write -z 1M 1M"], check=True,
                   capture_output=True)  # fmt: skip
    daemon = _file_export(nbd_daemon, image, "qcow2")
    for _ in range(2):  # the second time the cluster table knows every cluster
        out = libnbd(LIBNBD_CHUNKS, daemon.uri("d0"), str(MIB), str(MIB))
        assert eval(out) == [("hole", MIB, MIB, True)]  # noqa: S307
        out = libnbd(LIBNBD_CHUNKS, daemon.uri("d0"), str(2 * MIB), str(MIB))
        assert eval(out) == [("data", 2 * MIB, MIB, False)]  # noqa: S307
    with open(tmp_path / "out.raw", "wb") as f:
        f.truncate(0)
    subprocess.run(["nbdcopy", daemon.uri("d0"), str(tmp_path / "out.raw")], check=True)
    got = (tmp_path / "out.raw").read_bytes()
    assert got[:MIB] == b"\x5a" * MIB
    assert got[MIB : 2 * MIB] == bytes(MIB)
    assert got[2 * MIB : 4 * MIB] == b"\x5a" * (2 * MIB)
    assert os.path.getsize(tmp_path / "out.raw") == 8 * MIB


# WRITEs into a fresh qcow2 image, all in flight at once: 4 KiB into clusters of their own,
# two into one cluster, one across two clusters, a 512-byte aligned one, a 256 KiB one; then the
# image read back whole (prints the mismatches).
LIBNBD_FRESH = r"""
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rng = random.Random(5)
K, M = 1024, 1 << 20
shapes = [(0, 4 * K), (640 * K, 4 * K), (644 * K, 4 * K), (2 * M - 4 * K, 8 * K),
          (3 * M + 512, 3072), (5 * M, 256 * K), (7 * M + 64 * K, 4 * K)]
image = bytearray(size)
cookies = []
for off, n in shapes:
    data = rng.randbytes(n)
    image[off:off + n] = data
    cookies.append(h.aio_pwrite(data, off))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)
print([(off, n) for off, n in shapes if h.pread(n, off) != bytes(image[off:off + n])]
      + ([(0, size)] if h.pread(size, 0) != bytes(image) else []))
h.shutdown()
open(sys.argv[2], "wb").write(image)
"""


def test_qcow2_fresh_clusters_written_on_the_fast_path(nbd_daemon, image_dir: Path) -> None:
    """Fresh clusters are allocated by the node, then written on the fast road: the data
    reads back over NBD and from the file, and the image checks clean."""
    image = image_dir / "fresh.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    daemon = _file_export(nbd_daemon, image, "qcow2")
    expect = image_dir / "expect.raw"
    assert libnbd(LIBNBD_FRESH, daemon.uri("d0"), str(expect)).strip() == "[]"
    assert daemon.daemon.stop() == 0
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    out = image_dir / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    assert out.read_bytes() == expect.read_bytes()


# Large WRITEs of changing sizes between other commands: after a large WRITE the server
# receives the next payload ahead, into a buffer of the last one's size; every request here
# that does not fit that guess (smaller, larger, not a WRITE, a bad length) must still be
# read whole and in order. (offset, length) of each WRITE; READ/FLUSH/TRIM by name. No two
# ranges overlap: the requests are in flight together and may complete in any order.
AHEAD_STREAM = [
    (0, 256 << 10), (256 << 10, 256 << 10), (512 << 10, 100 << 10), "READ",
    (MIB, 300 << 10), "FLUSH", (MIB + (300 << 10), 70 << 10), (2 * MIB, MIB), (3 * MIB, MIB),
    ((616 << 10) + 512, 64 << 10), "TRIM", (MIB + (640 << 10), 256 << 10), "READ",
    (700 << 10, 200 << 10),
]  # fmt: skip
QUIET = MIB + (512 << 10)  # where READ and TRIM go: no WRITE here (they run concurrently)


def _ahead_requests(rng: random.Random, image: bytearray) -> tuple[bytes, list[int]]:
    """The stream's bytes (an oversized WRITE last) and the commands in order; applies the
    writes to ``image``."""
    out, kinds = bytearray(), []
    for cookie, item in enumerate(AHEAD_STREAM):
        if item == "READ":
            out += request(0, QUIET, 4096, cookie)
            kinds.append(0)
        elif item == "FLUSH":
            out += request(3, 0, 0, cookie)
            kinds.append(3)
        elif item == "TRIM":  # zeroes already (MiB 1 of data_image)
            out += request(4, QUIET + 65536, 4096, cookie)
            kinds.append(4)
        else:
            off, n = item
            data = rng.randbytes(n)
            image[off : off + n] = data
            out += request(1, off, n, cookie) + data
            kinds.append(1)
    out += request(1, 0, 64 << 20, len(kinds))  # beyond the limit: an error, then closed
    return bytes(out), kinds


def test_large_writes_received_ahead_of_odd_requests(nbd_daemon, image_dir: Path) -> None:
    image = image_dir / "disk.img"
    expect = bytearray(data_image(image))
    daemon = _file_export(nbd_daemon, image)
    rng = random.Random(11)
    stream, kinds = _ahead_requests(rng, expect)
    sock, _ = open_export(str(daemon.sock), "d0")

    def send() -> None:  # in pieces that split headers and payloads anywhere
        pos = 0
        while pos < len(stream):
            n = rng.choice((1, 7, 28, 4096, 65536, 300000))
            sock.sendall(stream[pos : pos + n])
            pos += n
            if rng.random() < 0.3:
                time.sleep(0.002)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        answered = set()
        for _ in range(len(kinds) + 1):  # in any order
            error, cookie = read_simple_reply(sock)
            answered.add(cookie)
            if cookie == len(kinds):  # the oversized WRITE
                assert error == 22
                continue
            assert error == 0, (cookie, error)
            if kinds[cookie] == 0:
                assert recv_exactly(sock, 4096) == bytes(expect[QUIET : QUIET + 4096])
        assert answered == set(range(len(kinds) + 1))
        assert sock.recv(1) == b""  # then closed
    finally:
        sender.join()
        sock.close()
    _guess_missed_by_more_than_a_buffer(daemon, rng, expect)
    assert image.read_bytes() == bytes(expect)


def _guess_missed_by_more_than_a_buffer(daemon, rng: random.Random, expect: bytearray) -> None:  # noqa: ANN001
    """A 1 MiB WRITE, then at once more than the receive buffer holds of other requests: the
    guess of another 1 MiB payload takes them all, and they go back into a larger buffer."""
    sock, _ = open_export(str(daemon.sock), "d0")
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        data = rng.randbytes(MIB)
        expect[2 * MIB : 3 * MIB] = data
        sock.sendall(request(1, 2 * MIB, MIB, 1) + data)
        assert read_simple_reply(sock) == (0, 1)
        burst = bytearray()
        for i, off in enumerate(range(0, 400 << 10, 40 << 10)):  # ten 40 KiB WRITEs
            data = rng.randbytes(40 << 10)
            expect[off : off + len(data)] = data
            burst += request(1, off, len(data), 10 + i) + data
        burst += request(0, 3 * MIB, 4096, 20)
        sock.sendall(burst)
        replies = {}
        for _ in range(11):
            error, cookie = read_simple_reply(sock)
            replies[cookie] = error
            if cookie == 20:
                assert recv_exactly(sock, 4096) == bytes(expect[3 * MIB : 3 * MIB + 4096])
        assert replies == dict.fromkeys([*range(10, 20), 20], 0)


def test_large_reads_from_memory_leave_in_pieces(nbd_daemon) -> None:
    """On tmpfs, large READs are sent from the page cache (sendfile): a client that reads
    slowly gets them in many pieces, in order, behind their headers; one that hangs up with
    such replies queued leaves the daemon serving the next."""
    where = Path("/dev/shm") / f"qsd-nbd-fast-{uuid.uuid4().hex}"
    where.mkdir()
    try:
        image = where / "disk.img"
        content = data_image(image)
        daemon = _file_export(nbd_daemon, image)
        shapes = [(0, 4 * MIB), (MIB - 4096, 2 * MIB), (3 * MIB, 4096), (4096, 65536)] * 3
        sock, _ = open_export(str(daemon.sock), "d0")
        with sock:
            sock.sendall(b"".join(request(0, off, n, i) for i, (off, n) in enumerate(shapes)))
            time.sleep(0.2)  # the server fills the socket and waits for room
            got = {}
            for _ in shapes:
                error, cookie = read_simple_reply(sock)
                assert error == 0
                off, n = shapes[cookie]
                data = bytearray()
                while len(data) < n:
                    data += recv_exactly(sock, min(n - len(data), 300000))
                got[cookie] = bytes(data)
            assert got == {i: content[off : off + n] for i, (off, n) in enumerate(shapes)}
        sock, _ = open_export(str(daemon.sock), "d0")
        sock.sendall(request(0, 0, 4 * MIB, 1) * 4)
        sock.close()  # gone with 16 MiB of replies queued
        sock, _ = open_export(str(daemon.sock), "d0")
        with sock:
            sock.sendall(request(0, 3 * MIB, MIB, 5))
            assert read_simple_reply(sock) == (0, 5)
            assert recv_exactly(sock, MIB) == content[3 * MIB :]
    finally:
        for f in where.iterdir():
            f.unlink()
        where.rmdir()
