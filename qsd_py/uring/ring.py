"""A raw io_uring: setup, shared-memory rings, SQE preparation, submission and reaping.

Why raw syscalls: Debian 12's liburing 2.3 exports none of its (inline) prep helpers and PyPI's
``liburing`` cannot fill a URING_CMD, so qsd-py talks to the kernel itself with ``ctypes`` for the
three syscalls and ``mmap`` for the rings. Everything on the hot path is plain Python on mmaps:

* SQEs are written with one precompiled ``struct.Struct.pack_into`` each (which also zero-fills
  the 64 bytes the kernel reads), straight into the SQE mmap.
* The SQ tail is kept in a Python int and published once per :meth:`Ring.submit`; the SQ index
  array is either absent (``IORING_SETUP_NO_SQARRAY``) or filled once with the identity mapping,
  so preparing an SQE costs no extra store.
* The CQ is read through ``memoryview.cast`` views (no ctypes object per access).

Memory ordering relies on x86-64's TSO: stores become visible in program order, so SQE contents
are visible before the tail that publishes them, and the CQ head store follows the CQE loads.

A :class:`Ring` is not thread-safe: one thread (one asyncio loop) owns it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence

from qsd_py.uring import abi

_libc = ctypes.CDLL(None, use_errno=True)
# No argtypes on purpose: a prototype measured ~2x slower per call. Without one, ctypes passes a
# Python int as a C int whose register's upper half is undefined, which is harmless only where
# the kernel reads 32 bits (fds, counts, flags; x86-64 also truncates the syscall number to int).
# 64-bit arguments are passed as pointers (byref/arrays/None) or explicit ctypes.c_size_t.
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_get_errno = ctypes.get_errno

_U32 = 0xFFFFFFFF
_U64 = struct.Struct("<Q")
_CQE32 = struct.Struct("<QiI16x")
_ENTER = abi.NR_IO_URING_ENTER
_GETEVENTS = abi.ENTER_GETEVENTS
_NEEDS_ENTER = abi.SQ_CQ_OVERFLOW | abi.SQ_TASKRUN  # SQ flags only ENTER_GETEVENTS clears
_RETRY_ERRNOS = (errno.EINTR,)
_BUSY_ERRNOS = (errno.EAGAIN, errno.EBUSY)

#: SQE128 so one ring carries both FUSE URING_CMDs and file I/O; SUBMIT_ALL so an SQE the
#: kernel rejects at prep time (it gets an error CQE) does not stop the rest of the batch.
DEFAULT_FLAGS = abi.SETUP_SQE128 | abi.SETUP_SUBMIT_ALL


class RingSetupError(OSError):
    """io_uring_setup() failed; ``str()`` says why and what to do about it."""


def io_uring_disabled_sysctl() -> int | None:
    """``kernel.io_uring_disabled``: 0 allowed, 1 root/io_uring_group only, 2 off; None: absent."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _setup_error(err: int, flags: int) -> RingSetupError:
    """Turn an io_uring_setup() errno into an error naming the cause and the fix."""
    disabled = io_uring_disabled_sysctl()
    if err == errno.ENOSYS:
        msg = (
            "io_uring is not available: the kernel lacks it (CONFIG_IO_URING) "
            "or a seccomp filter hides it"
        )
    elif err == errno.EPERM and disabled:
        msg = (
            f"io_uring is disabled by the sysctl kernel.io_uring_disabled={disabled}; "
            "set it to 0 (sysctl -w kernel.io_uring_disabled=0) to allow it"
        )
    elif err == errno.EPERM:
        msg = "io_uring is not permitted for this process (seccomp, container policy or LSM)"
    elif err == errno.EINVAL:
        msg = f"io_uring_setup rejected flags {flags:#x}: the kernel is too old for them"
    elif err in (errno.ENOMEM, errno.EMFILE, errno.ENFILE):
        msg = f"io_uring_setup failed: {os.strerror(err)} (check RLIMIT_MEMLOCK/RLIMIT_NOFILE)"
    else:
        msg = f"io_uring_setup failed: {os.strerror(err)}"
    return RingSetupError(err, msg)


