"""I/O backends: how a file node turns its requests into syscalls without blocking a loop.

A backend is one shared object per ``aio=`` mode. The file node calls it from whatever
asyncio loop it runs on (the main loop or an iothread's). ``aio=threads`` is
:class:`ThreadPoolBackend`; ``aio=io_uring`` is qsd_py/block/uring_aio.py, registered by
name like any other (:func:`register_backend`) and imported on first use. Backends move data
straight between the fd and the caller's buffer: no copies.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# QEMU's thread pool grows to 64 workers; so does ours.
MAX_WORKERS = 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate only knows mode 0)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``, retrying short reads; bytes past EOF read as zeroes."""
    while buf:
        n = os.preadv(fd, (buf,), offset)
        if n == 0:
            buf[:] = bytes(len(buf))
            return
        buf = buf[n:]
        offset += n


def pwrite_full(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset``, retrying short writes."""
    while buf:
        n = os.pwritev(fd, (buf,), offset)
        if n == 0:
            raise OSError(28, os.strerror(28))  # ENOSPC: the fs took nothing
        buf = buf[n:]
        offset += n


class IOBackend(Protocol):
    """What the file node asks of an ``aio=`` backend. All coroutines, awaitable from any
    loop; errors are OSError with the syscall's errno."""

    async def read(self, fd: int, buf: memoryview, offset: int) -> None: ...

    async def write(self, fd: int, buf: memoryview, offset: int) -> None: ...

    async def fdatasync(self, fd: int) -> None: ...

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None: ...

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Any other blocking call (ftruncate, lseek, fstat, bounce-buffer paths)."""
        ...

    def check_usable(self) -> str | None:
        """Called on the opening node's loop: None if usable, else the error for the user."""
        ...


class ThreadPoolBackend:
    """``aio=threads``: each request runs its whole syscall loop in one pool thread."""

    def __init__(self, max_workers: int = MAX_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="qsd-aio")

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def read(self, fd: int, buf: memoryview, offset: int) -> None:
        await self.run(pread_full, fd, buf, offset)

    async def write(self, fd: int, buf: memoryview, offset: int) -> None:
        await self.run(pwrite_full, fd, buf, offset)

    async def fdatasync(self, fd: int) -> None:
        await self.run(os.fdatasync, fd)

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        await self.run(fallocate, fd, mode, offset, length)

    def check_usable(self) -> str | None:
        return None


def _io_uring_backend() -> IOBackend:
    """Imported on first use: processes that never ask for aio=io_uring never load it."""
    from qsd_py.block.uring_aio import IoUringBackend

    return IoUringBackend()


# --- backend registry: the seam for aio=io_uring (and native) ------------------------------
_factories: dict[str, Callable[[], IOBackend]] = {
    "threads": ThreadPoolBackend,
    "io_uring": _io_uring_backend,
}
_backends: dict[str, IOBackend] = {}
_lock = threading.Lock()


def register_backend(aio: str, factory: Callable[[], IOBackend]) -> None:
    """Make ``aio=<aio>`` available (qsd_py/uring registers "io_uring" here)."""
    with _lock:
        _factories[aio] = factory
        _backends.pop(aio, None)


def get_backend(aio: str) -> IOBackend | None:
    """The shared backend for ``aio``, created on first use; None if not available."""
    with _lock:
        backend = _backends.get(aio)
        if backend is None and aio in _factories:
            backend = _backends[aio] = _factories[aio]()
        return backend
