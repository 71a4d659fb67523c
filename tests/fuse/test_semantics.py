"""QEMU 11.1's FUSE export semantics, checked through a real mount with ordinary tools.

The export serves a MemNode from the server thread; the test thread (and the tools it runs)
does the I/O and compares with the node's bytes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from memnode import MemNode

MiB = 1 << 20


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def oserror(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


# --- stat ---------------------------------------------------------------------------------
def test_stat_writable(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    st = os.stat(mnt)
    assert oct(st.st_mode) == oct(0o100600)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert st.st_size == MiB
    assert st.st_blocks == MiB // 512  # nothing allocated: size / 512
    assert st.st_blksize == 1 and st.st_nlink == 1 and st.st_ino == 1
    with open(mnt, "r+b") as f:
        f.write(b"x")
    assert os.stat(mnt).st_blocks == 4096 // 512  # one cluster allocated


def test_stat_read_only(mounted):
    _, mnt, _ = mounted(MiB)
    assert oct(os.stat(mnt).st_mode) == oct(0o100400)


def test_statvfs(mounted):
    _, mnt, _ = mounted(MiB)
    sv = os.statvfs(mnt)
    assert (sv.f_bsize, sv.f_frsize, sv.f_namemax) == (512, 512, 255)
    assert (sv.f_blocks, sv.f_bfree, sv.f_files) == (0, 0, 0)


def test_mount_options(mounted):
    _, mnt, _ = mounted(MiB, writable=True)
    line = next(x for x in open("/proc/self/mountinfo") if f" {mnt} " in x)
    left, right = line.split(" - ")
    assert left.split()[5] == "rw,nosuid,nodev,noatime"
    fstype, source, superopts = right.split()
    assert (fstype, source) == ("fuse", "/dev/fuse")
    assert superopts == (
        f"rw,user_id={os.getuid()},group_id={os.getgid()},default_permissions,"
        "allow_other,max_read=1048576"
    )


def test_mount_read_only_no_allow_other(mounted):
    _, mnt, _ = mounted(MiB, **{"allow-other": "off"})
    line = next(x for x in open("/proc/self/mountinfo") if f" {mnt} " in x)
    assert line.split()[5].startswith("ro,")
    assert "allow_other" not in line


# --- reads and writes at EOF ----------------------------------------------------------------
def test_reads_at_eof(mounted):
    node, mnt, _ = mounted(MiB)
    node.data[:] = os.urandom(MiB)
    fd = os.open(mnt, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 8192) == node.data[8192 : 8192 + 4096]
        assert os.pread(fd, 100, MiB) == b""
        assert os.pread(fd, 100, MiB + 4096) == b""
        assert os.pread(fd, 100, MiB - 10) == node.data[-10:]  # short read
    finally:
        os.close(fd)


def test_writes_at_eof_not_growable(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"a" * 100, MiB - 10) == 10  # straddling: short
        assert node.data[-10:] == b"a" * 10 and len(node.data) == MiB
        assert os.pwrite(fd, b"b" * 100, MiB) == 0  # dd turns this into ENOSPC
    finally:
        os.close(fd)
    out = run("dd", "if=/dev/zero", f"of={mnt}", "bs=1k", "seek=2000", "count=1", "conv=notrunc")
    assert "No space left on device" in out.stderr
    assert os.stat(mnt).st_size == MiB


def test_writes_grow_growable(mounted):
    node, mnt, _ = mounted(MiB, writable=True, growable=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"g" * 1000, MiB + 5000) == 1000
        assert len(node.data) == MiB + 6000
        assert os.fstat(fd).st_size == MiB + 6000
        assert os.pread(fd, 1000, MiB + 5000) == b"g" * 1000
        assert os.pread(fd, 5000, MiB) == bytes(5000)
    finally:
        os.close(fd)


def test_read_only_export_refuses_writes(mounted):
    _, mnt, _ = mounted(MiB)
    assert oserror(os.open, mnt, os.O_RDWR) == errno.EROFS
    assert oserror(os.truncate, mnt, 4096) == errno.EROFS
    assert run("truncate", "-s", "2M", str(mnt)).returncode != 0


def test_large_io_roundtrip(mounted):
    node, mnt, exp = mounted(8 * MiB, writable=True)
    data = os.urandom(3 * MiB + 123)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 777) == len(data)
        assert node.data[777 : 777 + len(data)] == data
        assert os.pread(fd, len(data), 777) == data
    finally:
        os.close(fd)
    assert exp.engine.max_write >= 64 << 10


def test_writethrough_flushes_each_write(mounted):
    node, mnt, _ = mounted(MiB, writable=True, writethrough=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        before = node.flushes
        for i in range(3):
            os.pwrite(fd, b"w", i * 4096)
        assert node.flushes - before == 3
    finally:
        os.close(fd)


def test_fsync_flushes(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        before = node.flushes
        os.fsync(fd)
        os.fdatasync(fd)
        assert node.flushes >= before + 2
    finally:
        os.close(fd)


def test_o_trunc_is_ignored(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    node.data[:4] = b"keep"
    fd = os.open(mnt, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == MiB
    finally:
        os.close(fd)
    assert len(node.data) == MiB and node.data[:4] == b"keep"


MMAP_SCRIPT = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
with mmap.mmap(fd, 16384) as m:
    sys.stdout.write(m[8192:8195].decode())
    m[0:3] = b"abc"
    m.flush()
"""


