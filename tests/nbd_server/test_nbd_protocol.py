"""The NBD server on the wire, by hand: extended headers, sparse structured reads, block
status payloads, replies out of order; and a qcow2 node read back over NBD equals the
FUSE view of the same node."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from nbd_bytes import ext_request, open_export, read_chunk, read_ext_chunk, request
from nbd_support import MIB, NbdDaemon, data_image, run

READ, WRITE, CACHE, BLOCK_STATUS = 0, 1, 5, 7
DONE = 1
NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS_EXT, ERROR = 0, 1, 2, 6, 0x8001
PAYLOAD_LEN, DF = 0x20, 0x4


@pytest.fixture
def served(nbd_daemon, tmp_path: Path) -> tuple[NbdDaemon, bytes]:
    img = tmp_path / "disk.img"
    data = data_image(img)
    daemon = nbd_daemon(
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
        "--export", "type=nbd,id=e0,node-name=d0,writable=on",
    )  # fmt: skip
    return daemon, data


def test_extended_headers(served: tuple[NbdDaemon, bytes]) -> None:
    daemon, data = served
    sock, size = open_export(str(daemon.sock), "d0", extended=True, contexts=(b"base:allocation",))
    with sock:
        assert size == 4 * MIB
        sock.sendall(ext_request(READ, 3 * MIB, 4096, cookie=1))
        flags, kind, cookie, offset, payload = read_ext_chunk(sock)
        assert (flags, kind, cookie, offset) == (DONE, OFFSET_DATA, 1, 3 * MIB)
        assert payload == struct.pack(">Q", 3 * MIB) + data[3 * MIB : 3 * MIB + 4096]
        # a WRITE's length is its payload's (PAYLOAD_LEN is how compliant clients say it)
        sock.sendall(ext_request(WRITE, 8192, 512, cookie=2, flags=PAYLOAD_LEN) + b"\x77" * 512)
        assert read_ext_chunk(sock)[:4] == (DONE, NONE, 2, 8192)
        # block status answers with 64-bit descriptors
        sock.sendall(ext_request(BLOCK_STATUS, MIB, 3 * MIB, cookie=3))
        flags, kind, cookie, _, payload = read_ext_chunk(sock)
        assert (flags, kind, cookie) == (DONE, BLOCK_STATUS_EXT, 3)
        context, count = struct.unpack(">II", payload[:8])
        extents = struct.unpack(f">{2 * count}Q", payload[8:])
        assert (context, extents) == (0, (MIB, 0, MIB, 3, MIB, 0))
        # ... and takes a payload: an effective length and the contexts asked for
        body = struct.pack(">QI", MIB, 0)
        sock.sendall(ext_request(BLOCK_STATUS, 2 * MIB, len(body), cookie=4, flags=PAYLOAD_LEN))
        sock.sendall(body)
        payload = read_ext_chunk(sock)[4]
        assert struct.unpack(">IIQQ", payload) == (0, 1, MIB, 3)
        # lengths are 64 bits, and more than 32 MiB at once is refused, not fatal
        sock.sendall(ext_request(READ, 0, 1 << 33, cookie=5))
        flags, kind, cookie, _, payload = read_ext_chunk(sock)
        assert (flags, kind, cookie) == (DONE, ERROR, 5)
        assert payload[6:] == b"len (8589934592) is larger than max len (33554432)"
        sock.sendall(ext_request(READ, 0, 8, cookie=6))
        assert read_ext_chunk(sock)[4][8:] == data[:8]
    assert (daemon.sock.parent / "disk.img").read_bytes()[8192:8704] == b"\x77" * 512


def test_sparse_structured_read(served: tuple[NbdDaemon, bytes]) -> None:
    """A read across the hole (MiB 2) comes as data, hole, data chunks; with DF as one."""
    daemon, data = served
    sock, _ = open_export(str(daemon.sock), "d0", structured=True)
    with sock:
        start, length = 2 * MIB - 65536, MIB + 131072
        sock.sendall(request(READ, start, length, cookie=9))
        pieces = []
        while True:
            flags, kind, cookie, payload = read_chunk(sock)
            assert cookie == 9
            if kind == OFFSET_DATA:
                (at,) = struct.unpack(">Q", payload[:8])
                pieces.append(("data", at, len(payload) - 8))
                assert payload[8:] == data[at : at + len(payload) - 8]
            else:
                assert kind == OFFSET_HOLE
                pieces.append(("hole", *struct.unpack(">QI", payload)))
            if flags & DONE:
                break
        assert pieces == [
            ("data", start, 65536),
            ("hole", 2 * MIB, MIB),
            ("data", 3 * MIB, 65536),
        ]
        sock.sendall(request(READ, start, length, cookie=10, flags=DF))
        flags, kind, _, payload = read_chunk(sock)
        assert (flags, kind, len(payload)) == (DONE, OFFSET_DATA, 8 + length)


def test_replies_come_out_of_order(served: tuple[NbdDaemon, bytes]) -> None:
    """A read that needs the node's coroutines is still running when a CACHE sent after it
    (answered at once) has its reply: the CACHE's comes first."""
    daemon, _ = served
    sock, _ = open_export(str(daemon.sock), "d0", structured=True)
    with sock:
        sock.sendall(request(READ, 0, 2 * MIB, cookie=1) + request(CACHE, 0, 4096, cookie=2))
        magic, error, cookie = struct.unpack(">IIQ", sock.recv(16, socket.MSG_WAITALL))
        assert (magic, error, cookie) == (0x67446698, 0, 2)
        flags = 0
        while not flags & DONE:
            flags, _, cookie, _ = read_chunk(sock)
            assert cookie == 1


def test_qcow2_over_nbd_equals_the_fuse_view(qsd, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data_image(raw)
    qcow = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
        str(raw), str(qcow))  # fmt: skip
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 100000 5000", str(qcow))
    mnt = tmp_path / "view.raw"
    mnt.touch()
    sock = tmp_path / "nbd.sock"
    qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={qcow}",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=n0,node-name=q0",
        "--export", f"type=fuse,id=u0,node-name=q0,mountpoint={mnt}",
    )  # fmt: skip
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///q0?socket={sock}", str(out))
    fuse_view = mnt.read_bytes()
    assert len(fuse_view) == 4 * MIB
    assert out.read_bytes() == fuse_view
    assert fuse_view[100000:105000] == b"\x66" * 5000
