"""READ and WRITE without the node's coroutines: the plan of a node, and the one routing.

Exports (FUSE over /dev/fuse and io_uring, NBD) serve their hot requests, a 4 KiB READ or
WRITE, without an asyncio Task when the node's chain allows it: each node says what its bytes
are on the host (:meth:`BlockNode.fast_target`, qsd_py/block/fast_map.py); :func:`plan_for`
turns that into a :class:`FastPlan`, and :func:`route` is the one place that decides what a
READ or WRITE of a range the export already checked becomes:

* ``null-co`` without ``latency-ns``: answered inline (reads zero the buffer with
  ``read-zeroes``, writes are dropped), as the node itself does;
* ``file``, alone or under a ``raw`` node (its ``offset`` window adds a constant): the read or
  write goes as an SQE straight between the fd and the request's buffer with
  ``aio=io_uring``; with ``aio=threads`` to the pool as a reusable
  :class:`~qsd_py.block.aio.ThreadTransfer` (the loop never blocks), except for callers that
  serve from a ring of their own (``ring_io``: FUSE-over-io_uring queues and NBD
  connections), which use the loop's ring in both modes; in all cases provided the request
  would not be bounced (O_DIRECT needs offset and length aligned to the node's ``align``;
  the callers' buffers are page aligned, which covers ``mem_align``);
* ``qcow2`` over a ``file``: the same, once the node's cluster table maps the request's
  clusters to contiguous host clusters (writes: clusters of this image alone, written in
  place); a range that reads as zeroes is answered by zeroing the buffer (or, for NBD, with
  a hole chunk); anything else (an unknown or unallocated cluster, a backing file,
  compression) takes the node;
* ``rbd`` (alone or under ``raw``): the request goes to librbd as it is, between the
  image and the request's buffer (:class:`~qsd_py.block.rbd.capi.Transfer`), and its
  completion calls the caller back from the image's event socket: no Task nor coroutine
  chain per request. Only in the daemon (:data:`DAEMON_ONLY`);
* a file on tmpfs or ramfs (:func:`~qsd_py.block.drivers.file.held_in_memory`): requests up
  to :data:`INLINE_MAX` bytes are a ``preadv``/``pwritev`` on the loop (:func:`copy_inline`),
  a copy between page cache and the request's buffer that costs about a microsecond for
  4 KiB. On these file systems io_uring cannot do non-blocking I/O and hands each request
  to an io-wq thread, and the pool of ``aio=threads`` is a thread hop too: either costs
  tens of microseconds of latency for a copy of one. Bigger requests still go to the
  ring or the pool, so a long copy never holds the loop.

Everything else (unaligned O_DIRECT, growing writes, writethrough) keeps going through the
node; the export's own rules (EOF, growable, read-only) are checked by the export before.
A write served here tells every node of the chain how far it reached (their
``wr_highest_offset``, in memory shared with the queue workers), and one that would cross a
node's armed write threshold goes through the node instead, which sends the event
(qsd_py/block/stats.py).
"""

from __future__ import annotations

import errno
import os
from time import monotonic_ns as _monotonic_ns
from typing import TYPE_CHECKING, Any

from qsd_py.block.drivers.file import INLINE_MAX
from qsd_py.block.fast_map import OFFSET_MASK, VALID, WRITABLE, ZERO
from qsd_py.block.shared_bits import Marker
from qsd_py.block.stats import FAILED_RD as _FAILED_RD
from qsd_py.block.stats import FAILED_WR as _FAILED_WR
from qsd_py.block.stats import HIGHEST as _HIGHEST
from qsd_py.block.stats import LAST_IO as _LAST_IO
from qsd_py.block.stats import RD_BYTES as _RD_BYTES
from qsd_py.block.stats import RD_OPS as _RD_OPS
from qsd_py.block.stats import WR_BYTES as _WR_BYTES
from qsd_py.block.stats import WR_OPS as _WR_OPS

