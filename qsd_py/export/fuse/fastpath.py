"""Which block-node chains a transport may serve READ/WRITE for without a coroutine.

A FUSE request normally costs an asyncio Task running :meth:`FuseEngine.handle`, which awaits
the node's coroutines. For the two hot opcodes that is most of the CPU a request costs, yet
for the commonest chains the node methods do nothing but map the offset and hand the buffer to
a syscall. :func:`plan_for` looks at the export's node chain once and says whether a transport
may skip them:

* ``null-co`` without ``latency-ns``: answered inline (reads zero the buffer with
  ``read-zeroes``, writes are dropped), as :class:`~qsd_py.block.drivers.null_co.NullNode` does;
* ``file`` with ``aio=io_uring``, alone or under a ``raw`` node (its ``offset`` window adds a
  constant): the read or write goes as an SQE straight between the fd and the request's
  buffer, as :class:`~qsd_py.block.drivers.file.FileNode` does; with ``aio=threads`` it goes to the
  pool as a reusable :class:`~qsd_py.block.aio.ThreadTransfer` (the loop never blocks),
  except for FUSE-over-io_uring queues (``ring_io``), which use their ring in both modes; in
  all cases provided the request would not be bounced (O_DIRECT needs offset and length
  aligned to the node's ``align``; the transports' buffers are page aligned, which covers
  ``mem_align``);
* ``file`` on tmpfs or ramfs (:func:`~qsd_py.block.drivers.file.held_in_memory`): requests up to
  :data:`INLINE_MAX` bytes are a ``preadv``/``pwritev`` on the loop (:func:`inline_io`), a
  copy between page cache and the request's buffer that costs about a microsecond for
  4 KiB. On these file systems io_uring cannot do non-blocking I/O and hands each request
  to an io-wq thread, and the pool of ``aio=threads`` is a thread hop too: either costs
  tens of microseconds of latency for a copy of one. Bigger requests still go to the
  ring or the pool, so a long copy never holds the loop.

Everything else (other drivers, unaligned O_DIRECT, growing writes, writethrough) keeps
going through the engine. The EOF, growable and read-only rules are not
here: the fast paths call :meth:`FuseEngine.read_extent`/:meth:`FuseEngine.write_extent`,
the same functions the coroutine path uses.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from qsd_py.export.fuse import proto as p

if TYPE_CHECKING:
    from qsd_py.block.aio import ThreadPoolBackend
    from qsd_py.block.drivers.file import FileNode
    from qsd_py.block.node import BlockNode
    from qsd_py.block.uring_aio import IoUringBackend
    from qsd_py.export.fuse.engine import QueueStats

NULL = 1  #: answered inline
URING = 2  #: one SQE on the loop's ring
THREADS = 3  #: one ThreadTransfer in the aio=threads pool
#: How ``x-query-fuse-queues`` names them ("none": every request takes the engine).
KIND_NAMES = {NULL: "null", URING: "uring", THREADS: "threads"}

#: Largest request served inline from a file held in memory (see the module docstring):
#: at 128 KiB inline and io-wq measured the same, at 1 MiB io-wq was 25% faster (tmpfs, QD4).
INLINE_MAX = 128 * 1024


class FastPlan:
    """How to serve READ/WRITE of one export without the node coroutines."""

    __slots__ = (
        "kind",
        "fd",
        "base",
        "align_mask",
        "read_zeroes",
        "writable",
        "backend",
        "inline_max",
    )

    def __init__(
        self,
        kind: int,
        *,
        fd: int = -1,
        base: int = 0,
        align: int = 1,
        read_zeroes: bool = False,
        writable: bool = True,
        backend: IoUringBackend | ThreadPoolBackend | None = None,
        inline_max: int = 0,
    ) -> None:
        self.kind = kind
        self.fd = fd
        self.base = base  # node offset + base = file offset (raw's window)
        self.align_mask = align - 1  # offsets/lengths with these bits set would bounce
        self.read_zeroes = read_zeroes
        self.writable = writable  # False: writes take the engine path (which refuses them)
        self.backend = backend
        self.inline_max = inline_max  # requests up to this size: inline_io() on the loop


def plan_for(node: BlockNode, ring_io: bool = False) -> FastPlan | None:
    """The fast plan for ``node``'s chain, or None when every request needs the engine.

    ``ring_io``: the caller serves FUSE from an io_uring ring (FUSE-over-io_uring), so a
    ``file`` node's reads and writes go on that ring whatever its ``aio`` mode. The queue
    already depends on io_uring, and a backend op that would block is carried out by the
    kernel's own worker threads (io-wq), which is what ``aio=threads`` asks for; the pool
    hop it saves is most of a 4 KiB request's cost (docs/benchmarks.rst)."""
    from qsd_py.block.drivers.file import FileNode
    from qsd_py.block.drivers.null_co import NullNode
    from qsd_py.block.drivers.raw import RawNode

    base = 0
    writable = not node.read_only
    if type(node) is RawNode:
        base = node.offset
        node = node.file
        writable = writable and not node.read_only
    if type(node) is NullNode:
        if node.latency:
            return None
        return FastPlan(NULL, read_zeroes=node.read_zeroes, writable=writable)
    if type(node) is not FileNode or node.fd < 0:
        return None
    kind, backend = _file_backend(node, ring_io)
    if backend is None:
        return None
    return FastPlan(
        kind,
        fd=node.fd,
        base=base,
        align=node.align if node.direct else 1,
        writable=writable,
        backend=backend,
        inline_max=INLINE_MAX if node.in_memory else 0,
    )