def test_shared_mmap(mounted):
    # mmap page faults happen with the GIL held: never from the serving process
    node, mnt, _ = mounted(MiB, writable=True)
    node.data[8192:8195] = b"old"
    out = subprocess.run(
        [sys.executable, "-c", MMAP_SCRIPT, str(mnt)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "old"
    assert node.data[:3] == b"abc"


def test_dd_roundtrip(mounted, tmp_path: Path):
    node, mnt, _ = mounted(MiB, writable=True)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(256 * 1024))
    out = run("dd", f"if={src}", f"of={mnt}", "bs=64k", "seek=2", "conv=notrunc", "oflag=direct")
    assert out.returncode == 0, out.stderr
    assert node.data[128 * 1024 : 384 * 1024] == src.read_bytes()


# --- truncate ---------------------------------------------------------------------------------
def test_truncate_not_growable(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    assert run("truncate", "-s", "3M", str(mnt)).returncode == 0
    assert len(node.data) == 3 * MiB and os.stat(mnt).st_size == 3 * MiB
    os.truncate(mnt, MiB // 2)
    assert len(node.data) == MiB // 2 and os.stat(mnt).st_size == MiB // 2


def test_truncate_growable_unaligned(mounted):
    node, mnt, _ = mounted(MiB, writable=True, growable=True)
    os.truncate(mnt, 1000001)
    assert len(node.data) == 1000001 and os.stat(mnt).st_size == 1000001


# --- fallocate ------------------------------------------------------------------------------
def _fill(node: MemNode) -> None:
    node.data[:] = b"\xaa" * len(node.data)
    node.allocated = set(range(len(node.data) // 4096))


def test_punch_hole_discard_ignore(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    _fill(node)
    assert run("fallocate", "-p", "-o", "64K", "-l", "64K", str(mnt)).returncode == 0
    assert node.data[64 * 1024 : 128 * 1024] == bytes(64 * 1024)
    assert node.data[128 * 1024] == 0xAA
    fd = os.open(mnt, os.O_RDONLY)
    try:  # zeroed but still data
        assert os.lseek(fd, 64 * 1024, os.SEEK_HOLE) == MiB
    finally:
        os.close(fd)


def test_punch_hole_discard_unmap(mounted):
    node = MemNode(MiB, discard="unmap")
    _fill(node)
    node, mnt, _ = mounted(node=node, writable=True)
    assert run("fallocate", "-p", "-o", "64K", "-l", "64K", str(mnt)).returncode == 0
    assert node.data[64 * 1024 : 128 * 1024] == bytes(64 * 1024)
    fd = os.open(mnt, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 64 * 1024
        assert os.lseek(fd, 64 * 1024, os.SEEK_DATA) == 128 * 1024
    finally:
        os.close(fd)


def test_zero_range(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    _fill(node)
    assert run("fallocate", "-z", "-o", "4096", "-l", "10000", str(mnt)).returncode == 0
    assert node.data[4096:14096] == bytes(10000)
    assert node.data[4095] == 0xAA and node.data[14096] == 0xAA
    assert len(node.data) == MiB
    # zero-range past EOF without keep-size grows the file
    assert run("fallocate", "-z", "-o", "1M", "-l", "8K", str(mnt)).returncode == 0
    assert len(node.data) == MiB + 8192 and os.stat(mnt).st_size == MiB + 8192


def test_fallocate_mode0(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    out = run("fallocate", "-o", "0", "-l", "4096", str(mnt))
    assert out.returncode != 0 and "Operation not supported" in out.stderr
    fd = os.open(mnt, os.O_RDWR)
    try:  # past EOF grows the file even though the export is not growable
        os.posix_fallocate(fd, MiB, 8192)
        assert os.fstat(fd).st_size == MiB + 8192
        assert len(node.data) == MiB + 8192
    finally:
        os.close(fd)


def fallocate(path: Path, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with an exact mode; returns 0 or the errno (ctypes drops the GIL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        return 0 if libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()
    finally:
        os.close(fd)


KEEP_SIZE, COLLAPSE_RANGE, INSERT_RANGE = 0x01, 0x08, 0x20


@pytest.mark.parametrize("mode", [KEEP_SIZE, COLLAPSE_RANGE, INSERT_RANGE])
def test_fallocate_unsupported_modes(mounted, mode):
    node, mnt, _ = mounted(MiB, writable=True)
    assert fallocate(mnt, mode, 0, 4096) == errno.EOPNOTSUPP
    assert len(node.data) == MiB


# --- lseek ------------------------------------------------------------------------------------
def test_seek_data_hole(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert oserror(os.lseek, fd, 0, os.SEEK_DATA) == errno.ENXIO  # all holes
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        os.pwrite(fd, b"d" * 100, 3 * 4096 + 10)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * 4096
        assert os.lseek(fd, 3 * 4096, os.SEEK_HOLE) == 4 * 4096
        assert oserror(os.lseek, fd, 4 * 4096, os.SEEK_DATA) == errno.ENXIO
        assert os.lseek(fd, MiB - 1, os.SEEK_HOLE) == MiB - 1
    finally:
        os.close(fd)


# --- permissions and the rest -----------------------------------------------------------------
def test_chmod_chown_in_memory(mounted):
    node, mnt, _ = mounted(MiB, writable=True)
    os.chmod(mnt, 0o644)  # allow_other is on (auto, as root): group/other bits allowed
    assert oct(os.stat(mnt).st_mode) == oct(0o100644)
    os.chown(mnt, 1000, 1001)
    st = os.stat(mnt)
    assert (st.st_uid, st.st_gid) == (1000, 1001)


def test_chmod_without_allow_other(mounted):
    _, mnt, _ = mounted(MiB, writable=True, **{"allow-other": "off"})
    assert oserror(os.chmod, mnt, 0o640) == errno.EPERM
    os.chmod(mnt, 0o400)
    assert oct(os.stat(mnt).st_mode) == oct(0o100400)


def test_chmod_read_only_write_bits(mounted):
    _, mnt, _ = mounted(MiB)
    # the kernel refuses any setattr on a ro mount first
    assert oserror(os.chmod, mnt, 0o600) == errno.EROFS


def test_utime_xattr_rename(mounted):
    _, mnt, _ = mounted(MiB, writable=True)
    assert oserror(os.utime, mnt, (1, 1)) == errno.ENOTSUP
    assert oserror(os.setxattr, mnt, "user.x", b"1") == errno.ENOTSUP
    assert oserror(os.getxattr, mnt, "user.x") == errno.ENOTSUP
    assert oserror(os.rename, mnt, str(mnt) + ".x") == errno.EBUSY
    assert oserror(os.unlink, mnt) == errno.EBUSY