if TYPE_CHECKING:
    from qsd_py.block.aio import ThreadPoolBackend
    from qsd_py.block.drivers.file import FileNode
    from qsd_py.block.fast_map import ClusterTable, FastTarget
    from qsd_py.block.node import BlockNode
    from qsd_py.block.rbd.capi import Image as RbdImage
    from qsd_py.block.uring_aio import IoUringBackend

NULL = 1  #: answered inline
URING = 2  #: one SQE on the loop's ring
THREADS = 3  #: one ThreadTransfer in the aio=threads pool
RBD = 4  #: one librbd request (capi.Transfer), completed on the image's event socket
#: How ``x-query-fuse-queues`` names them ("none": every request takes the engine).
KIND_NAMES = {NULL: "null", URING: "uring", THREADS: "threads", RBD: "rbd"}
#: Kinds whose I/O completes off the loop's ring (a pool thread, librbd's event socket):
#: polling the ring for them would only burn CPU.
OFF_RING = frozenset({THREADS, RBD})
#: Kinds a forked queue worker cannot serve (librbd's threads do not survive a fork; the
#: image is the daemon's): their queues stay in the daemon.
DAEMON_ONLY = frozenset({RBD})


# What :func:`route` (and FUSE's ``decide``) makes of a READ or WRITE: (action, a, b).
ENGINE = 0  #: take the node's coroutines
REPLY = 1  #: answer now with ``a`` (a length, or -errno)
FILL = 2  #: a read of ``a`` bytes answered from no file: zero the buffer if ``b``
ACCEPT = 3  #: a write of ``a`` bytes that goes nowhere (null-co): answer it as written
INLINE = 4  #: copy ``b`` bytes at file position ``a`` now (copy_inline)
TRANSFER = 5  #: start backend I/O of ``b`` bytes at file position ``a``

_VALID, _WRITABLE, _ZERO, _OFFSET_MASK = VALID, WRITABLE, ZERO, OFFSET_MASK
_ENGINE = (ENGINE, 0, 0)
_pwritev, _preadv = os.pwritev, os.preadv
_UNLISTED = memoryview(bytes(1))  # FastPlan.listed of a plan without a top page


