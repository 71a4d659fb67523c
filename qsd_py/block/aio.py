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
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# QEMU's thread pool grows to 64 workers; so does ours.
MAX_WORKERS = 64
# The callback pool (FUSE fast path) stays small: every worker needs the GIL twice per request,
# and measured on 2 vCPUs (tmpfs and virtio disk, 4 KiB at QD32) 4 workers served 47-51k IOPS,
# 16 workers 36-38k, one per request in flight 36k. Deep queues on slow disks want
# aio=io_uring instead.
CALLBACK_WORKERS = max(4, 2 * (os.cpu_count() or 1))

# The process's own symbols (libc among them), as mount.py and ring.py do: find_library would
# import ctypes.util and run ldconfig at every start-up.
_libc = ctypes.CDLL(None, use_errno=True)
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


_libc.pread.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
_libc.pread.restype = ctypes.c_ssize_t
_libc.pwrite.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
_libc.pwrite.restype = ctypes.c_ssize_t
_c_pread = _libc.pread
_c_pwrite = _libc.pwrite
_memset = ctypes.memset
_get_errno = ctypes.get_errno
_EINTR = 4
_ENOSPC = 28
MAX_CHUNK = 1 << 30


class ThreadTransfer:
    """One read or write at a time in a pool thread, then ``callback(res)`` on the loop that
    created the transfer: the ``aio=threads`` twin of ``uring_aio.UringTransfer``, with the
    same signature and result (bytes done, a read short only at EOF with the rest zeroed, a
    write that makes no progress ``-ENOSPC``, or ``-errno``).

    Why not ``run_in_executor``: that costs a concurrent Future, an asyncio Future chained
    to it, a Task awaiting it and one self-pipe write per request. Here the transfer object
    itself is the work item, the syscalls are ctypes calls (the GIL is released during them),
    and completions reach the loop in batches: one ``call_soon_threadsafe`` wakes it for all
    the completions that pile up before it runs. Reusable: keep one per in-flight slot."""

    __slots__ = ("callback", "_done_q", "_loop", "_write", "_fd", "_addr", "_len", "_off", "res")

    def __init__(self, pool: _CallbackPool, callback: Callable[[int], object]) -> None:
        self.callback = callback
        self._done_q = pool.completions_for(asyncio.get_running_loop())
        self._write = False
        self._fd = self._addr = self._len = self._off = self.res = 0

    def read(self, fd: int, addr: int, length: int, offset: int, ring: object = None) -> None:
        """Read ``length`` bytes at ``offset`` into the memory at ``addr`` (kept valid by
        the caller until the callback ran)."""
        self._start(False, fd, addr, length, offset)

    def write(self, fd: int, addr: int, length: int, offset: int, ring: object = None) -> None:
        """Write ``length`` bytes at ``offset`` from the memory at ``addr``."""
        self._start(True, fd, addr, length, offset)

    def _start(self, write: bool, fd: int, addr: int, length: int, offset: int) -> None:
        self._write = write
        self._fd = fd
        self._addr = addr
        self._len = length
        self._off = offset
        self._done_q.pool.put(self)

    def run(self) -> None:
        """In a pool thread: the whole syscall loop."""
        fd, addr, length, off = self._fd, self._addr, self._len, self._off
        call = _c_pwrite if self._write else _c_pread
        done = 0
        while done < length:
            n = call(fd, addr + done, min(length - done, MAX_CHUNK), off + done)
            if n > 0:
                done += n
                continue
            if n == 0:
                if self._write:
                    done = -_ENOSPC
                else:  # EOF: the rest reads as zeroes
                    _memset(addr + done, 0, length - done)
                break
            err = _get_errno()
            if err != _EINTR:
                done = -err
                break
        self.res = done


