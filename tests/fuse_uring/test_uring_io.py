"""I/O through FUSE-over-io_uring, checked against the backing image, with proof that the
ring (not /dev/fuse) carried it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from uring_support import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    UringServer,
    devfuse_totals,
    fallocate,
    pread_direct,
    pwrite_direct,
    uring_totals,
)

SIZE = 8 << 20


@pytest.fixture
def exported(userver: UringServer, tmp_path: Path):
    """An 8 MiB image (first 2 MiB random, the rest a hole) exported writable over the ring."""
    data = os.urandom(2 << 20)
    img = userver.image(SIZE, data)
    node = userver.node(img)
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=True)
    return img, mnt, exp


def test_transport_and_queues(exported):
    _img, _mnt, exp = exported
    st = exp.stats()
    assert st["transport"] == "io_uring"
    assert st["negotiated"]["flags"] & (1 << 41)  # FUSE_OVER_IO_URING granted
    qids = [q["qid"] for q in st["uring-queues"]]
    assert qids == list(range(os.sysconf("SC_NPROCESSORS_CONF")))
    assert all(q["registered"] == q["depth"] == 64 for q in st["uring-queues"])


def test_getattr(exported):
    img, mnt, exp = exported
    before = uring_totals(exp.stats())["requests"]
    st = os.stat(mnt)
    assert st.st_size == SIZE == os.path.getsize(img)
    assert st.st_mode & 0o777 == 0o600
    assert uring_totals(exp.stats())["requests"] > before


@pytest.mark.parametrize("offset,size", [(0, 4096), (12288, 65536), (1 << 20, 1 << 20)])
def test_read_matches_image(exported, offset, size):
    img, mnt, exp = exported
    before = exp.stats()
    got = pread_direct(mnt, offset, size)
    assert got == img.read_bytes()[offset : offset + size]
    after = exp.stats()
    assert uring_totals(after)["bytes-read"] - uring_totals(before)["bytes-read"] == size
    assert devfuse_totals(after)["bytes-read"] == 0


def test_read_at_eof_is_short(exported):
    _img, mnt, _exp = exported
    assert len(pread_direct(mnt, SIZE - 4096, 65536)) == 4096
    assert pread_direct(mnt, SIZE, 4096) == b""


def test_write_reaches_image(exported):
    img, mnt, exp = exported
    chunks = {0: os.urandom(4096), 5 << 20: os.urandom(1 << 20), 3 << 20: os.urandom(8192)}
    for off, data in chunks.items():
        pwrite_direct(mnt, off, data)
    image = img.read_bytes()
    for off, data in chunks.items():
        assert image[off : off + len(data)] == data
        assert pread_direct(mnt, off, len(data)) == data
    st = exp.stats()
    assert uring_totals(st)["bytes-written"] == sum(len(d) for d in chunks.values())
    assert devfuse_totals(st)["bytes-written"] == 0
    assert uring_totals(st)["errors"] == 0


def test_buffered_io(exported):
    """Page-cache I/O (no O_DIRECT) goes through the same requests (direct_io file)."""
    img, mnt, _exp = exported
    with open(mnt, "r+b") as f:
        f.seek(7 << 20)
        f.write(b"hello ring")
        f.flush()
        os.fsync(f.fileno())
        f.seek(100)
        assert f.read(1000) == img.read_bytes()[100:1100]
    assert img.read_bytes()[7 << 20 : (7 << 20) + 10] == b"hello ring"


def test_zero_range_and_punch_hole(exported):
    img, mnt, _exp = exported
    fallocate(mnt, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
    assert img.read_bytes()[4096 : 4096 + 8192] == bytes(8192)
    fallocate(mnt, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 4096)
    assert pread_direct(mnt, 65536, 4096) == bytes(4096)
    assert os.path.getsize(img) == SIZE


def test_fallocate_grows(exported):
    img, mnt, _exp = exported
    fallocate(mnt, 0, SIZE, 1 << 20)
    assert os.path.getsize(img) == SIZE + (1 << 20)
    assert os.stat(mnt).st_size == SIZE + (1 << 20)


def test_lseek_data_hole(exported):
    img, mnt, _exp = exported
    fd_img = os.open(img, os.O_RDONLY)
    fd = os.open(mnt, os.O_RDONLY)
    try:
        expect_hole = os.lseek(fd_img, 0, os.SEEK_HOLE)
        assert expect_hole < SIZE  # the image really has a hole
        assert os.lseek(fd, 0, os.SEEK_HOLE) == expect_hole
        assert os.lseek(fd, expect_hole, os.SEEK_HOLE) == expect_hole
        with pytest.raises(OSError) as err:
            os.lseek(fd, expect_hole, os.SEEK_DATA)  # nothing but hole until the end
        assert err.value.errno == 6  # ENXIO
    finally:
        os.close(fd)
        os.close(fd_img)


def test_read_only_export_refuses_writes(userver: UringServer, tmp_path: Path):
    img = userver.image(1 << 20, b"ro" * 100)
    exp = userver.export(userver.node(img), tmp_path / "ro", io_uring=True)
    assert pread_direct(tmp_path / "ro", 0, 4096)[:200] == b"ro" * 100
    with pytest.raises(OSError):
        os.open(tmp_path / "ro", os.O_WRONLY)
    assert exp.stats()["transport"] == "io_uring"