class Ring:
    """One io_uring instance with its SQ/CQ rings mapped into this process.

    ``entries`` SQ slots (rounded up to a power of two by the kernel), ``cq_entries`` CQ slots
    (default: twice ``entries``), ``flags`` from ``abi.SETUP_*``. ``IORING_SETUP_NO_SQARRAY`` is
    added when the kernel supports it.

    Prep helpers queue one SQE and never block: when the SQ is full they first submit what is
    queued. Nothing reaches the kernel before :meth:`submit`.
    """

    def __init__(self, entries: int = 256, flags: int = DEFAULT_FLAGS, cq_entries: int = 0) -> None:
        self.fd = -1
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        if cq_entries:
            flags |= abi.SETUP_CQSIZE
        params = self._setup(entries, flags, cq_entries)
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise

    # --- setup ----------------------------------------------------------------------------
    def _setup(self, entries: int, flags: int, cq_entries: int) -> abi.Params:
        """io_uring_setup(), trying NO_SQARRAY first and falling back silently without it."""
        for extra in (abi.SETUP_NO_SQARRAY, 0):
            params = abi.Params(flags=flags | extra, cq_entries=cq_entries)
            fd = _syscall(abi.NR_IO_URING_SETUP, entries, ctypes.byref(params))
            if fd >= 0:
                self.fd = fd
                self.flags = flags | extra
                return params
            err = _get_errno()
            if not (extra and err == errno.EINVAL):
                raise _setup_error(err, flags)
        raise AssertionError("unreachable")

    def _mmap(self, length: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(
            self.fd,
            length,
            mmap.MAP_SHARED | mmap.MAP_POPULATE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )
        self._maps.append(m)
        return m

    def _view(self, m: mmap.mmap, fmt: str) -> memoryview:
        v = memoryview(m).cast(fmt)
        self._views.append(v)
        return v

    def _map(self, p: abi.Params) -> None:
        """Map the rings and precompute every index the hot path uses."""
        self.features = p.features
        self.sq_entries = p.sq_entries
        self.cq_entries = p.cq_entries
        self.sqe_size = abi.SQE128_SIZE if self.flags & abi.SETUP_SQE128 else abi.SQE_SIZE
        self.cqe_size = abi.CQE32_SIZE if self.flags & abi.SETUP_CQE32 else abi.CQE_SIZE
        self.cmd_size = abi.SQE128_CMD_SIZE if self.sqe_size == 128 else abi.SQE_CMD_SIZE
        no_sqarray = bool(self.flags & abi.SETUP_NO_SQARRAY)
        sq, cq = p.sq_off, p.cq_off
        sq_len = sq.array + (0 if no_sqarray else p.sq_entries * 4)
        cq_len = cq.cqes + p.cq_entries * self.cqe_size
        if p.features & abi.FEAT_SINGLE_MMAP:
            sq_map = cq_map = self._mmap(max(sq_len, cq_len), abi.OFF_SQ_RING)
        else:
            sq_map = self._mmap(sq_len, abi.OFF_SQ_RING)
            cq_map = self._mmap(cq_len, abi.OFF_CQ_RING)
        #: The SQE array, a writable buffer: callers may pack into it at offsets we hand out.
        self.sqes = self._mmap(p.sq_entries * self.sqe_size, abi.OFF_SQES)
        self._sq32 = self._view(sq_map, "I")
        self._cq32 = self._view(cq_map, "I")
        self._sq_head_i = sq.head >> 2
        self._sq_tail_i = sq.tail >> 2
        self._sq_flags_i = sq.flags >> 2
        self._sq_mask = self._sq32[sq.ring_mask >> 2]
        self._cq_head_i = cq.head >> 2
        self._cq_tail_i = cq.tail >> 2
        self._cq_flags_i = cq.flags >> 2
        self._cq_overflow_i = cq.overflow >> 2
        self._cq_mask = self._cq32[cq.ring_mask >> 2]
        # The CQE array as bytes, and the struct one CQE unpacks with (CQE32: 16 more bytes).
        self._cqes = self._view(cq_map, "B")[cq.cqes : cq_len]
        self._views.append(self._cqes)
        self._cqe_struct = abi.CQE if self.cqe_size == abi.CQE_SIZE else _CQE32
        # What reap() reads on every call, in one attribute instead of ten.
        self._reaping = (self._cq32, self._cqes, self._cqe_struct.iter_unpack, self._cq_mask,
                         self.cqe_size, self.cq_entries, self._cq_head_i, self._cq_tail_i,
                         self._sq32, self._sq_flags_i)  # fmt: skip
        self._sqe_shift = self.sqe_size.bit_length() - 1
        if not no_sqarray:
            base = sq.array >> 2
            for i in range(p.sq_entries):
                self._sq32[base + i] = i
        # Local SQ state: _tail counts every SQE prepared; _flushed is the part handed to the
        # kernel via the shared tail; _head mirrors the kernel's (unwrapped) head.
        self._tail = self._sq32[self._sq_tail_i]
        self._head = self._tail
        self._flushed = self._tail
        self._kernel_head = self._sq32[self._sq_head_i]

    @property
    def closed(self) -> bool:
        return self.fd < 0

    # --- SQE acquisition ------------------------------------------------------------------
    def sq_space(self) -> int:
        """Free SQ slots right now (without submitting)."""
        if self._tail - self._head >= self.sq_entries:
            self._refresh_head()
        return self.sq_entries - (self._tail - self._head)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` SQEs that must reach the kernel in one submission (a link
        chain split over two io_uring_enter calls would start its second half at once)."""
        while self.sq_space() < n:
            self.submit()

    def unpublished(self) -> int:
        """SQEs prepared since the last :meth:`submit` (not yet visible to the kernel)."""
        return self._tail - self._flushed

    def pending(self) -> int:
        """SQEs prepared but not yet consumed by the kernel."""
        self._refresh_head()
        return self._tail - self._head

    def _refresh_head(self) -> None:
        khead = self._sq32[self._sq_head_i]
        self._head += (khead - self._kernel_head) & _U32
        self._kernel_head = khead

    def _make_room(self) -> None:
        """Called when the SQ looks full: learn the kernel's head, else submit to free slots."""
        self._refresh_head()
        while self._tail - self._head >= self.sq_entries:
            self.submit()
            self._refresh_head()

    def get_sqe(self) -> int:
        """Reserve the next SQE and return its byte offset in :attr:`sqes` (contents stale)."""
        tail = self._tail
        if tail - self._head >= self.sq_entries:
            self._make_room()
            tail = self._tail
        self._tail = tail + 1
        return (tail & self._sq_mask) << self._sqe_shift

    def prep_copy(self, sqe: bytes, patch_at: int = 0, patch: int = 0) -> int:
        """Queue a copy of a complete, prebuilt SQE (its first ``len(sqe)`` bytes; the rest of
        the slot keeps stale contents), with the 64-bit field at byte ``patch_at`` set to
        ``patch`` when ``patch_at`` is given; return its byte offset in :attr:`sqes`.
        (:meth:`get_sqe` written out: a call less for every FUSE reply.)"""
        tail = self._tail
        if tail - self._head >= self.sq_entries:
            self._make_room()
            tail = self._tail
        self._tail = tail + 1
        off = (tail & self._sq_mask) << self._sqe_shift
        sqes = self.sqes
        sqes[off : off + len(sqe)] = sqe
        if patch_at:
            _U64.pack_into(sqes, off + patch_at, patch)
        return off

    # --- prep helpers -----------------------------------------------------------------------
    def prep_rw(
        self,
        op: int,
        fd: int,
        addr: int,
        length: int,
        off: int,
        user_data: int,
        op_flags: int = 0,
        sqe_flags: int = 0,
        buf_index: int = 0,
    ) -> None:
        """Queue an SQE of the common read/write shape (also NOP, FSYNC, FALLOCATE, ...)."""
        tail = self._tail
        if tail - self._head >= self.sq_entries:
            self._make_room()
            tail = self._tail
        self._tail = tail + 1
        abi.SQE.pack_into(
            self.sqes,
            (tail & self._sq_mask) << self._sqe_shift,
            op,
            sqe_flags,
            0,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
            buf_index,
            0,
            0,
            0,
            0,
        )

    def prep_nop(self, user_data: int, sqe_flags: int = 0) -> None:
        self.prep_rw(abi.OP_NOP, -1, 0, 0, 0, user_data, 0, sqe_flags)

    def prep_read(self, fd: int, addr: int, length: int, off: int, user_data: int) -> None:
        self.prep_rw(abi.OP_READ, fd, addr, length, off, user_data)

    def prep_write(self, fd: int, addr: int, length: int, off: int, user_data: int) -> None:
        self.prep_rw(abi.OP_WRITE, fd, addr, length, off, user_data)

    def prep_fsync(self, fd: int, user_data: int, datasync: bool = False) -> None:
        self.prep_rw(abi.OP_FSYNC, fd, 0, 0, 0, user_data, abi.FSYNC_DATASYNC if datasync else 0)

    def prep_fallocate(self, fd: int, mode: int, offset: int, length: int, user_data: int) -> None:
        """fallocate(fd, mode, offset, length): the kernel reads length from ``addr``, mode
        from ``len``."""
        self.prep_rw(abi.OP_FALLOCATE, fd, length, mode, offset, user_data)

    def prep_cancel(self, target_user_data: int, user_data: int, flags: int = 0) -> None:
        """Ask the kernel to cancel the request(s) submitted with ``target_user_data``."""
        self.prep_rw(abi.OP_ASYNC_CANCEL, -1, target_user_data, 0, 0, user_data, flags)

    def prep_uring_cmd(
        self,
        fd: int,
        cmd_op: int,
        cmd: bytes | bytearray | memoryview | None,
        addr: int,
        length: int,
        user_data: int,
        sqe_flags: int = 0,
    ) -> int:
        """Queue an IORING_OP_URING_CMD and return the byte offset of its command area.

        ``cmd`` (at most :attr:`cmd_size` bytes) is copied into the command area; bytes beyond it
        keep stale contents, so a caller either passes the whole command or, faster, passes None
        and packs its own struct at the returned offset in :attr:`sqes` before :meth:`submit`.
        """
        tail = self._tail
        if tail - self._head >= self.sq_entries:
            self._make_room()
            tail = self._tail
        self._tail = tail + 1
        off = (tail & self._sq_mask) << self._sqe_shift
        sqes = self.sqes
        abi.SQE_CMD_HEAD.pack_into(
            sqes,
            off,
            abi.OP_URING_CMD,
            sqe_flags,
            0,
            fd,
            cmd_op,
            0,
            addr,
            length,
            0,
            user_data,
            0,
            0,
            0,
        )
        off += abi.SQE_CMD_OFFSET
        if cmd:
            sqes[off : off + len(cmd)] = cmd
        return off

    # --- submission ---------------------------------------------------------------------------
    def submit(self, wait_nr: int = 0, getevents: bool = False) -> int:
        """Hand every queued SQE to the kernel with one io_uring_enter(); returns how many.

        ``wait_nr`` > 0 (or ``getevents``) also asks for completions (ENTER_GETEVENTS): this
        flushes overflowed CQEs and runs deferred task work. EINTR is retried; EAGAIN/EBUSY
        (the kernel is short of memory or holds overflowed CQEs) return 0 with the SQEs still
        queued, for the caller to reap and submit again.
        """
        tail = self._tail
        if tail != self._flushed:
            self._sq32[self._sq_tail_i] = tail & _U32
            self._flushed = tail
        to_submit = tail - self._head
        if to_submit == 0 and not wait_nr and not getevents:
            return 0
        flags = _GETEVENTS if (wait_nr or getevents) else 0
        while True:
            ret = _syscall(_ENTER, self.fd, to_submit, wait_nr, flags, None, 0)
            if ret >= 0:
                self._head += ret
                self._kernel_head = (self._kernel_head + ret) & _U32
                return ret
            err = _get_errno()
            if err in _RETRY_ERRNOS:
                continue
            if err in _BUSY_ERRNOS:
                return 0
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def enter(self, to_submit: int, min_complete: int, flags: int) -> int:
        """Raw io_uring_enter() with errno turned into OSError (EINTR retried)."""
        while True:
            ret = _syscall(_ENTER, self.fd, to_submit, min_complete, flags, None, 0)
            if ret >= 0:
                return ret
            err = _get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def wait(self, nr: int = 1, timeout: float | None = None) -> bool:
        """Submit what is queued and block until ``nr`` CQEs are in the CQ ring or ``timeout``
        seconds passed (needs FEAT_EXT_ARG). Returns False on timeout."""
        if timeout is None:
            self.submit(wait_nr=nr)
            return True
        self.submit()
        ts = abi.KernelTimespec(int(timeout), int((timeout % 1) * 1e9))
        arg = abi.GeteventsArg(0, 0, 0, ctypes.addressof(ts))
        argsz = ctypes.c_size_t(ctypes.sizeof(arg))
        flags = _GETEVENTS | abi.ENTER_EXT_ARG
        while True:
            ret = _syscall(_ENTER, self.fd, 0, nr, flags, ctypes.byref(arg), argsz)
            if ret >= 0:
                return True
            err = _get_errno()
            if err == errno.ETIME:
                return False
            if err != errno.EINTR:
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    # --- completions --------------------------------------------------------------------------
    def cq_ready(self) -> int:
        """CQEs waiting in the CQ ring."""
        return (self._cq32[self._cq_tail_i] - self._cq32[self._cq_head_i]) & _U32

    def needs_enter(self) -> bool:
        """True when the kernel holds work only an ENTER_GETEVENTS releases (overflowed CQEs,
        or task work flagged through IORING_SETUP_TASKRUN_FLAG)."""
        return bool(self._sq32[self._sq_flags_i] & _NEEDS_ENTER)

    def reap(self, callback: Callable[[int, int, int], object]) -> int:
        """Call ``callback(user_data, res, flags)`` for each CQE in the ring; return the count.

        The CQEs present are unpacked in one call and the CQ head is moved past them before
        any callback runs, so callbacks may prepare, submit and even reap (a batch per
        stretch of the ring up to its end: one C call instead of three index reads and a
        head store per CQE). Overflowed CQEs and deferred task work are pulled in
        (ENTER_GETEVENTS) when the kernel flags them, and reaped too.
        """
        total = 0
        cq32, cqes, unpack, mask, size, entries, head_i, tail_i, sq32, flags_i = self._reaping
        while True:
            head = cq32[head_i]
            n = (cq32[tail_i] - head) & _U32
            if n == 0:
                if not sq32[flags_i] & _NEEDS_ENTER:  # needs_enter(), a call less
                    return total
                self.enter(0, 0, _GETEVENTS)
                if cq32[tail_i] == head:
                    return total
                continue
            start = head & mask
            if n > entries - start:
                n = entries - start  # what wraps round is the next batch
            batch = list(unpack(cqes[start * size : (start + n) * size]))
            cq32[head_i] = (head + n) & _U32
            total += n
            for user_data, res, flags in batch:
                callback(user_data, res, flags)

    def completions(self) -> Iterator[tuple[int, int, int]]:
        """Iterate ``(user_data, res, flags)`` over the CQEs present now (convenience, not hot)."""
        out: list[tuple[int, int, int]] = []
        while True:
            self.reap(lambda ud, res, fl: out.append((ud, res, fl)))
            if not out:
                return
            yield from out
            out.clear()

    def cq_overflow_count(self) -> int:
        """CQEs the kernel had to drop (only without FEAT_NODROP)."""
        return self._cq32[self._cq_overflow_i]

    def set_eventfd_enabled(self, enabled: bool) -> None:
        """Toggle eventfd notifications (IORING_CQ_EVENTFD_DISABLED) without unregistering."""
        flags = self._cq32[self._cq_flags_i]
        if enabled:
            flags &= ~abi.CQ_EVENTFD_DISABLED
        else:
            flags |= abi.CQ_EVENTFD_DISABLED
        self._cq32[self._cq_flags_i] = flags & _U32

    # --- registration -------------------------------------------------------------------------
    def _register(self, opcode: int, arg: object, nr: int) -> int:
        while True:
            ret = _syscall(abi.NR_IO_URING_REGISTER, self.fd, opcode, arg, nr)
            if ret >= 0:
                return ret
            err = _get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"io_uring_register({opcode}): {os.strerror(err)}")

    def register_eventfd(self, efd: int, async_only: bool = False) -> None:
        """Have the kernel signal ``efd`` on completions. ``async_only`` skips completions that
        happen inline during submission (the submitter reaps those right after submit)."""
        op = abi.REGISTER_EVENTFD_ASYNC if async_only else abi.REGISTER_EVENTFD
        self._register(op, ctypes.byref(ctypes.c_int(efd)), 1)

    def register_files(self, fds: Sequence[int]) -> None:
        """Register a fixed-file table; use index i with ``sqe_flags=abi.SQE_FIXED_FILE``.
        -1 entries are empty slots for :meth:`update_files`."""
        arr = (ctypes.c_int * len(fds))(*fds)
        self._register(abi.REGISTER_FILES, arr, len(fds))

    def update_files(self, offset: int, fds: Sequence[int]) -> None:
        """Replace fixed-file slots ``offset..`` with ``fds`` (-1 clears a slot)."""
        arr = (ctypes.c_int * len(fds))(*fds)
        upd = abi.FilesUpdate(offset, 0, ctypes.addressof(arr))
        self._register(abi.REGISTER_FILES_UPDATE, ctypes.byref(upd), len(fds))

    def unregister_files(self) -> None:
        self._register(abi.UNREGISTER_FILES, None, 0)

    def enable(self) -> None:
        """Enable a ring created with IORING_SETUP_R_DISABLED (from the thread that will submit)."""
        self._register(abi.REGISTER_ENABLE_RINGS, None, 0)

    def probe(self) -> set[int]:
        """Opcodes this kernel supports."""
        p = abi.Probe()
        self._register(abi.REGISTER_PROBE, ctypes.byref(p), abi.OP_LAST_KNOWN)
        return {p.ops[i].op for i in range(p.ops_len) if p.ops[i].flags & abi.IO_URING_OP_SUPPORTED}

    # --- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the rings and close the ring fd (the kernel cancels what is still in flight)."""
        for v in self._views:
            v.release()
        self._views.clear()
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - best effort at interpreter teardown
                pass


def check_available() -> str | None:
    """None if io_uring works here, else a message naming the cause and the fix."""
    try:
        Ring(2, abi.SETUP_SQE128).close()
    except RingSetupError as e:
        return e.strerror
    except OSError as e:
        return f"io_uring is unusable: {e}"
    return None
