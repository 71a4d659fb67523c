"""READ and WRITE without a coroutine, for FUSE: the decision both transports share.

A FUSE request normally costs an asyncio Task running :meth:`FuseEngine.handle`, which awaits
the node's coroutines. For the two hot opcodes that is most of the CPU a request costs, yet
for the commonest chains the node methods do nothing but map the offset and hand the buffer to
a syscall. Which nodes allow it and how (the plan of a node, the cluster-table lookup, the
inline copy of files held in memory) is below the exports, in qsd_py/block/fast_io.py, shared
with the NBD export; :func:`decide` is the single place where both FUSE transports
(``/dev/fuse`` and io_uring) turn a READ or WRITE into one of its actions. The EOF, growable
and read-only rules are not there either: :func:`decide` calls
:meth:`FuseEngine.read_extent`/:meth:`FuseEngine.write_extent`, the same functions the
coroutine path uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.fast_io import (  # noqa: F401  (the FUSE transports use them from here)
    ACCEPT,
    ENGINE,
    FILL,
    INLINE,
    INLINE_MAX,
    KIND_NAMES,
    NULL,
    OFF_RING,
    REPLY,
    THREADS,
    TRANSFER,
    URING,
    FastPlan,
    Prefixes,
    all_zeroes,
    copy_inline,
    forkable,
    plan_for,
    route,
)
from qsd_py.export.fuse import proto as p

if TYPE_CHECKING:
    from qsd_py.export.fuse.engine import FuseEngine, QueueStats

_ENGINE = (ENGINE, 0, 0)


def decide(
    engine: FuseEngine, plan: FastPlan, arg: memoryview, avail: int, writing: bool
) -> tuple[int, int, int]:
    """What to do with a READ (``avail``: room for its reply) or WRITE (``avail``: bytes of
    data present) on the fast path; the one place both transports decide it. The EOF,
    growable and read-only rules are the engine's (``read_extent``/``write_extent``)."""
    if writing:
        if not plan.writable or engine.writethrough:
            return _ENGINE
        offset, size, grow = engine.write_extent(arg, avail)
        if grow:
            return _ENGINE  # resizing takes the engine's lock
        if size < 0:
            return REPLY, size, 0
        if size == 0:
            return ACCEPT, size, 0
    else:
        offset, size = engine.read_extent(arg, avail)
        if size <= 0:
            return REPLY, size, 0
    return route(plan, offset, size, writing)


def describe(plan: FastPlan | None) -> dict[str, Any]:
    """A queue's plan as ``x-query-fuse-queues`` shows it."""
    if plan is None:
        return {"fast-path": "none", "inline-max": 0}
    return {"fast-path": KIND_NAMES[plan.kind], "inline-max": plan.inline_max}


def inline_io(
    fd: int,
    stats: QueueStats,
    buf: memoryview,
    out: memoryview,
    size: int,
    pos: int,
    writing: bool,
    iov: tuple[memoryview] | None = None,
) -> int:
    """Read or write ``size`` bytes at file offset ``pos`` into or from ``buf`` right now
    (:func:`~qsd_py.block.fast_io.copy_inline`, ``iov`` its ``(buf[:size],)`` if the
    caller keeps one) and return the reply length or ``-errno`` as :func:`finish` does for
    a transfer."""
    return finish(stats, copy_inline(fd, buf, size, pos, writing, iov), size, writing, out)


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
