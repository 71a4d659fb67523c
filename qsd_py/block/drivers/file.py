"""The ``file`` driver: a host file (or block device) behind an I/O backend.

Requests go to the ``aio=`` backend (qsd_py/block/aio.py) straight from and into the
caller's buffer. With ``cache.direct`` (O_DIRECT) a request whose offset, length or buffer
address is not aligned goes through an aligned bounce buffer instead, as QEMU does.
Permissions become OFD lock bytes at QEMU's offsets, so QEMU and qsd-py see each other.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from typing import TYPE_CHECKING, Any

from qsd_py.block import aio
from qsd_py.block.fast_map import FastTarget
from qsd_py.block.node import (
    STATUS_DATA,
    STATUS_OFFSET_VALID,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
    Buffer,
    round_to_sectors,
)
from qsd_py.block.perm import PERM_NAMES, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

# QEMU's lock layout: byte 100+bit means "I use perm bit", 200+bit "I do not share it".
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
F_OFD_GETLK = 36
F_OFD_SETLK = 37
FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid

# Unaligned O_DIRECT requests are bounced; the zero-writing fallback reuses one zero buffer.

#: Largest request copied right away on the calling loop from or to a file held in memory
#: (see held_in_memory): at 128 KiB the copy and io-wq measured the same, at 1 MiB io-wq was
#: 25% faster (tmpfs, QD4). The exports' fast path uses the same bound.
INLINE_MAX = 128 * 1024

# File systems whose files are page cache only (statfs f_type): tmpfs (/dev/shm), ramfs.
MEMORY_FS_MAGIC = (0x01021994, 0x858458F6)
_STATFS_SIZE = 120  # struct statfs on 64-bit Linux; f_type is its first long
_libc = ctypes.CDLL(None, use_errno=True)


def _lock_byte(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One OFD lock call on a single byte; returns the ``l_type`` the kernel answered."""
    res = fcntl.fcntl(fd, cmd, FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return FLOCK.unpack(res)[0]


def lock_bytes(perm: Perm, shared: Perm) -> set[int]:
    """The lock bytes that say ``perm`` is used and what outside ``shared`` is not shared."""
    want = {LOCK_PERM_BASE + i for i, (bit, _) in enumerate(PERM_NAMES) if perm & bit}
    unshared = {LOCK_SHARED_BASE + i for i, (bit, _) in enumerate(PERM_NAMES) if not shared & bit}
    return want | unshared


def check_lock_bytes(fd: int, perm: Perm, shared: Perm) -> None:
    """Refuse (QEMU's text) when another open file description's locks conflict."""
    for i, (bit, name) in enumerate(PERM_NAMES):
        if perm & bit and _held_by_other(fd, LOCK_SHARED_BASE + i):
            raise QMPError(f'Failed to get "{name}" lock')
    for i, (bit, name) in enumerate(PERM_NAMES):
        if not shared & bit and _held_by_other(fd, LOCK_PERM_BASE + i):
            raise QMPError(f'Failed to get shared "{name}" lock')


def lock_fd(fd: int, perm: Perm, shared: Perm) -> None:
    """Lock bytes for ``perm``/``shared`` on a bare fd (image creation), then check them."""
    for byte in sorted(lock_bytes(perm, shared)):
        _lock_byte(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
    check_lock_bytes(fd, perm, shared)


def _held_by_other(fd: int, byte: int) -> bool:
    """Our own OFD locks never conflict with a test through the same description."""
    return _lock_byte(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _address(buf: memoryview) -> int | None:
    """The address of a writable buffer (None for read-only ones: they get bounced)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:
        return None


def held_in_memory(fd: int) -> bool:
    """Whether ``fd``'s file lives on tmpfs or ramfs: reading or writing it is a copy to or
    from pages already in memory (with no swap configured it never waits for a device),
    while io_uring hands every request on such a file to an io-wq worker thread, because
    these file systems cannot do non-blocking I/O (measured on 6.18: 40 us per 4 KiB read
    at QD1 against 1.3 us for a plain pread)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in MEMORY_FS_MAGIC


class FileNode(BlockNode):
    driver = "file"
    format_name = "file"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.path: str = opts["filename"]
        cache = opts.get("cache", {})
        self.direct = bool(cache.get("direct", False))
        self.no_flush = bool(cache.get("no-flush", False))
        self.aio_mode: str = opts.get("aio", "threads")
        self.use_lock = opts.get("locking", "auto") != "off"
        self.fd = -1
        self.backend: aio.IOBackend | None = None
        self.align = 1
        self.mem_align = 1
        self._length = 0
        self.in_memory = False  # on tmpfs/ramfs: see held_in_memory()
        # [start, end) last found to be data by SEEK_DATA/SEEK_HOLE (see known_data)
        self.data_span = (0, 0)
        self._locked: set[int] = set()
        self._rmw_lock = threading.Lock()  # serialises read-modify-write of O_DIRECT sectors

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        self.fd = self._open_fd()
        if self.aio_mode == "native" and not self.direct:
            raise QMPError(
                "aio=native was specified, but it requires cache.direct=on, "
                "which was not specified."
            )
        self.backend = aio.get_backend(self.aio_mode)
        if self.backend is None:
            raise QMPError(
                f"aio={self.aio_mode} was specified, but is not supported in this build."
            )
        unusable = self.backend.check_usable()
        if unusable is not None:
            raise QMPError(unusable)
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            size = st.st_size
        # The backends read past the file's end as zeroes, which fills the last sector.
        self._length = round_to_sectors(size)
        if self.direct:
            self.align, self.mem_align = self._probe_alignment()
        self.in_memory = stat.S_ISREG(st.st_mode) and held_in_memory(self.fd)

    def _open_fd(self) -> int:
        """The open description, of a kind this driver takes (``check_kind``)."""
        fd = self._open_path()
        try:
            self.check_kind(os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check_kind(self, mode: int) -> None:
        """QEMU's ``file`` driver takes regular files only (devices are ``host_device``'s)."""
        if not stat.S_ISREG(mode):
            raise QMPError(f"'{self.driver}' driver requires '{self.path}' to be a regular file")

    def _open_path(self) -> int:
        """Open read-write, or read-only when asked; with auto-read-only, fall back to
        read-only where writing is refused (QEMU's rule)."""
        extra = os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        try:
            try:
                return os.open(self.path, (os.O_RDONLY if self.read_only else os.O_RDWR) | extra)
            except OSError as e:
                auto = self.opts.get("auto-read-only", False)
                if self.read_only or not auto or e.errno not in (errno.EACCES, errno.EROFS):
                    raise
                self.read_only = True
                return os.open(self.path, os.O_RDONLY | extra)
        except OSError as e:
            raise QMPError(f"Could not open '{self.path}': {os.strerror(e.errno)}") from None

    def _probe_alignment(self) -> tuple[int, int]:
        """Find the O_DIRECT request and memory alignment by trying reads, as QEMU does."""
        with mmap.mmap(-1, 2 * 4096) as m:
            mv = memoryview(m)
            try:
                align = next((a for a in (512, 1024, 2048, 4096) if self._try_read(mv[:a])), 4096)
                mem = next(
                    (a for a in (512, 1024, 2048) if self._try_read(mv[a : a + align])), 4096
                )
            finally:
                mv.release()
        return align, mem

    def _try_read(self, buf: memoryview) -> bool:
        try:
            os.preadv(self.fd, (buf,), 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        return True

    async def reopen_writable(self) -> None:
        """Read-only to read-write (blockdev-reopen): a writable description takes the fd's
        number (every user of the number writes through it now), and the lock bytes are
        taken again on it."""
        new = self._open_fd()
        try:
            os.dup2(new, self.fd)
        finally:
            os.close(new)
        self._locked.clear()
        self.refresh_perms()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops every OFD lock of this description too
            self.fd = -1
            self._locked.clear()

    # --- permissions as lock bytes --------------------------------------------------------
    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        """Hold a shared lock on 100+bit for each permission used and on 200+bit for each
        one not shared, then test the other side's bytes; undo on conflict."""
        if not self.use_lock or self.fd < 0:
            return
        want = lock_bytes(perm, shared) if self.active else set()  # inactive: no lock
        old = set(self._locked)
        try:
            self._set_locks(want)
            if self.active:
                self._check_locks(perm, shared)
        except BaseException:
            self._set_locks(old)
            raise

    def _set_locks(self, want: set[int]) -> None:
        for byte in sorted(want - self._locked):
            try:
                _lock_byte(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError:
                raise QMPError(f"Failed to lock byte {byte}") from None
            self._locked.add(byte)
        for byte in sorted(self._locked - want):
            _lock_byte(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
            self._locked.discard(byte)

    def _check_locks(self, perm: Perm, shared: Perm) -> None:
        check_lock_bytes(self.fd, perm, shared)

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return self._length

    def refresh_length(self) -> None:
        self._length = round_to_sectors(self.exact_length())

    def exact_length(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(self.fd, 0, os.SEEK_END)
        return st.st_size

    async def do_truncate(self, length: int, prealloc: str) -> None:
        """ftruncate; growing with ``falloc`` allocates the new range (fallocate), with
        ``full`` writes zeroes into it, as QEMU's file driver does."""
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        assert self.backend is not None
        self.data_span = (0, 0)
        old = length  # only preallocation needs the old size: no fstat otherwise
        if prealloc != "off":
            old = (await self.backend.run(os.fstat, self.fd)).st_size
        try:
            await self.backend.run(os.ftruncate, self.fd, length)
        except OSError as e:
            raise OSError(e.errno, f"Failed to resize file: {os.strerror(e.errno)}") from e
        self._length = round_to_sectors(length)
        if length <= old:
            return
        try:
            if prealloc == "falloc":
                await self.backend.fallocate(self.fd, 0, old, length - old)
            else:
                await self.write_zero_buffers(old, length - old)
        except OSError as e:
            msg = f"Could not preallocate new data: {os.strerror(e.errno)}"
            raise OSError(e.errno, msg) from e

    async def do_allocated_size(self) -> int:
        assert self.backend is not None
        st = await self.backend.run(os.fstat, self.fd)
        return st.st_blocks * 512

    def allocated_size_now(self) -> int:
        return os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0

    # --- I/O ------------------------------------------------------------------------------
    def _needs_bounce(self, offset: int, buf: memoryview) -> bool:
        if not self.direct:
            return False
        if offset % self.align or len(buf) % self.align:
            return True
        addr = _address(buf)
        return addr is None or addr % self.mem_align != 0

    async def do_read(self, offset: int, buf: memoryview) -> None:
        assert self.backend is not None
        if not buf:
            return
        if self._needs_bounce(offset, buf):
            await self.backend.run(self._bounce_read, offset, buf)
        elif self.in_memory and len(buf) <= INLINE_MAX:
            aio.pread_full(self.fd, buf, offset)  # a copy from memory: no thread, no SQE
        else:
            await self.backend.read(self.fd, buf, offset)

    async def do_write(self, offset: int, data: Buffer) -> None:
        assert self.backend is not None
        buf = data if isinstance(data, memoryview) else memoryview(data)
        if not buf:
            return
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if self._needs_bounce(offset, buf):
            await self.backend.run(self._bounce_write, offset, buf)
        elif self.in_memory and len(buf) <= INLINE_MAX:
            aio.pwrite_full(self.fd, buf, offset)
        else:
            await self.backend.write(self.fd, buf, offset)

    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % self.align
        end = -(-(offset + length) // self.align) * self.align
        return start, end

    def _bounce_read(self, offset: int, buf: memoryview) -> None:
        """Runs in a pool thread: read the aligned span, copy out the caller's part."""
        start, end = self._aligned_span(offset, len(buf))
        with mmap.mmap(-1, end - start) as m:
            mv = memoryview(m)
            try:
                aio.pread_full(self.fd, mv, start)
                buf[:] = mv[offset - start : offset - start + len(buf)]
            finally:
                mv.release()

    def _bounce_write(self, offset: int, buf: memoryview) -> None:
        """Runs in a pool thread: read-modify-write of the aligned span. The lock keeps two
        unaligned writes sharing a sector from losing each other's bytes; a span that
        reaches past the file's end is cut back to the end of the caller's data (the file
        grows as far as a buffered write would take it, never to the alignment)."""
        start, end = self._aligned_span(offset, len(buf))
        with self._rmw_lock, mmap.mmap(-1, end - start) as m:
            size = os.fstat(self.fd).st_size
            mv = memoryview(m)
            try:
                if start != offset or end != offset + len(buf):
                    aio.pread_full(self.fd, mv, start)
                mv[offset - start : offset - start + len(buf)] = buf
                aio.pwrite_full(self.fd, mv, start)
            finally:
                mv.release()
            if end > size:
                os.ftruncate(self.fd, max(size, offset + len(buf)))

    async def do_flush(self) -> None:
        assert self.backend is not None
        if not self.no_flush:
            await self.backend.fdatasync(self.fd)

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        """Punch a hole when allowed to unmap, else ZERO_RANGE, else write zeroes (QEMU's
        order of attempts; the last one not with ``no_fallback``)."""
        assert self.backend is not None
        if self.read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if length <= 0:
            return
        self.data_span = (0, 0)  # the range may become a hole
        if unmap and self.discard_unmap:
            mode = aio.FALLOC_FL_PUNCH_HOLE | aio.FALLOC_FL_KEEP_SIZE
            if await self._try_fallocate(mode, offset, length):
                return
        if await self._try_fallocate(aio.FALLOC_FL_ZERO_RANGE, offset, length):
            return
        if no_fallback:
            raise OSError(errno.ENOTSUP, "the file system cannot zero without writing")
        await self.write_zero_buffers(offset, length)

    async def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        assert self.backend is not None
        try:
            await self.backend.fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
        return True

    async def do_discard(self, offset: int, length: int) -> None:
        """Deallocate with discard=unmap; filesystems that cannot are ignored, as QEMU does
        (discard is advisory)."""
        if self.discard_unmap and length > 0 and not self.read_only:
            self.data_span = (0, 0)
            done = False
            try:
                done = await self._try_fallocate(
                    aio.FALLOC_FL_PUNCH_HOLE | aio.FALLOC_FL_KEEP_SIZE, offset, length
                )
            finally:  # query-blockstats' driver-specific counts, as QEMU's file driver
                if done:
                    self.stats.discard_ok += 1
                    self.stats.discard_bytes += length
                else:
                    self.stats.discard_failed += 1

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """Data or a hole (reads as zeroes), at the same offset of this file."""
        assert self.backend is not None
        start, end = self.data_span
        if start <= offset < end:
            # QEMU's block-status cache: inside the last data span found, no lseek (on
            # tmpfs SEEK_HOLE walks the page cache up to the hole, a whole image's worth).
            n = min(end - offset, length)
            return BlockStatus(STATUS_DATA | STATUS_OFFSET_VALID, n, self, offset)
        is_data, n = await self.backend.run(self.seek_status, offset, length)
        flags = (STATUS_DATA if is_data else STATUS_ZERO) | STATUS_OFFSET_VALID
        return BlockStatus(flags, n, self, offset)

    def known_data(self, offset: int, length: int) -> bool:
        """Whether ``[offset, +length)`` lies in the data span the last SEEK_HOLE found: an
        export answering a structured read as data without asking the file again (QEMU's
        file driver keeps the same one-span cache). Writes only add data; discard, write
        zeroes and truncate forget the span before they change the file."""
        start, end = self.data_span
        return start <= offset and offset + length <= end

    def seek_status(self, offset: int, length: int) -> tuple[bool, int]:
        """SEEK_DATA/SEEK_HOLE around ``offset`` (data?, bytes); without support everything
        is data. Blocking: a pool thread's, or the loop's for a file held in memory."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: a hole up to EOF
                return False, length
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return True, length
            raise
        if data > offset:
            return False, min(data - offset, length)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        start, end = self.data_span
        if not (start <= hole and offset <= end):  # not touching: the new span replaces it
            start, end = offset, hole
        self.data_span = (min(start, offset), max(end, hole))
        return True, max(1, min(hole - offset, length))

    def fast_target(self) -> FastTarget | None:
        if self.fd < 0:
            return None
        return FastTarget(file=self, writable=not self.read_only)

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        return self.path

    def limits(self) -> dict[str, int]:
        limits = super().limits()
        limits["request-alignment"] = self.align
        limits["min-mem-alignment"] = self.mem_align
        return limits

    def image_extra(self) -> dict[str, Any]:
        return {"format-specific": {"type": "file", "data": {}}, "dirty-flag": False}

    def specific_stats(self) -> dict[str, Any] | None:
        return {
            "driver": "file",
            "discard-nb-ok": self.stats.discard_ok,
            "discard-nb-failed": self.stats.discard_failed,
            "discard-bytes-ok": self.stats.discard_bytes,
        }


NODE = FileNode
