"""librados' and librbd's C API through ctypes: the cluster, the pool and the image handle
the ``rbd`` driver opens, and its asynchronous I/O.

Why not Ceph's Python bindings (python3-rados/python3-rbd)? Their ``aio_*`` calls take a
Python callback that librbd runs on its own threads (each takes the GIL, then the result
must hop to the loop), a read comes back as a new ``bytes`` to copy, and they offer no way
to librbd's event socket (``rbd_set_image_notification``/``rbd_poll_io_events``), nor the
``rbd_image_t``/``rados_ioctx_t`` underneath to call the C API on the same handle. One
process must not write an image through two handles (RBD's exclusive lock would move
between them on every write), so the whole chain, cluster to image, is opened here.

I/O as QEMU's driver places it: a completion without callback; librbd signals an eventfd
(made per image) when completions are ready; the owning asyncio loop watches it and collects
them with ``rbd_poll_io_events``. No librbd thread ever runs Python. Reads land straight in
the caller's buffer and writes leave from it; librbd owns those buffers until the request
completes, so a request whose waiter is cancelled is still waited for (:meth:`Image.io`).

Calls other than the ``aio`` ones block on the network: callers run them off the loop. ctypes
releases the GIL around every foreign call.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from qsd_py.errors import QMPError

log = logging.getLogger("qsd_py.block.rbd")

_vp = ctypes.c_void_p
_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_int = ctypes.c_int
_str = ctypes.c_char_p

# Facts of librbd.h (Ceph 16.2).
FEATURE_FAST_DIFF = 1 << 4
FLAG_FAST_DIFF_INVALID = 1 << 1
WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0
_EVENT_TYPE_EVENTFD = 2
# QEMU's request kinds, which its failure message names by number.
CMD_READ, CMD_WRITE, CMD_DISCARD, CMD_FLUSH, CMD_WRITE_ZEROES = range(5)
#: Completions collected per ``rbd_poll_io_events`` call.
_POLL_BATCH = 64

#: librbd's diff-iterate callback: (offset, length, exists, arg) -> 0 to go on.
DiffCallback = ctypes.CFUNCTYPE(_int, _u64, _size, _int, _vp)


class _ImageInfo(ctypes.Structure):
    """``rbd_image_info_t`` (its whole size is passed to ``rbd_stat``)."""

    _fields_ = [
        ("size", _u64),
        ("obj_size", _u64),
        ("num_objs", _u64),
        ("order", _int),
        ("block_name_prefix", ctypes.c_char * 24),
        ("parent_pool", ctypes.c_int64),
        ("parent_name", ctypes.c_char * 96),
    ]


class _SnapInfo(ctypes.Structure):
    """``rbd_snap_info_t``."""

    _fields_ = [("id", _u64), ("size", _u64), ("name", _str)]


# name: argtypes; the result is an int unless _RESTYPES says otherwise.
_RADOS = {
    "rados_create": [ctypes.POINTER(_vp), _str],
    "rados_conf_read_file": [_vp, _str],
    "rados_conf_set": [_vp, _str, _str],
    "rados_connect": [_vp],
    "rados_ioctx_create": [_vp, _str, ctypes.POINTER(_vp)],
    "rados_ioctx_set_namespace": [_vp, _str],
    "rados_ioctx_destroy": [_vp],
    "rados_shutdown": [_vp],
}
_RBD = {
    "rbd_namespace_exists": [_vp, _str, ctypes.POINTER(ctypes.c_bool)],
    "rbd_open": [_vp, _str, ctypes.POINTER(_vp), _str],
    "rbd_open_read_only": [_vp, _str, ctypes.POINTER(_vp), _str],
    "rbd_close": [_vp],
    "rbd_stat": [_vp, ctypes.POINTER(_ImageInfo), _size],
    "rbd_get_features": [_vp, ctypes.POINTER(_u64)],
    "rbd_get_flags": [_vp, ctypes.POINTER(_u64)],
    "rbd_snap_list": [_vp, ctypes.POINTER(_SnapInfo), ctypes.POINTER(_int)],
    "rbd_snap_list_end": [ctypes.POINTER(_SnapInfo)],
    "rbd_resize": [_vp, _u64],
    "rbd_diff_iterate2": [_vp, _str, _u64, _u64, ctypes.c_uint8, ctypes.c_uint8, DiffCallback, _vp],
    "rbd_set_image_notification": [_vp, _int, _int],
    "rbd_poll_io_events": [_vp, ctypes.POINTER(_vp), _int],
    "rbd_aio_create_completion": [_vp, _vp, ctypes.POINTER(_vp)],
    "rbd_aio_get_return_value": [_vp],
    "rbd_aio_release": [_vp],
    "rbd_aio_read": [_vp, _u64, _size, _vp, _vp],
    "rbd_aio_write": [_vp, _u64, _size, _vp, _vp],
    "rbd_aio_discard": [_vp, _u64, _u64, _vp],
    "rbd_aio_write_zeroes": [_vp, _u64, _size, _vp, _int, _int],
    "rbd_aio_flush": [_vp, _vp],
}
_RESTYPES = {
    "rbd_aio_get_return_value": ctypes.c_ssize_t,
    "rados_ioctx_destroy": None,
    "rados_shutdown": None,
    "rbd_aio_release": None,
    "rados_ioctx_set_namespace": None,
}


class _Libs:
    """librados.so.2 and librbd.so.1 with their functions' C types declared."""

    def __init__(self) -> None:
        try:
            rados = ctypes.CDLL("librados.so.2")
            rbd = ctypes.CDLL("librbd.so.1")
        except OSError as err:
            raise QMPError(
                f"The rbd driver needs Ceph's libraries ({err}): apt-get install librbd1"
            ) from err
        for lib, table in ((rados, _RADOS), (rbd, _RBD)):
            for name, argtypes in table.items():
                fn = getattr(lib, name)
                fn.argtypes = argtypes
                fn.restype = _RESTYPES.get(name, _int)
                setattr(self, name, fn)