class FastPlan:
    """How to serve READ/WRITE of one export without the node coroutines."""

    __slots__ = (
        "__weakref__",
        "above",
        "below",
        "counted",
        "write_at",
        "read_at",
        "listed",
        "watched",
        "chain",
        "kind",
        "fd",
        "base",
        "align_mask",
        "read_zeroes",
        "writable",
        "backend",
        "inline_max",
        "table",
        "entries",
        "capacity",
        "cluster_bits",
        "counts",
        "slot",
        "started_at",
        "gen",
        "on_change",
        "settle",
        "gates",
        "markers",
        "tally",
        "tally_below",
        "tally_at",
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
        backend: IoUringBackend | ThreadPoolBackend | RbdImage | None = None,
        inline_max: int = 0,
        table: ClusterTable | None = None,
        slot: int = -1,
    ) -> None:
        # What route() counts, flat (set by plan_for, _set_marks): the shared cells
        # (stats.py) of the chain's nodes that see a request's offset shifted by the raw
        # windows above them, as (cells, shift), and of those below the cluster table that
        # see its file position, as (cells, -shift); all of them; this process's words
        # there for a write (wr_highest_offset, ops, bytes, last request) and for a read.
        self.above: tuple[tuple[Any, int], ...] = ()
        self.below: tuple[tuple[Any, int], ...] = ()
        self.counted: tuple[Any, ...] = ()
        # Nodes of the chain whose counts this process's row takes from the top's (a queue
        # worker's: stats.py, NodeStats.derive): only their thresholds are read, as
        # (cells, shift); and the chain's (NodeStats, shift) down to the table.
        self.watched: tuple[tuple[Any, int], ...] = ()
        self.chain: tuple[tuple[Any, int], ...] = ()
        self.write_at = (_HIGHEST, _WR_OPS, _WR_BYTES, _LAST_IO)
        self.read_at = (_RD_OPS, _RD_BYTES, _LAST_IO)
        # query-blockstats' counters (stats.py) of the chain's nodes, this process's row at
        # tally_at: those every fast request passes, and those below the cluster table,
        # which a request answered from the table alone (zeroes) does not reach.
        self.tally: tuple[Any, ...] = ()
        self.tally_below: tuple[Any, ...] = ()
        self.tally_at = 0
        self.kind = kind
        self.fd = fd
        self.base = base  # node offset + base = file offset (raw's window)
        self.align_mask = align - 1  # offsets/lengths with these bits set would bounce
        self.read_zeroes = read_zeroes
        self.writable = writable  # False: writes take the engine path (which refuses them)
        self.backend = backend
        self.inline_max = inline_max  # requests up to this size: inline_io() on the loop
        # A format's cluster table (qcow2): looked up per request, see qsd_py/block/fast_map.py
        self.table = table
        self.entries = table.entries if table is not None else None
        self.capacity = table.capacity if table is not None else 0
        self.cluster_bits = table.cluster_bits if table is not None else 0
        self.counts = table.counts if table is not None else None
        self.slot = slot  # this reader's counters: started at started_at, finished after
        self.started_at = slot * 8
        # Which change of the export's node this plan was made for (queue workers compare it
        # with their transport's shared generation before each request, workers.py).
        self.gen = 0
        # Called by the block layer when this plan no longer says what the chain is (writes
        # closed or opened, a child replaced): :meth:`BlockNode.fast_plans_changed`.
        self.on_change: Any = None
        # Set by the plan's owner: a coroutine function that returns once no fast write
        # the owner routed is in flight (fast_settle.py, BlockNode.settle_fast_writes).
        self.settle: Any = None
        # The write gates of the chain's nodes (shared pages, BlockNode.fork_page), as
        # views read by one index each: the top's byte 0, and bytes 0-1 of every node
        # below (its gate, or a bitmap of its own to mark). One set closes this plan to
        # writes in every process that holds a copy of it.
        self.gates: tuple[memoryview, ...] = ()
        self.markers: tuple[Marker, ...] = ()  # the chain's shared bitmaps (shared_bits.py)
        # Byte 1 of the top's page: set while it lists bitmaps that mark() must mark.
        self.listed: memoryview = _UNLISTED

    def done(self) -> None:
        """A request :func:`decide` routed by the table has finished its I/O."""
        counts = self.counts
        if counts is not None:
            counts[self.started_at + 1] += 1

    def mark(self, offset: int, size: int) -> None:
        """A fast write of node bytes ``[offset, +size)`` finished (well or not, as the
        node marks its bitmaps): mark the chain's shared bitmaps. Every caller whose
        fast path writes does, before its reply: the queue workers, and in the daemon
        the NBD and /dev/fuse exports. Callers on a hot path may test ``listed[0]``
        first: without it there is nothing to mark."""
        if self.listed[0]:
            for marker in self.markers:
                marker.mark(offset, size)

    def release(self) -> None:
        """Give the reader slot back (the queue is gone; its requests are done)."""
        if self.table is not None and self.slot >= 0:
            self.table.unclaim(self.slot)
            self.slot = -1