class _Completions:
    """Completed transfers of one loop, handed over in batches."""

    def __init__(self, pool: _CallbackPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.done: deque[ThreadTransfer | _Call] = deque()
        self.signalled = False

    def push(self, t: ThreadTransfer | _Call) -> None:
        """In a pool thread. Wake the loop only if no wake-up is pending already."""
        self.done.append(t)
        if not self.signalled:
            self.signalled = True
            try:
                self.loop.call_soon_threadsafe(self.drain)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                pass

    def drain(self) -> None:
        """On the loop: run the callbacks of everything completed so far."""
        self.signalled = False  # from here on a new completion schedules another drain
        done = self.done
        while done:
            t = done.popleft()
            t.callback(t.res)


class _CallbackPool:
    """Worker threads serving :class:`ThreadTransfer` and :class:`_Call` work items. Workers
    are added while every one is busy, up to ``max_workers``, as QEMU's pool grows; they live
    as long as the process (daemon threads)."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._queue: SimpleQueue[ThreadTransfer | _Call] = SimpleQueue()
        self._workers = 0
        self._idle = 0
        self._mutex = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Completions] = (
            weakref.WeakKeyDictionary()
        )

    def completions_for(self, loop: asyncio.AbstractEventLoop) -> _Completions:
        with self._mutex:
            c = self._loops.get(loop)
            if c is None:
                c = self._loops[loop] = _Completions(self, loop)
            return c

    def put(self, t: ThreadTransfer | _Call) -> None:
        with self._mutex:
            spawn = self._idle <= 0 and self._workers < self.max_workers
            if spawn:
                self._workers += 1
            else:
                self._idle -= 1
        if spawn:
            threading.Thread(target=self._work, name="qsd-aio-cb", daemon=True).start()
        self._queue.put(t)

    def _work(self) -> None:
        get = self._queue.get
        mutex = self._mutex
        while True:
            t = get()
            t.run()
            with mutex:
                self._idle += 1  # before the hand-over: the loop may reuse t at once
            t._done_q.push(t)


class _Call:
    """``func(*args)`` in a pool thread as a work item of :class:`_CallbackPool`, its result
    or exception handed to an asyncio future on the loop that asked (see
    :meth:`ThreadPoolBackend.run`)."""

    __slots__ = ("_done_q", "_func", "_args", "_fut", "res", "_exc")

    def __init__(
        self, pool: _CallbackPool, func: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        loop = asyncio.get_running_loop()
        self._done_q = pool.completions_for(loop)
        self._func = func
        self._args = args
        self._fut: asyncio.Future[Any] = loop.create_future()
        self.res: Any = None
        self._exc: BaseException | None = None

    def run(self) -> None:
        """In a pool thread."""
        try:
            self.res = self._func(*self._args)
        except BaseException as e:  # handed to the awaiting coroutine, as an executor would
            self._exc = e

    def callback(self, res: Any) -> None:
        """On the loop. A cancelled waiter no longer wants the result."""
        fut = self._fut
        if fut.cancelled():
            return
        if self._exc is not None:
            fut.set_exception(self._exc)
        else:
            fut.set_result(res)


class ThreadPoolBackend:
    """``aio=threads``: each request runs its whole syscall loop in one pool thread.

    Two pools of the same kind: one grows to QEMU's 64 workers for the coroutine calls
    (flushes, truncates, bounce buffers: they may block for long), one stays small for the
    FUSE fast path's :class:`ThreadTransfer` objects. A pool counts a worker idle before it
    hands a result over, so sequential calls always reuse one worker (a
    ``ThreadPoolExecutor`` may start another when the caller is quicker than its worker)."""

    def __init__(self, max_workers: int = MAX_WORKERS) -> None:
        self._call_pool = _CallbackPool(max_workers)
        self._cb_pool: _CallbackPool | None = None

    def transfer(self, callback: Callable[[int], object]) -> ThreadTransfer:
        """A reusable :class:`ThreadTransfer` reporting to ``callback`` on the running loop
        (one per in-flight slot, e.g. per FUSE ring entry)."""
        pool = self._cb_pool
        if pool is None:
            pool = self._cb_pool = _CallbackPool(CALLBACK_WORKERS)
        return ThreadTransfer(pool, callback)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        call = _Call(self._call_pool, func, args)
        self._call_pool.put(call)
        return await call._fut

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
