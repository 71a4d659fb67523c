"""The synchronous Ring on real files: prep helpers, submit/reap, SQ full, CQ overflow, fds."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from qsd_py.uring import abi
from qsd_py.uring.aio import buffer_address
from qsd_py.uring.ring import DEFAULT_FLAGS, Ring


def _reap_all(ring: Ring) -> dict[int, int]:
    out: dict[int, int] = {}
    ring.reap(lambda ud, res, fl: out.__setitem__(ud, res))
    return out


@pytest.fixture
def ring():
    r = Ring(8)
    yield r
    r.close()


@pytest.fixture
def datafile(tmp_path: Path):
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def test_setup_reports_geometry(ring: Ring) -> None:
    assert ring.sq_entries == 8
    assert ring.cq_entries >= 16
    assert ring.sqe_size == 128
    assert ring.features & abi.FEAT_NODROP


def test_nop_round_trip(ring: Ring) -> None:
    ring.prep_nop(42)
    assert ring.submit(wait_nr=1) == 1
    assert _reap_all(ring) == {42: 0}
    assert ring.cq_ready() == 0


def test_prep_copy_queues_a_prebuilt_sqe_with_one_field_patched(ring: Ring) -> None:
    """A prebuilt NOP goes out as built, or with its user_data (byte 32) patched per copy."""
    nop = abi.SQE.pack(abi.OP_NOP, 0, 0, -1, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0)
    ring.prep_copy(nop)
    ring.prep_copy(nop, 32, 99)
    ring.prep_copy(nop, 32, 1 << 60)
    assert ring.submit(wait_nr=3) == 3
    assert _reap_all(ring) == {7: 0, 99: 0, 1 << 60: 0}


@pytest.mark.parametrize("cqe32", [False, True], ids=["cqe16", "cqe32"])
def test_reap_across_the_ring_end(cqe32: bool) -> None:
    """CQEs are unpacked in batches up to the ring's end: 3 rounds of 5 NOPs on an 8-entry
    CQ wrap twice and each CQE still reaches the callback once, in order (both CQE sizes)."""
    flags = DEFAULT_FLAGS | (abi.SETUP_CQE32 if cqe32 else 0)
    ring = Ring(8, flags, cq_entries=8)
    try:
        assert ring.cqe_size == (32 if cqe32 else 16)
        seen: list[tuple[int, int]] = []
        for batch in range(3):
            for i in range(5):
                ring.prep_nop(batch * 10 + i)
            assert ring.submit(wait_nr=5) == 5
            assert ring.reap(lambda ud, res, fl: seen.append((ud, res))) == 5
        assert seen == [(b * 10 + i, 0) for b in range(3) for i in range(5)]
    finally:
        ring.close()


def test_read_write_into_memoryview(ring: Ring, datafile: int) -> None:
    buf = bytearray(100)
    mv = memoryview(buf)[10:60]
    ring.prep_read(datafile, buffer_address(mv), 50, 300, 1)
    src = b"ABCDEFGH" * 4
    ring.prep_write(datafile, buffer_address(src), len(src), 8192, 2)
    ring.submit(wait_nr=2)
    assert _reap_all(ring) == {1: 50, 2: 32}
    assert buf[10:60] == (bytes(range(256)) * 2)[300 - 256 : 350 - 256]
    assert buf[:10] == bytes(10) and buf[60:] == bytes(40)
    assert os.pread(datafile, 32, 8192) == src


def test_readv_writev_iovecs(ring: Ring, datafile: int) -> None:
    a, b = bytearray(3), bytearray(5)
    iov = (abi.IoVec * 2)(abi.IoVec(buffer_address(a), 3), abi.IoVec(buffer_address(b), 5))
    ring.prep_rw(abi.OP_READV, datafile, ctypes.addressof(iov), 2, 1, 7)
    ring.submit(wait_nr=1)
    assert _reap_all(ring) == {7: 8}
    assert bytes(a) == bytes([1, 2, 3]) and bytes(b) == bytes([4, 5, 6, 7, 8])


def test_fsync_and_fallocate(ring: Ring, datafile: int) -> None:
    ring.prep_fsync(datafile, 1, datasync=True)
    ring.prep_fallocate(datafile, 0, 0, 1 << 20, 2)
    ring.submit(wait_nr=2)
    assert _reap_all(ring) == {1: 0, 2: 0}
    assert os.fstat(datafile).st_size == 1 << 20


def test_uring_cmd_on_regular_file_is_eopnotsupp(ring: Ring, datafile: int) -> None:
    off = ring.prep_uring_cmd(datafile, 1, b"\x01" * 24, 0, 0, 9)
    assert off % ring.sqe_size == abi.SQE_CMD_OFFSET
    assert ring.sqes[off : off + 24] == b"\x01" * 24
    ring.submit(wait_nr=1)
    assert _reap_all(ring) == {9: -errno.EOPNOTSUPP}


def test_small_sqe_ring_has_small_cmd_area() -> None:
    with Ring(4, abi.SETUP_SUBMIT_ALL) as small:
        assert small.sqe_size == 64 and small.cmd_size == 16
        off = small.prep_uring_cmd(-1, 1, None, 0, 0, 3)
        assert off == abi.SQE_CMD_OFFSET


def test_errors_come_back_as_negative_errno(ring: Ring, tmp_path: Path) -> None:
    ring.prep_read(9999, 0, 0, 0, 1)
    ro = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        ring.prep_write(ro, buffer_address(b"x"), 1, 0, 2)
        ring.prep_rw(200, -1, 0, 0, 0, 3)  # opcode the kernel does not know
        ring.submit(wait_nr=3)
        assert _reap_all(ring) == {1: -errno.EBADF, 2: -errno.EBADF, 3: -errno.EINVAL}
    finally:
        os.close(ro)


def test_sq_full_submits_and_continues(ring: Ring) -> None:
    for i in range(3 * ring.sq_entries + 3):  # more SQEs than SQ slots
        ring.prep_nop(i)
    ring.submit()
    got = _reap_all(ring)
    assert sorted(got) == list(range(3 * ring.sq_entries + 3))
    assert ring.pending() == 0


def test_cq_overflow_is_flushed_not_lost(ring: Ring) -> None:
    n = 5 * ring.cq_entries
    for i in range(n):
        ring.prep_nop(i)
    ring.submit()
    assert ring.cq_ready() == ring.cq_entries  # the ring is full, the rest waits in the kernel
    got = _reap_all(ring)
    assert sorted(got) == list(range(n))
    assert ring.cq_overflow_count() == 0


def test_wait_times_out(ring: Ring) -> None:
    r, w = os.pipe()
    try:
        buf = bytearray(4)
        ring.prep_read(r, buffer_address(buf), 4, abi.OFF_CURRENT, 5)
        assert ring.wait(1, timeout=0.05) is False
        os.write(w, b"ping")
        assert ring.wait(1, timeout=5) is True
        assert _reap_all(ring) == {5: 4} and buf == b"ping"
    finally:
        os.close(r)
        os.close(w)


def test_fixed_files(ring: Ring, datafile: int) -> None:
    ring.register_files([-1, datafile])
    buf = bytearray(4)
    ring.prep_rw(abi.OP_READ, 1, buffer_address(buf), 4, 16, 1, sqe_flags=abi.SQE_FIXED_FILE)
    ring.submit(wait_nr=1)
    assert _reap_all(ring) == {1: 4} and buf == bytes([16, 17, 18, 19])
    ring.update_files(1, [-1])
    ring.prep_rw(abi.OP_READ, 1, buffer_address(buf), 4, 0, 2, sqe_flags=abi.SQE_FIXED_FILE)
    ring.submit(wait_nr=1)
    assert _reap_all(ring) == {2: -errno.EBADF}
    ring.unregister_files()


def test_probe_lists_needed_opcodes(ring: Ring) -> None:
    ops = ring.probe()
    for op in (abi.OP_NOP, abi.OP_READ, abi.OP_WRITE, abi.OP_FSYNC, abi.OP_URING_CMD):
        assert op in ops


def test_close_releases_fds_and_maps() -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if "io_uring" in line)

    Ring(4).close()  # warm up lazily created things (ctypes, libc)
    before_fds, before_maps = fds(), maps()
    for _ in range(200):
        r = Ring(64)
        r.prep_nop(1)
        r.submit(wait_nr=1)
        r.close()
        assert r.closed
    assert fds() == before_fds
    assert maps() == before_maps


def test_no_sqarray_used_when_available(ring: Ring) -> None:
    # 6.6+ kernels accept NO_SQARRAY; on this project's kernels we expect it.
    assert ring.flags & abi.SETUP_NO_SQARRAY