def plan_for(
    node: BlockNode, ring_io: bool = False, reader: int | None = None, writable: bool = True
) -> FastPlan | None:
    """The fast plan for ``node``'s chain, or None when every request needs the engine.

    The node says what its bytes are on the host (:meth:`BlockNode.fast_target`); this
    picks how to reach them. ``ring_io``: the caller serves from an io_uring ring
    (FUSE-over-io_uring) or wants the loop's ring (NBD), so a ``file`` node's reads and
    writes go on that ring whatever its ``aio`` mode. The caller already depends on
    io_uring, and a backend op that would block is carried out by the kernel's own worker
    threads (io-wq), which is what ``aio=threads`` asks for; the pool hop it saves is most
    of a 4 KiB request's cost (docs/benchmarks.rst). ``reader``: the cluster-table reader
    slot the daemon claimed for this queue's process (queue workers), else one is claimed
    here. ``writable`` False: the caller's export is read-only (writes never go fast).

    The plan is registered with every node of the chain: while one of them keeps a bitmap
    that is not shared (a write-blocking mirror's) the plan's writes take the node; a
    shared one (the user's, a background mirror's) the fast paths mark themselves (see
    :meth:`BlockNode._record`)."""
    plan = _plan_for(node, ring_io, reader)
    if plan is None:
        return None
    if not writable:
        plan.writable = False
    _set_marks(node, plan)
    _register(node, plan)
    return plan


def _register(node: BlockNode, plan: FastPlan, top: bool = True) -> None:
    """In the daemon a plan obeys the node's ``writable`` switches; in a fork (a queue
    worker) the node's fork page decides, write by write: its gate, and the bitmaps the
    fork marks after each write (:meth:`FastPlan.mark`). Only the exported node's bitmaps
    count the request's offsets; a node below with a recording bitmap closes the gate
    (byte 1 of its page) instead: the node in between knows where the bytes land."""
    node.fast_plans.add(plan)
    page = memoryview(node.fork_page)
    if top:
        plan.gates = (page[:1], *plan.gates)
        plan.markers += (Marker(node.fork_page),)
        plan.listed = page[1:2]
    else:
        plan.gates += (page[:2].cast("H"),)
    if os.getpid() == node.home_pid and node._slow_writers and plan not in node._closed_plans:
        node._closed_plans[plan] = plan.writable
        plan.writable = False
    for child in node.children.values():
        _register(child.node, plan, False)


def _plan_for(node: BlockNode, ring_io: bool, reader: int | None) -> FastPlan | None:
    target = node.fast_target()
    if target is None:
        return None
    writable = target.writable and not node.read_only
    if target.null:
        return FastPlan(NULL, read_zeroes=target.read_zeroes, writable=writable)
    if target.image is not None:
        return FastPlan(RBD, base=target.base, writable=writable, backend=target.image)
    file = target.file
    if file is None or file.fd < 0:
        return None
    kind, backend = _file_backend(file, ring_io)
    if backend is None:
        return None
    table = target.table
    slot = -1
    if table is not None:
        slot = table.claim() if reader is None else reader
        if slot < 0:
            return None
    return FastPlan(
        kind,
        fd=file.fd,
        base=target.base,
        align=file.align if file.direct else 1,
        writable=writable,
        backend=backend,
        inline_max=INLINE_MAX if file.in_memory else 0,
        table=table,
        slot=slot,
    )


def _set_marks(top: BlockNode, plan: FastPlan) -> None:
    """What a fast write must tell the nodes it passes (stats.py): each node's own end of
    the write, from the export's offset (nodes down to the one with the cluster table, and
    every node of a chain without one) or from the file position (nodes below the table),
    shifted by the raw windows between. A process without a row of its own (more workers
    than rows) writes through the daemon."""
    from qsd_py.block.stats import HIGHEST, WORDS, process_row

    row = process_row()
    if row < 0:
        plan.writable = False
        return
    at = row * WORDS
    plan.write_at = (at + HIGHEST, at + _WR_OPS, at + _WR_BYTES, at + _LAST_IO)
    plan.read_at = (at + _RD_OPS, at + _RD_BYTES, at + _LAST_IO)
    plan.tally_at = at
    path = _data_path(top, plan)
    targets = [n.fast_target() for n in path]
    tabled = [t is not None and t.table is not None for t in targets]
    last_table = max((i for i, t in enumerate(tabled) if t), default=-1)
    windows = [int(getattr(n, "offset", 0)) if n.driver == "raw" else 0 for n in path]
    above, below, watched, chain = [], [], [], []
    for i, n in enumerate(path):
        if i <= last_table or last_table < 0:
            shift = sum(windows[:i])
            chain.append((n.stats, shift))
            if i and n.stats.derives(row, top.stats):
                watched.append((n.stats.cells, shift))  # counted through the top's row
            else:
                above.append((n.stats.cells, shift))
        else:  # below the table: the node's offset is the file position less the windows
            below.append((n.stats.cells, -sum(windows[i:])))
    plan.above, plan.below = tuple(above), tuple(below)
    plan.watched, plan.chain = tuple(watched), tuple(chain)
    plan.tally = tuple(cells for cells, _ in above)
    plan.tally_below = tuple(cells for cells, _ in below)
    plan.counted = plan.tally + plan.tally_below


