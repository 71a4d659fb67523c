"""Image creation (blockdev-create) by driver, and the ``file`` driver's own.

A creator is a coroutine taking the graph and validated ``BlockdevCreateOptions``; it raises
with QEMU's text on any problem. The ``create`` job (qsd_py/jobs/create.py) runs it.

``file`` creates the host file as QEMU's file driver does: open (creating it, mode 0644),
take the write and resize permissions as lock bytes without sharing resize, empty the file,
set the no-copy-on-write flag and the extent size hint where the file system takes them,
then give it its size (preallocated as asked). The blocking calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd_py.block.drivers.file import lock_fd
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

Creator = Callable[["BlockGraph", dict[str, Any]], Awaitable[None]]

DEFAULT_EXTENT_SIZE_HINT = 1 << 20
UINT32_MAX = (1 << 32) - 1
ZERO_CHUNK = 65536  # QEMU's preallocation=full writes zeroes in 64 KiB writes

# Linux ioctls: inode flags (no copy on write) and the extended attributes (extent size).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_EXTSIZE = 0x00000800
FSXATTR = struct.Struct("=IIIII8x")  # xflags, extsize, nextents, projid, cowextsize


def as_int64(size: int) -> int:
    """A QAPI ``size`` (uint64; QMP's -1 arrives as 2**64-1) as QEMU's drivers use it: an
    int64_t, so that a negative size is refused with their texts."""
    return size - (1 << 64) if size >= 1 << 63 else size


def creator(driver: str) -> Creator | None:
    """The creation coroutine of ``driver``, or None if it creates nothing."""
    if driver == "file":
        return create_file
    if driver == "qcow2":
        from qsd_py.block.qcow2.create import create

        return create
    if driver == "luks":
        from qsd_py.block.crypto.create import create as create_luks

        return create_luks
    return None


async def create_file(graph: BlockGraph, opts: dict[str, Any]) -> None:
    hint = opts.get("extent-size-hint", DEFAULT_EXTENT_SIZE_HINT)
    if hint > UINT32_MAX:
        raise QMPError("Extent size hint is too large")
    await asyncio.to_thread(_create_file, opts, hint)


def _create_file(opts: dict[str, Any], hint: int) -> None:
    filename = opts["filename"]
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise QMPError(f"Could not create '{filename}': {e.strerror}") from None
    try:
        # Write and resize; resize not shared: the file must keep the size given.
        perm, shared = Perm.WRITE | Perm.RESIZE, PERM_ALL & ~Perm.RESIZE
        lock_fd(fd, perm, shared)
        _resize(fd, 0, "off")
        if opts.get("nocow", False):
            _set_nocow(fd)
        _set_extent_size_hint(fd, hint, explicit="extent-size-hint" in opts)
        _resize(fd, as_int64(opts["size"]), opts.get("preallocation", "off"))
    finally:
        os.close(fd)  # lets go of the lock bytes too


def _set_nocow(fd: int) -> None:
    """An optimisation for btrfs; failures do not matter (QEMU ignores them too)."""
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)
        flags = int.from_bytes(buf[:4], sys.byteorder) | FS_NOCOW_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(8, sys.byteorder))
    except OSError:
        pass


def _set_extent_size_hint(fd: int, hint: int, explicit: bool) -> None:
    """Set the hint where the file system takes one (XFS); a failure is only a warning, and
    only when the hint was asked for."""
    try:
        attr = list(FSXATTR.unpack(fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(FSXATTR.size))))
        attr[0] |= FS_XFLAG_EXTSIZE
        attr[1] = hint
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, FSXATTR.pack(*attr))
    except OSError as e:
        if explicit and hint:
            prog = os.path.basename(sys.argv[0]) or "qsd-py"
            print(f"{prog}: warning: Failed to set extent size hint: {e.strerror}", file=sys.stderr)


def _resize(fd: int, size: int, prealloc: str) -> None:
    """Give the file ``size`` bytes, preallocated as QEMU's file driver does."""
    if prealloc in ("falloc", "full"):
        current = os.fstat(fd).st_size
        if size < current:
            raise QMPError("Cannot use preallocation for shrinking files")
    if prealloc == "off":
        _checked(os.ftruncate, "Could not resize file", fd, size)
    elif prealloc == "falloc":
        if size != current:
            what = "Could not preallocate new data"
            _checked(os.posix_fallocate, what, fd, current, size - current)
    elif prealloc == "full":
        _checked(os.ftruncate, "Could not resize file", fd, size)
        _write_zeroes(fd, current, size - current)
    else:
        raise QMPError(f"Unsupported preallocation mode: {prealloc}")


def _write_zeroes(fd: int, offset: int, length: int) -> None:
    zeroes = bytes(ZERO_CHUNK)
    end = offset + length
    while offset < end:
        n = _checked(
            os.pwrite,
            "Could not write zeros for preallocation",
            fd,
            zeroes[: min(ZERO_CHUNK, end - offset)],
            offset,
        )
        offset += n
    _checked(os.fsync, "Could not flush file to disk", fd)


def _checked(func: Callable[..., Any], what: str, *args: Any) -> Any:
    try:
        return func(*args)
    except OSError as e:
        raise QMPError(f"{what}: {e.strerror}") from None