_libs: _Libs | None = None


def libs() -> Any:
    """The loaded libraries (loaded on first use; a QMPError names the package if absent)."""
    global _libs
    if _libs is None:
        _libs = _Libs()
    return _libs


def check(ret: int) -> int:
    """A librados/librbd return value: negative is ``-errno``."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def _cstr(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


class Cluster:
    """A ``rados_t``: made, configured and connected (blocking calls)."""

    def __init__(self, user: str | None) -> None:
        self.lib = libs()
        self.handle = _vp()
        check(self.lib.rados_create(ctypes.byref(self.handle), _cstr(user)))

    def conf_read_file(self, path: str | None) -> None:
        """Read ``path`` (None: Ceph's default places)."""
        check(self.lib.rados_conf_read_file(self.handle, _cstr(path)))

    def conf_set(self, key: str, value: str) -> None:
        check(self.lib.rados_conf_set(self.handle, key.encode(), value.encode()))

    def connect(self) -> None:
        check(self.lib.rados_connect(self.handle))

    def open_ioctx(self, pool: str) -> Ioctx:
        ioctx = _vp()
        check(self.lib.rados_ioctx_create(self.handle, pool.encode(), ctypes.byref(ioctx)))
        return Ioctx(self.lib, ioctx)

    def shutdown(self) -> None:
        self.lib.rados_shutdown(self.handle)


class Ioctx:
    """A ``rados_ioctx_t`` (a pool, and a namespace in it)."""

    def __init__(self, lib: Any, handle: ctypes.c_void_p) -> None:
        self.lib = lib
        self.handle = handle

    def namespace_exists(self, name: str) -> bool:
        exists = ctypes.c_bool()
        check(self.lib.rbd_namespace_exists(self.handle, name.encode(), ctypes.byref(exists)))
        return exists.value

    def set_namespace(self, name: str) -> None:
        self.lib.rados_ioctx_set_namespace(self.handle, name.encode())

    def close(self) -> None:
        self.lib.rados_ioctx_destroy(self.handle)


class Image:
    """An ``rbd_image_t`` and its event socket. The blocking calls (open, stat, resize,
    diff iterate, close) may run on any thread; :meth:`io` runs on one asyncio loop."""

    def __init__(self, ioctx: Ioctx, name: str, snapshot: str | None, read_only: bool) -> None:
        self.lib = lib = ioctx.lib
        self.handle = _vp()
        opener = lib.rbd_open_read_only if read_only else lib.rbd_open
        check(opener(ioctx.handle, name.encode(), ctypes.byref(self.handle), _cstr(snapshot)))
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            check(lib.rbd_set_image_notification(self.handle, self.efd, _EVENT_TYPE_EVENTFD))
        except OSError:
            self.close()
            raise
        # completion -> (the request's future or Transfer, what must live until it is done)
        self._pending: dict[int, tuple[asyncio.Future[int] | Transfer, Any]] = {}
        # the loops watching the event socket: every loop that has done I/O on the image
        self._watchers: set[asyncio.AbstractEventLoop] = set()

    # --- blocking calls ---------------------------------------------------------------------
    def stat(self) -> tuple[int, int]:
        """(size, object size)."""
        info = _ImageInfo()
        check(self.lib.rbd_stat(self.handle, ctypes.byref(info), ctypes.sizeof(info)))
        return info.size, info.obj_size

    def features(self) -> int:
        return self._u64_of(self.lib.rbd_get_features)

    def flags(self) -> int:
        return self._u64_of(self.lib.rbd_get_flags)

    def _u64_of(self, fn: Callable[..., int]) -> int:
        value = _u64()
        check(fn(self.handle, ctypes.byref(value)))
        return value.value

    def list_snaps(self) -> list[dict[str, Any]]:
        """The snapshots as ``{"id", "size", "name"}`` (``rbd_snap_list`` asks for a larger
        array with -ERANGE)."""
        room = 16
        while True:
            arr = (_SnapInfo * room)()
            n = _int(room)
            ret = self.lib.rbd_snap_list(self.handle, arr, ctypes.byref(n))
            if ret == -errno.ERANGE:
                room = max(n.value, room * 2)
                continue
            check(ret)
            snaps = [
                {"id": s.id, "size": s.size, "name": (s.name or b"").decode()} for s in arr[:ret]
            ]
            self.lib.rbd_snap_list_end(arr)
            return snaps

    def resize(self, size: int) -> None:
        check(self.lib.rbd_resize(self.handle, size))

    def diff_iterate(
        self, offset: int, length: int, extent: Callable[[int, int, bool], int]
    ) -> int:
        """librbd's diff iterate from the image's creation over ``[offset, +length)``, whole
        objects, parents included; ``extent(offset, length, exists)`` returns non-zero to
        stop, which is what this returns then (negative returns are librbd's errors)."""

        def call(off: int, n: int, exists: int, _arg: Any) -> int:
            return extent(off, n, bool(exists))

        cb = DiffCallback(call)
        return self.lib.rbd_diff_iterate2(self.handle, None, offset, length, 1, 1, cb, None)

    def close(self) -> None:
        """Close the image and its event socket. librbd finishes the requests in flight
        first; their completions can no longer be collected then, so their waiters get EIO
        (the buffers are librbd's no more)."""
        watchers, self._watchers = self._watchers, set()
        for loop in watchers:
            if not loop.is_closed():
                loop.remove_reader(self.efd)
        self.lib.rbd_close(self.handle)
        os.close(self.efd)
        pending, self._pending = self._pending, {}
        _hand_over([(waiter, -errno.EIO) for waiter, _keep in pending.values()])

    # --- asynchronous I/O -------------------------------------------------------------------
    def transfer(self, callback: Callable[[int], object]) -> Transfer:
        """A reusable :class:`Transfer` reporting to ``callback`` on the running loop: what
        the exports' fast road (qsd_py/block/fast_io.py) starts a READ or WRITE with."""
        return Transfer(self, callback)

    def _start(
        self,
        waiter: asyncio.Future[int] | Transfer,
        fn: Callable[..., int],
        args: tuple[Any, ...],
        keep: Any,
    ) -> int:
        """Hand ``fn(image, *args, completion)`` to librbd, ``waiter`` to be told its
        result by :meth:`_collect`; return the completion, or raise OSError if librbd
        refused it. The request is known as pending before librbd has it: another
        thread's loop may collect its completion at once."""
        loop = waiter.loop if type(waiter) is Transfer else waiter.get_loop()
        if loop not in self._watchers:
            self._watch_from(loop)
        lib = self.lib
        out = _vp()
        lib.rbd_aio_create_completion(None, None, ctypes.byref(out))  # always 0
        comp = out.value
        assert comp is not None
        self._pending[comp] = (waiter, keep)
        ret = -errno.EINVAL
        try:
            ret = fn(self.handle, *args, comp)
        finally:
            if ret < 0:  # librbd did not take it
                del self._pending[comp]
                lib.rbd_aio_release(comp)
        check(ret)
        return comp

    async def io(
        self, fn: Callable[..., int], *args: Any, keep: Any = None, tail: tuple[int, ...] = ()
    ) -> int:
        """Start ``fn(image, *args, completion, *tail)`` (one of librbd's ``rbd_aio_*``) and
        wait for its result (a negative errno raises OSError). ``keep`` (the buffer) lives
        until librbd is done with it: if the waiter is cancelled meanwhile, this still waits
        for the completion before the cancellation goes on, since librbd may yet read or
        write the buffer."""
        fut = asyncio.get_running_loop().create_future()
        call = (lambda *a: fn(*a, *tail)) if tail else fn
        comp = self._start(fut, call, args, keep)
        try:
            return check(await fut)
        except asyncio.CancelledError:
            await self._outlive(comp)
            raise

    async def _outlive(self, comp: int) -> None:
        """Wait until librbd has completed ``comp`` (the collector has taken it out of the
        pending requests), whatever cancels the waiter again. Rare: a poll every ms."""
        while comp in self._pending:
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                continue

    def _watch_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the event socket from ``loop`` too. Each loop that does I/O on the image
        watches it until it is closed, so a loop with requests in flight always wakes for
        them; whichever loop reads the eventfd first collects every ready completion and
        hands the other loops' results over (one node used from the main loop and an
        iothread; the main loop alone in the common case)."""
        self._watchers = {w for w in self._watchers if not w.is_closed()}
        loop.add_reader(self.efd, self._collect, loop)
        self._watchers.add(loop)

    def _collect(self, here: asyncio.AbstractEventLoop) -> None:
        """The event socket is readable: settle every completion librbd has ready (on this
        loop directly; another loop's in one hand-over per batch)."""
        try:
            os.read(self.efd, 8)
        except BlockingIOError:
            return
        lib, pending = self.lib, self._pending
        batch = (_vp * _POLL_BATCH)()  # one per call: two loops' threads may collect at once
        foreign: list[tuple[asyncio.Future[int] | Transfer, int]] = []
        while n := lib.rbd_poll_io_events(self.handle, batch, _POLL_BATCH):
            if n < 0:
                break
            for comp in batch[:n]:
                ret = lib.rbd_aio_get_return_value(comp)
                lib.rbd_aio_release(comp)
                entry = pending.pop(comp, None)
                if entry is None:
                    continue
                waiter = entry[0]
                if type(waiter) is Transfer:
                    if waiter.loop is here:
                        waiter.finish(ret)
                    else:
                        foreign.append((waiter, ret))
                elif waiter.get_loop() is here:
                    if not waiter.done():
                        waiter.set_result(ret)
                else:
                    foreign.append((waiter, ret))
        if foreign:
            _hand_over(foreign)


class Transfer:
    """One READ or WRITE at a time between librbd and a caller's memory, then
    ``callback(res)`` on the loop that made it: the exports' fast road to an RBD image, with
    the signature and results of the file transfers it stands beside (``uring_aio.
    UringTransfer``, ``aio.ThreadTransfer``): bytes done (a read short of the image's end
    has the rest zeroed), or ``-errno``. No Task, future nor coroutine per request: the
    image's collector calls it back. Reusable: keep one per in-flight slot."""

    __slots__ = (
        "image", "callback", "loop", "offset", "length", "addr", "reading", "_read", "_write"
    )  # fmt: skip

    def __init__(self, image: Image, callback: Callable[[int], object]) -> None:
        self.image = image
        self.callback = callback
        self.loop = asyncio.get_running_loop()
        self.offset = self.length = self.addr = 0
        self.reading = False
        self._read = image.lib.rbd_aio_read
        self._write = image.lib.rbd_aio_write

    def read(self, fd: int, addr: int, length: int, offset: int, ring: object = None) -> None:
        """Read ``length`` bytes at image ``offset`` into the memory at ``addr`` (valid until
        the callback ran; ``fd`` and ``ring`` are the file transfers' and unused)."""
        self.reading = True
        self._go(self._read, addr, length, offset)

    def write(self, fd: int, addr: int, length: int, offset: int, ring: object = None) -> None:
        """Write ``length`` bytes at image ``offset`` from the memory at ``addr``."""
        self.reading = False
        self._go(self._write, addr, length, offset)

    def _go(self, fn: Callable[..., int], addr: int, length: int, offset: int) -> None:
        self.offset, self.length, self.addr = offset, length, addr
        try:
            self.image._start(self, fn, (offset, length, addr), None)
        except OSError as err:  # refused at once: the callback still runs on the loop
            self.loop.call_soon(self.callback, -(err.errno or errno.EIO))

    def finish(self, ret: int) -> None:
        """librbd is done: ``ret`` is ``-errno`` (reported as QEMU's driver does), or the
        bytes read (the rest of the buffer reads as zeroes), or 0 for a write that wrote
        everything."""
        if ret >= 0:
            if self.reading and ret < self.length:
                ctypes.memset(self.addr + ret, 0, self.length - ret)
            ret = self.length
        else:
            report_failure(CMD_READ if self.reading else CMD_WRITE, self.offset, self.length, -ret)
        try:
            self.callback(ret)
        except Exception:  # a bug of the caller's: the batch's other completions go on
            log.exception("rbd: a transfer's callback failed")


def report_failure(cmd: int, offset: int, length: int, err: int) -> None:
    """A request librbd failed, on stderr as QEMU's driver reports it (``cmd``: its request
    kinds, :data:`CMD_READ`...)."""
    print(
        f"qsd-py: rbd request failed: cmd {cmd} offset {offset} bytes {length} "
        f"flags 0 task.ret {-err} ({os.strerror(err)})",
        file=sys.stderr,
        flush=True,
    )


def _hand_over(results: list[tuple[asyncio.Future[int] | Transfer, int]]) -> None:
    """Settle waiters from any thread: each loop gets its share in one thread-safe call."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, int]]] = {}
    for waiter, ret in results:
        loop = waiter.loop if type(waiter) is Transfer else waiter.get_loop()
        by_loop.setdefault(loop, []).append((waiter, ret))
    for loop, share in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, share)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _settle(share: list[tuple[asyncio.Future[int] | Transfer, int]]) -> None:
    for waiter, ret in share:
        if type(waiter) is Transfer:
            waiter.finish(ret)
        elif not waiter.done():
            waiter.set_result(ret)


def buffer_address(buf: Any) -> tuple[int, Any]:
    """The address of a buffer's first byte and the object that keeps it exported (valid
    and unmoved) while librbd uses it: a writable buffer in place, ``bytes`` as they are,
    any other read-only buffer copied once."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), _vp).value or 0, buf
    mv = memoryview(buf)
    if mv.readonly or not mv.contiguous:
        data = mv.tobytes()
        return ctypes.cast(ctypes.c_char_p(data), _vp).value or 0, data
    anchor = ctypes.c_char.from_buffer(mv)
    return ctypes.addressof(anchor), anchor