def forkable(node: BlockNode) -> bool:
    """Whether queue workers forked from the daemon have a fast road to ``node``'s bytes:
    not when every request takes the node (a worker would only forward each one to the
    daemon, a hop for nothing), nor when the road is the daemon's alone (an RBD image)."""
    target = node.fast_target()
    return target is not None and target.image is None


def _leads_to(target: FastTarget, kind: int) -> bool:
    """Whether a child with ``target`` is on the way to what a plan of ``kind`` reaches."""
    if kind == NULL:
        return target.null
    if kind == RBD:
        return target.image is not None
    return target.file is not None


def _data_path(top: BlockNode, plan: FastPlan) -> list[BlockNode]:
    """The nodes from ``top`` down to the file (or null-co node) the plan reaches, through
    every child but ``backing``."""
    path = [top]
    node = top
    while node.children:
        nxt = None
        for role, child in node.children.items():
            if role == "backing":
                continue
            target = child.node.fast_target()
            if target is not None and _leads_to(target, plan.kind):
                nxt = child.node
                if role == "data-file":
                    break
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def route(plan: FastPlan, offset: int, size: int, writing: bool) -> tuple[int, int, int]:
    """What a READ or WRITE of ``size`` > 0 bytes at node ``offset`` becomes, once the export
    checked it (in range, writable, not growing): ``FILL``/``ACCEPT`` (null-co, or clusters
    that read as zeroes), ``INLINE``/``TRANSFER`` at a file position, or ``ENGINE``. After
    ``INLINE`` or ``TRANSFER`` the caller calls ``plan.done()`` once the I/O is over.

    Every request of a queue runs this, so it is one function over what :func:`plan_for`
    flattened (``gates``, ``above``/``below``, ``counted``, the words at ``write_at`` and
    ``read_at``): no helper calls, one loop per kind of per-node work, each node's
    threshold, highest end and counters touched in one pass (a crossed threshold, which
    is rare, takes the counts back: :func:`_crossed`)."""
    if writing:
        for gate in plan.gates:
            if gate[0]:
                return _ENGINE  # a node needs every write (a mirror), or one below has a bitmap
    if plan.entries is None:
        pos = offset + plan.base
        if (pos | size) & plan.align_mask:
            return _ENGINE  # O_DIRECT would bounce: the node's work
    else:
        pos = _map(plan, offset, size, writing)
        if pos < 0:
            if pos == _ZEROES:
                _tally(plan, plan.tally, False, size)
                return FILL, size, 1
            return _ENGINE
        if (pos | size) & plan.align_mask:
            plan.done()
            return _ENGINE
    if writing:
        above = plan.above
        if above:  # empty: this process has no row to count in (its writes take the node)
            end = offset + size
            for cells, shift in plan.watched:  # counted through the top's row: stats.py
                threshold = cells[0]
                if threshold and end + shift > threshold:
                    plan.done()
                    return _ENGINE  # nothing counted yet; the node sends the event
            highest, ops, nbytes, last = plan.write_at
            now = _monotonic_ns()
            for cells, shift in above:
                node_end = end + shift
                threshold = cells[0]
                if threshold and node_end > threshold:
                    return _crossed(plan, cells, size)  # the node sends the event
                if cells[highest] < node_end:
                    cells[highest] = node_end
                cells[ops] += 1
                cells[nbytes] += size
                cells[last] = now
            below = plan.below
            if below:
                end = pos + size
                for cells, shift in below:
                    node_end = end + shift
                    threshold = cells[0]
                    if threshold and node_end > threshold:
                        return _crossed(plan, cells, size)
                    if cells[highest] < node_end:
                        cells[highest] = node_end
                    cells[ops] += 1
                    cells[nbytes] += size
                    cells[last] = now
    else:
        counted = plan.counted
        if counted:
            ops, nbytes, last = plan.read_at
            now = _monotonic_ns()
            for cells in counted:
                cells[ops] += 1
                cells[nbytes] += size
                cells[last] = now
    if plan.kind == NULL:
        return (ACCEPT, size, 0) if writing else (FILL, size, plan.read_zeroes)
    if size <= plan.inline_max:
        return INLINE, pos, size
    return TRANSFER, pos, size