def describe(plan: FastPlan | None) -> dict[str, Any]:
    """A queue's plan as ``x-query-fuse-queues`` shows it."""
    if plan is None:
        return {"fast-path": "none", "inline-max": 0}
    return {"fast-path": KIND_NAMES[plan.kind], "inline-max": plan.inline_max}


def _file_backend(node: FileNode, ring_io: bool) -> tuple[int, Any]:
    """How a file node's fast-path I/O is carried: ``(URING, IoUringBackend)`` or
    ``(THREADS, ThreadPoolBackend)``; backend None when the node's backend is another."""
    from qsd_py.block import aio

    if ring_io:
        return URING, aio.get_backend("io_uring")
    backend = node.backend
    if node.aio_mode == "threads" and isinstance(backend, aio.ThreadPoolBackend):
        return THREADS, backend
    if node.aio_mode == "io_uring":
        from qsd_py.block.uring_aio import IoUringBackend  # only loaded when in use

        if isinstance(backend, IoUringBackend):
            return URING, backend
    return 0, None


def inline_io(
    fd: int,
    stats: QueueStats,
    buf: memoryview,
    out: memoryview,
    size: int,
    pos: int,
    writing: bool,
) -> int:
    """Read or write ``size`` bytes at file offset ``pos`` into or from ``buf`` right now
    (only for files held in memory, see :data:`INLINE_MAX`), and return the reply length or
    ``-errno`` as :func:`finish` does for a transfer. A read short at EOF zero-fills the
    rest, as the node's read does; a write that stops short is ``-ENOSPC``."""
    op = os.pwritev if writing else os.preadv
    done = 0
    try:
        while done < size:
            n = op(fd, (buf[done:size],), pos + done)
            if n <= 0:
                break
            done += n
    except OSError as err:
        return finish(stats, -(err.errno or errno.EIO), size, writing, out)
    if done < size:
        if writing:
            return finish(stats, -errno.ENOSPC, size, writing, out)
        buf[done:size] = bytes(size - done)
    return finish(stats, size, size, writing, out)


def finish(stats: QueueStats, res: int, size: int, writing: bool, out: memoryview) -> int:
    """Account a finished fast-path transfer and return its reply length (or ``-errno``).

    A write's reply is a ``fuse_write_out`` packed into ``out``; a read short at EOF was
    zero-filled, as the node's own read does, so it answers the full ``size``.
    """
    if res < 0:
        stats.errors += 1
        return res
    if writing:
        stats.bytes_written += size
        p.WRITE_OUT.pack_into(out, 0, size, 0)
        return p.WRITE_OUT.size
    stats.bytes_read += size
    return size
