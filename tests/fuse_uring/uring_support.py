"""Helpers for FUSE-over-io_uring tests: the in-process export host, direct I/O on a mount
and the export's counters.

:class:`UringServer` hosts exports on an asyncio loop in a thread of the test process (the
daemon's side, with a real BlockGraph over image files under tmp_path); the test thread does
the file I/O through the real mount, or runs fio/dd subprocesses, so the serving loop never
touches the mount.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
from pathlib import Path
from typing import Any

from export_host import ExportHost

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


#: 4 KiB random writes at QD16 x 2 jobs, each on its own 16 MiB half, then crc32c verification.
FIO_VERIFY_32M = (
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=16",
    "--numjobs=2",
    "--size=16M",
    "--offset_increment=16M",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
)


def fio_argv(mnt: Path, *args: str) -> list[str]:
    """fio with direct I/O through io_uring on the file ``mnt``, plus ``args``."""
    return ["fio", "--name=j", f"--filename={mnt}", "--direct=1", "--ioengine=io_uring", *args]


def run_fio(mnt: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run :func:`fio_argv` to completion in ``mnt``'s directory (fio drops verify state
    files in its cwd)."""
    return subprocess.run(
        fio_argv(mnt, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=mnt.parent,
    )


class UringServer(ExportHost):
    """The export host, plus image files and file-backed nodes under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__("fuse-uring-server")
        self.tmp_path = tmp_path
        self._nodes = 0

    def image(self, size: int = 8 << 20, data: bytes = b"", name: str | None = None) -> Path:
        """A raw image file under tmp_path."""
        path = self.tmp_path / (name or f"img{self._nodes}.raw")
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(size)
        return path

    def node(self, image: Path, **opts: Any) -> Any:
        """A ``raw`` node over a ``file`` node on ``image``."""
        self._nodes += 1
        spec = {
            "driver": "raw",
            "node-name": f"n{self._nodes}",
            "file": {"driver": "file", "filename": str(image), **opts},
        }
        return self.run(self.daemon.graph.add(spec))


def aligned(size: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT wants."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


def pread_direct(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(size)
        n = os.preadv(fd, [memoryview(buf)[:size]], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def pwrite_direct(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = aligned(len(data))
        buf[: len(data)] = data
        assert os.pwritev(fd, [memoryview(buf)[: len(data)]], offset) == len(data)
    finally:
        os.close(fd)


def fallocate(path: Path, mode: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def uring_totals(stats: dict[str, Any]) -> dict[str, int]:
    """Sums of the io_uring queues' counters."""
    keys = ("requests", "bytes-read", "bytes-written", "in-flight", "errors")
    return {k: sum(q[k] for q in stats["uring-queues"]) for k in keys}


def devfuse_totals(stats: dict[str, Any]) -> dict[str, int]:
    """Sums of the /dev/fuse queues' counters."""
    keys = ("requests", "bytes-read", "bytes-written")
    return {k: sum(q[k] for q in stats["queues"]) for k in keys}


def fuse_fds() -> int:
    """Open fds of this process (for leak checks)."""
    return len(os.listdir("/proc/self/fd"))