def share_counts(plan: FastPlan | None, row: int) -> None:
    """Before forking the queue worker that counts in ``row`` with a copy of ``plan`` (the
    daemon's, made just before): let each node of the chain below the top, down to the
    cluster table, take that row from the top's (:meth:`NodeStats.derive`), so that the
    worker counts each request once."""
    if plan is None or not plan.chain:
        return
    top = plan.chain[0][0]
    for stats, shift in plan.chain[1:]:
        stats.derive(top, row, shift)


def _crossed(plan: FastPlan, at_cells: Any, size: int) -> tuple[int, int, int]:
    """A fast write reached a node whose armed write threshold it would cross: the node
    must see it (and send BLOCK_WRITE_THRESHOLD), so take back the counts :func:`route`
    added to the nodes before that one; raised highest ends may stay (the node raises them
    as well)."""
    _, ops, nbytes, _ = plan.write_at
    for cells in plan.counted:
        if cells is at_cells:
            break
        cells[ops] -= 1
        cells[nbytes] -= size
    plan.done()
    return _ENGINE


def _tally(plan: FastPlan, tally: tuple[Any, ...], writing: bool, size: int) -> None:
    """Count a READ or WRITE the fast path serves in the query-blockstats counters of the
    nodes in ``tally`` (this process's row: no atomics). Counted when it starts: a fast
    request that then fails is moved to the failed ones by :func:`failed`."""
    at = plan.tally_at
    now = _monotonic_ns()
    ops, nbytes = (at + _WR_OPS, at + _WR_BYTES) if writing else (at + _RD_OPS, at + _RD_BYTES)
    last = at + _LAST_IO
    for cells in tally:
        cells[ops] += 1
        cells[nbytes] += size
        cells[last] = now


def failed(plan: FastPlan, size: int, writing: bool, redone: bool = False) -> None:
    """A fast READ or WRITE of ``size`` bytes that :func:`route` counted failed: count it
    as a failed request instead (rare, so not on the hot path); ``redone``: the caller
    hands it to the node after all, which counts it, so take it back only."""
    at = plan.tally_at
    if writing:
        ops, nbytes, bad = _WR_OPS, _WR_BYTES, _FAILED_WR
    else:
        ops, nbytes, bad = _RD_OPS, _RD_BYTES, _FAILED_RD
    for cells in plan.tally + plan.tally_below:
        cells[at + ops] -= 1
        cells[at + nbytes] -= size
        if not redone:
            cells[at + bad] += 1


_SLOW = -1
_ZEROES = -2
_FRESH = _VALID | _ZERO


def all_zeroes(plan: FastPlan, offset: int, size: int) -> bool:
    """Whether the table says every cluster of ``[offset, +size)`` reads as zeroes and has
    no host cluster: a write there only needs clusters allocated (no data to copy)."""
    entries = plan.entries
    if entries is None:
        return False
    bits = plan.cluster_bits
    last = (offset + size - 1) >> bits
    if last >= plan.capacity:
        return False
    return all(entries[c] == _FRESH for c in range(offset >> bits, last + 1))


def _map(plan: FastPlan, offset: int, size: int, writing: bool) -> int:
    """The file position of ``[offset, +size)`` through the cluster table, ``_ZEROES``
    (reads as zeroes) or ``_SLOW``. The reader's ``started`` count goes up before the
    entries are read; every answer but a position has its ``finished`` count too."""
    counts = plan.counts
    at = plan.started_at
    counts[at] += 1  # type: ignore[index]
    bits = plan.cluster_bits
    first = offset >> bits
    last = (offset + size - 1) >> bits
    entries = plan.entries
    if last >= plan.capacity:
        counts[at + 1] += 1  # type: ignore[index]
        return _SLOW
    entry = entries[first]  # type: ignore[index]
    need = _VALID | (_WRITABLE if writing else 0)
    if entry & need != need:
        counts[at + 1] += 1  # type: ignore[index]
        return _SLOW
    step = 0 if entry & _ZERO else 1 << bits
    for cluster in range(first + 1, last + 1):  # the same kind, contiguous on the host
        if entries[cluster] != entry + (cluster - first) * step:  # type: ignore[index]
            counts[at + 1] += 1  # type: ignore[index]
            return _SLOW
    if entry & _ZERO:
        counts[at + 1] += 1  # type: ignore[index]
        return _SLOW if writing else _ZEROES
    return (entry & _OFFSET_MASK) + (offset & ((1 << bits) - 1)) + plan.base


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


def copy_inline(
    fd: int,
    buf: memoryview,
    size: int,
    pos: int,
    writing: bool,
    iov: tuple[memoryview] | None = None,
) -> int:
    """Read or write ``size`` bytes at file offset ``pos`` into or from ``buf`` right now
    (only for files held in memory, see :data:`INLINE_MAX`): ``size``, or ``-errno``. A read
    short at EOF zero-fills the rest, as the node's read does; a write that stops short is
    ``-ENOSPC``. ``iov``: ``(buf[:size],)`` made beforehand (:class:`Prefixes`), which
    saves a slice and a tuple per call."""
    op = _pwritev if writing else _preadv
    done = 0
    try:
        n = op(fd, iov or (buf[:size],), pos)  # to or from the page cache: one call moves it all
        while n > 0:
            done += n
            if done >= size:
                return size
            n = op(fd, (buf[done:size],), pos + done)
    except OSError as err:
        return -(err.errno or errno.EIO)
    if done < size:
        if writing:
            return -errno.ENOSPC
        buf[done:size] = bytes(size - done)
    return size


#: Sizes one :class:`Prefixes` keeps iovecs for.
PREFIXES_KEPT = 8


class Prefixes(dict):  # type: ignore[type-arg]
    """``(buf[:size],)`` per ``size``, made on first use: the iovec of :func:`copy_inline`
    for a buffer that serves request after request (a FUSE ring entry's payload). Making
    the slice and its tuple measured 0.2 us, a lookup here 0.05 us (timeit, loaded
    machine); most requests have one of a few sizes (past :data:`PREFIXES_KEPT` sizes the
    oldest is dropped). :meth:`release` the views before the buffer."""

    def __init__(self, buf: memoryview) -> None:
        super().__init__()
        self.buf = buf

    def __missing__(self, size: int) -> tuple[memoryview]:
        if len(self) >= PREFIXES_KEPT:
            (view,) = self.pop(next(iter(self)))
            view.release()
        iov = self[size] = (self.buf[:size],)
        return iov

    def release(self) -> None:
        for (view,) in self.values():
            view.release()
        self.clear()
