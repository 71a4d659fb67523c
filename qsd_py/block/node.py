"""The block node interface every driver implements and every export calls.

CONTRACT (exports rely on it; drivers implement it):

* All I/O methods are coroutines and may be awaited from *any* asyncio loop (the main loop
  or an iothread's loop). Drivers must never block the calling loop: blocking syscalls go to
  a thread pool (``aio=threads``) or an io_uring (``aio=io_uring``).
* Offsets and lengths are in bytes, need no alignment, and must lie inside
  ``[0, length())``: callers (exports) clip requests at EOF themselves.
* ``read`` fills the whole caller-provided buffer; ``write`` writes the whole buffer. A short
  transfer from the OS is retried or becomes an ``OSError``.
* Errors are raised as ``OSError`` with a meaningful errno (exports turn them into -errno).
* ``length()`` is a whole number of 512-byte sectors, as everywhere in QEMU's block layer: a
  file of 1 MiB + 1 byte is a node of 1 MiB + 512, and the bytes past the file's real end
  read as zeroes (a write there extends the file). :func:`round_to_sectors` does the rounding.

Callers use the public methods (``read``, ``write``, ...); drivers implement the ``do_*``
methods behind them. The public ones count the request in flight (so a node can be drained,
drain.py) and hold the rules every driver shares, as QEMU's generic block layer does around
its drivers' callbacks. A node reaches the nodes below it only through its children
(child.py): ``self.children[role].node``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from qsd_py.block import shared_bits
from qsd_py.block.child import Child
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.drain import InFlight
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm, perm_names
from qsd_py.block.stats import (
    FAILED_FLUSH,
    FAILED_RD,
    FAILED_UNMAP,
    FAILED_WR,
    FLUSH_OPS,
    RD_BYTES,
    RD_OPS,
    UNMAP_BYTES,
    UNMAP_OPS,
    WR_BYTES,
    WR_OPS,
    NodeStats,
)
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.fast_io import FastPlan
    from qsd_py.block.fast_map import FastTarget
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.rangelock import RangeGate

Buffer = memoryview | bytearray | bytes

SECTOR_SIZE = 512
MAX_OFFSET = (1 << 63) - 1  # no request reaches past this byte (QEMU's int64 offsets)


# Block status flags, QEMU's BDRV_BLOCK_* values.
STATUS_DATA = 0x01  #: the range holds data (reads come from storage)
STATUS_ZERO = 0x02  #: the range reads as zeroes
STATUS_OFFSET_VALID = 0x04  #: ``map_node``/``map_offset`` say where the bytes lie
STATUS_ALLOCATED = 0x10  #: this layer answers reads of the range (no fall-through to backing)


class BlockStatus(NamedTuple):
    """What a range of a node is: ``flags`` (``STATUS_*``) for the ``length`` bytes from the
    offset asked about, where they lie (``map_node`` at ``map_offset``, with
    ``STATUS_OFFSET_VALID``), and ``depth``: 1 when this node holds the range, 2 its backing
    node, and so on; 0 when no node of the chain holds it (set by ``block_status_above``)."""

    flags: int
    length: int
    map_node: BlockNode | None = None
    map_offset: int = 0
    depth: int = 0

    @property
    def is_data(self) -> bool:
        """What SEEK_DATA stops at: data, or a range not known to read as zeroes."""
        return bool(self.flags & STATUS_DATA) or not self.flags & STATUS_ZERO


# Zeroes to copy or write from: page aligned (an mmap), so O_DIRECT files take them as is.
ZERO_CHUNK = 1 << 20
_zero_chunk = mmap.mmap(-1, ZERO_CHUNK)


def fill_zeroes(view: memoryview) -> None:
    """Zero a caller's buffer (reads of holes, zero clusters, null-co's read-zeroes)."""
    zeroes = memoryview(_zero_chunk)
    for pos in range(0, len(view), ZERO_CHUNK):
        n = min(ZERO_CHUNK, len(view) - pos)
        view[pos : pos + n] = zeroes[:n]


def qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in (its tdb hash, 512 buckets): QEMU writes the
    members of a ``json:`` filename in bucket order."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, byte in enumerate(key.encode()):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def round_to_sectors(nbytes: int) -> int:
    """``nbytes`` rounded up to whole sectors: QEMU counts every length in sectors, so every
    user (query-named-block-nodes, an export's size, reads of the tail) sees this length."""
    return -(-nbytes // SECTOR_SIZE) * SECTOR_SIZE


class BlockNode:
    """A node of the block graph.

    ``opts`` is the validated ``BlockdevOptions`` dict (blockdev-add arguments or the parsed
    ``--blockdev``). Drivers set ``read_only`` and open their children in ``__init__``
    (or an async ``open``) and release them in ``close``.
    """

    driver: ClassVar[str]
    #: Whether the format has a backing chain: unallocated ranges read from the ``backing``
    #: child, or as zeroes without one (QEMU's ``supports_backing``).
    supports_backing: ClassVar[bool] = False

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        self.graph = graph
        self.opts = opts
        self.node_name: str = opts["node-name"]
        self.read_only: bool = bool(opts.get("read-only", False))
        # discard=unmap lets write_zeroes(unmap=True)/discard deallocate; ignore (default) zeroes.
        self.discard_unmap: bool = opts.get("discard", "ignore") == "unmap"
        self.force_share: bool = bool(opts.get("force-share", False))
        self.users: dict[str, NodeUser] = {}
        # Links to child nodes by role ("file", "backing"); implicit children were created
        # from an inline dict and are deleted with this node.
        self.children: dict[str, Child] = {}
        self.implicit = False
        self.active = True  # False: inactivated (blockdev-set-active), no lock held
        self.in_flight = InFlight()
        # wr_highest_offset and the write threshold, shared with queue workers (stats.py).
        self.stats = NodeStats()
        # Writes counted and the count at the last flush, as QEMU's write_gen/flushed_gen:
        # a flush with nothing written since the last one is not passed to the disk (and
        # raises no flush_to_disk event; blkdebug's flush rules see no flush then).
        self.write_gen = 0
        self.flushed_gen = 0
        self.flush_needed = True
        # Bitmaps that every write marks (a mirror's; later the user's, issue 20).
        self.dirty_bitmaps: list[DirtyBitmap] = []
        # Fast plans of exports whose chain reaches this node (fast_io.plan_for registers
        # them) with the ``writable`` they had before a bitmap closed them to writes.
        # Jobs that forbid deleting this node: QEMU's op blockers (reason by job id).
        self.blockers: dict[str, str] = {}
        # Jobs' copy-on-read ranges that guest writes wait for (block-stream, rangelock.py).
        self.write_gates: list[RangeGate] = []
        # Owners that need every write through the coroutines (fast plans closed to writes).
        self._slow_writers: set[object] = set()
        # Nodes every write is also written to before it completes (an active mirror).
        self.write_mirrors: list[BlockNode] = []
        self.fast_plans: weakref.WeakSet[FastPlan] = weakref.WeakSet()
        # A page shared with the processes forked later (FUSE queue workers): byte 0 set
        # while their writes must take the coroutines (their copies of the fast plans read
        # it before every write, fast_io.route; plan.writable is this process's), then the
        # bitmaps they mark themselves (shared_bits.py).
        self.fork_page = mmap.mmap(-1, mmap.PAGESIZE)
        self._fork_blockers: set[object] = set()
        self.home_pid = os.getpid()  # the daemon: its plans obey plan.writable
        self._closed_plans: weakref.WeakKeyDictionary[FastPlan, bool] = weakref.WeakKeyDictionary()

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Open files and children. Raise QMPError with QEMU's text on failure."""

    async def prepare_close(self) -> None:
        """Write back what the node caches (metadata), before :meth:`close`."""

    def close(self) -> None:
        """Release files, locks and children."""

    # --- permissions ----------------------------------------------------------------------
    def add_user(
        self,
        user: str,
        write: bool,
        resize: bool | None = None,
        *,
        shared: Perm = PERM_ALL,
        quiesce: Any = None,
        repoint: Any = None,
    ) -> None:
        """Register a user (an export id or a command). ``write`` asks for the write
        permission: a read-only node raises QMPError (``Block node is read-only``).
        ``resize`` (default: same as ``write``, as QEMU's writable FUSE exports) asks for the
        resize permission. The graph refuses to delete a node that has users
        (``Node X is in use``). ``shared``: what the user lets others do (exports share
        everything, but QEMU's NBD exports keep others from resizing). ``quiesce``: see
        :class:`~qsd_py.block.perm.NodeUser`."""
        perm = Perm.CONSISTENT_READ
        if write:
            perm |= Perm.WRITE
        if write if resize is None else resize:
            perm |= Perm.RESIZE
        desc = f"an unnamed block device (uses node '{self.node_name}' as 'root' child)"
        self.set_user(NodeUser(user, perm, shared, desc, quiesce=quiesce, repoint=repoint))

    def remove_user(self, user: str) -> None:
        if self.users.pop(user, None) is not None:
            self.refresh_perms()

    def set_user(self, new: NodeUser) -> None:
        """Add or update a user, refusing conflicts with QEMU's texts; on failure the node's
        users and permissions (and its children's, and their locks) stay as they were."""
        old = self.users.get(new.key)
        self._check_conflicts(new)
        if self.read_only and new.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
            raise QMPError("Block node is read-only")
        self.users[new.key] = new
        try:
            self.refresh_perms()
        except BaseException:
            if old is None:
                del self.users[new.key]
            else:
                self.users[new.key] = old
            self.refresh_perms()
            raise

    def _check_conflicts(self, new: NodeUser) -> None:
        """QEMU checks every pair of users; the newest user comes first in its list."""
        others = [u for k, u in reversed(self.users.items()) if k != new.key]
        for other in others:
            self._raise_if_conflict(required_by=other, unshared_by=new)
        for other in others:
            self._raise_if_conflict(required_by=new, unshared_by=other)

    def _raise_if_conflict(self, required_by: NodeUser, unshared_by: NodeUser) -> None:
        if required_by.key in unshared_by.tolerates:
            return
        both = required_by.perm & ~unshared_by.shared & PERM_ALL
        if both:
            raise QMPError(
                f"Permission conflict on node '{self.node_name}': permissions "
                f"'{perm_names(Perm(both))}' are both required by {required_by.description} "
                f"and unshared by {unshared_by.description}."
            )

    def cumulative_perms(self) -> tuple[Perm, Perm]:
        """The union of the users' permissions and the intersection of what they share."""
        perm, shared = Perm(0), PERM_ALL
        for user in self.users.values():
            perm |= user.perm
            shared &= user.shared
        if self.force_share:  # a read-only node that never locks others out
            shared = PERM_ALL
        return perm, shared

    def refresh_perms(self) -> None:
        """Recompute the cumulative permissions and hand them to :meth:`apply_perms`."""
        self.apply_perms(*self.cumulative_perms())

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        """Driver hook: pass permissions on to children (raw) or into lock bytes (file).
        Raise QMPError to refuse; the caller restores the previous state."""

    def attach_child(self, role: str, node: BlockNode, perm: Perm, shared: Perm) -> Child:
        """Become a parent of ``node`` in ``role`` (``file``, ``backing``) with permissions;
        attaching a role again updates its permissions."""
        child = self.children.get(role)
        if child is None or child.node is not node:
            # Recorded first: if the node refuses, closing this node still releases it.
            child = self.children[role] = Child(self, role, node)
        child.set_perms(perm, shared)
        return child

    async def replace_child(self, role: str, new: BlockNode) -> None:
        """Point the ``role`` child at ``new`` (a pivot; drain around it). An implicit node
        nobody uses any more afterwards is closed, as it was this node's own."""
        old = self.children[role].replace(new)
        await self.graph.drop_orphan(old)

    def child_node(self, role: str) -> BlockNode | None:
        child = self.children.get(role)
        return None if child is None else child.node

    def detach_children(self) -> None:
        for child in self.children.values():
            child.detach()
        self.children.clear()

    def parents(self) -> list[BlockNode]:
        """The nodes that have this one as a child (from its users)."""
        found = []
        for node in self.graph:
            if any(c.node is self for c in node.children.values()):
                found.append(node)
        return found

    def descendants(self) -> set[BlockNode]:
        """Every node this one reaches through its children (itself only through a loop)."""
        found: set[BlockNode] = set()
        todo = [c.node for c in self.children.values()]
        while todo:
            child = todo.pop()
            if child not in found:
                found.add(child)
                todo.extend(c.node for c in child.children.values())
        return found

    # --- drain ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Wait until no request is in flight on this node or any node above it, and keep
        it so while the body runs (a pivot, a metadata change under the users).

        The users that start requests (exports, jobs) are asked to pause through their
        :class:`~qsd_py.block.perm.NodeUser` ``quiesce`` hook first, then the in-flight
        counts are waited for from the top down. Requests the body itself issues pass."""
        above = self.nodes_above()
        resumes = []
        try:
            for node in above:
                for user in list(node.users.values()):
                    if user.quiesce is not None:
                        resumes.append(await user.quiesce())
            for node in above:
                await node.in_flight.wait_idle()
            yield
        finally:
            for resume in reversed(resumes):
                done = resume()
                if done is not None:  # a job: until it has left its pause point
                    await done

    def nodes_above(self) -> list[BlockNode]:
        """This node and every node that reaches it through children, parents first."""
        order: list[BlockNode] = []
        todo = [self]
        while todo:
            node = todo.pop()
            if node in order:
                continue
            order.append(node)
            todo.extend(node.parents())
        return list(reversed(order))

    def backing_blocker(self) -> str | None:
        """QEMU's op blocker text when another node reads through this one as its backing
        file (it may then be neither resized nor deleted), or None."""
        for parent in self.parents():
            if parent.child_node("backing") is self:
                return (
                    f"Node '{self.node_name}' is busy: node is used as backing hd of "
                    f"'{parent.node_name}'"
                )
        return None

    def in_use_error(self) -> str | None:
        """Why blockdev-del must refuse this node (QEMU's texts, in QEMU's order), or None."""
        if any(not u.is_parent for u in self.users.values()):
            return f"Node {self.node_name} is in use"
        for reason in self.blockers.values():
            return f"Node '{self.node_name}' is busy: {reason}"
        blocker = self.backing_blocker()
        if blocker is not None:
            return blocker
        if self.implicit:
            return f"Node {self.node_name} is not owned by the monitor"
        if self.users:
            return f"Block device {self.node_name} is in use"
        return None

    # --- size -----------------------------------------------------------------------------
    def refresh_length(self) -> None:
        """Learn the length anew after writes past the end (image creation writes a new
        image's first clusters into an empty file, then opens a format on it)."""

    def length(self) -> int:
        """Current length in bytes, a multiple of :data:`SECTOR_SIZE` (cached; updated by
        truncate)."""
        raise NotImplementedError

    def exact_length(self) -> int:
        """The length in bytes as the storage has it, not rounded to sectors (a file's
        size); what a format needs to leave the file as long as QEMU would."""
        return self.length()

    async def truncate(self, length: int, prealloc: str = "off") -> None:
        """Grow (new range reads zeroes) or shrink the node. ``length`` need not be aligned:
        the file gets exactly that size, :meth:`length` then says it rounded up.
        ``prealloc`` (QEMU's PreallocMode: ``off``, ``falloc``, ``full``) allocates the new
        range on the host too (a FUSE fallocate past the end asks for ``falloc``)."""
        self.in_flight.enter()
        try:
            await self.do_truncate(length, prealloc)
        finally:
            self.in_flight.leave()
            if self.dirty_bitmaps:
                self._resize_dirty_bitmaps()

    async def allocated_size(self) -> int:
        """Bytes allocated on the host for this node and the nodes it stores data in (its
        ``file`` and ``data-file`` children; st_blocks * 512 for files); 0 if unknown."""
        return await self.do_allocated_size()

    # --- I/O ------------------------------------------------------------------------------
    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes from ``offset``."""
        _check_range(offset, len(buf))
        self.in_flight.enter()
        failed = True  # query-blockstats: an exception counts the request as failed
        try:
            await self.do_read(offset, buf)
            failed = False
        finally:
            self.in_flight.leave()
            self.stats.account(FAILED_RD if failed else RD_OPS, RD_BYTES, 0 if failed else len(buf))

    async def write(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``."""
        _check_range(offset, len(data))
        self.in_flight.enter()
        gates = None
        failed: bool | None = None  # None: not started (its gates failed), not counted
        try:
            if self.write_gates:
                gates = await self._enter_gates(offset, len(data))
            self.stats.check_threshold(offset + len(data))
            self.stats.wrote(offset + len(data))  # attempted: counted even if it fails, as in QEMU
            failed = True
            await self.do_write(offset, data)
            failed = False
            for other in list(self.write_mirrors):
                await other.write(offset, data)
        finally:
            if failed is not None:
                self._account_write(failed, len(data))
            self.write_gen += 1
            if gates is not None:
                for gate, token in gates:
                    gate.leave(token)
            if self.dirty_bitmaps:
                self._mark_dirty(offset, len(data))
            self.in_flight.leave()

    def _account_write(self, failed: bool, length: int) -> None:
        """query-blockstats: a write or write-zeroes of ``length`` bytes ended."""
        self.stats.account(FAILED_WR if failed else WR_OPS, WR_BYTES, 0 if failed else length)

    async def flush(self) -> None:
        """Make written data stable (fdatasync unless cache.no-flush), children included."""
        self.in_flight.enter()
        failed = True
        try:
            gen = self.write_gen
            self.flush_needed = gen != self.flushed_gen
            # QEMU's generic flush: its events on the file around the two steps.
            if self.graph.debug_nodes:
                self.child_debug_event("file", "flush_to_os")
            await self.do_flush_to_os()
            if self.graph.debug_nodes and self.flush_needed:
                self.child_debug_event("file", "flush_to_disk")
            await self.do_flush()
            self.flushed_gen = gen
            failed = False
        finally:
            self.in_flight.leave()
            self.stats.account(FAILED_FLUSH if failed else FLUSH_OPS, -1, 0)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, no_fallback: bool = False
    ) -> None:
        """Zero a range; deallocate it too when ``unmap`` and the node has discard=unmap.

        ``no_fallback`` (QEMU's BDRV_REQ_NO_FALLBACK, as a FUSE punch-hole asks): where the
        zeroes could only be written as data, fail with ENOTSUP instead of writing them."""
        _check_range(offset, length)
        self.in_flight.enter()
        gates = None
        failed: bool | None = None  # None: not started (its gates failed), not counted
        try:
            if self.write_gates:
                gates = await self._enter_gates(offset, length)
            self.stats.check_threshold(offset + length)
            self.stats.wrote(offset + length)  # attempted: counted even if it fails, as in QEMU
            failed = True
            await self.do_write_zeroes(offset, length, unmap, no_fallback)
            failed = False
            for other in list(self.write_mirrors):
                await other.write_zeroes(offset, length, unmap)
        finally:
            if failed is not None:
                self._account_write(failed, length)
            self.write_gen += 1
            if gates is not None:
                for gate, token in gates:
                    gate.leave(token)
            if self.dirty_bitmaps:
                self._mark_dirty(offset, length)
            self.in_flight.leave()

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if discard=unmap, else do nothing (QEMU's discard=ignore)."""
        _check_range(offset, length)
        self.in_flight.enter()
        gates = None
        failed: bool | None = None  # None: not started (its gates failed), not counted
        try:
            if self.write_gates:
                gates = await self._enter_gates(offset, length)
            self.stats.check_threshold(offset + length)
            failed = True
            await self.do_discard(offset, length)
            failed = False
        finally:
            if failed is not None:
                self.stats.account(FAILED_UNMAP if failed else UNMAP_OPS, UNMAP_BYTES,
                                   0 if failed else length)  # fmt: skip
            self.write_gen += 1
            if gates is not None:
                for gate, token in gates:
                    gate.leave(token)
            if self.dirty_bitmaps:
                self._mark_dirty(offset, length)
            self.in_flight.leave()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """The status of ``[offset, offset + n)`` in this node alone (``0 < n <= length``).

        The generic rules on top of the driver's answer, as QEMU's: data or zeroes count as
        allocated here; an unallocated range of a format with a backing chain reads as
        zeroes when there is no backing node, or lies past the backing node's end."""
        self.in_flight.enter()
        try:
            st = await self.do_block_status(offset, length)
        finally:
            self.in_flight.leave()
        flags = st.flags
        if flags & (STATUS_DATA | STATUS_ZERO):
            flags |= STATUS_ALLOCATED
        elif self.supports_backing:
            backing = self.child_node("backing")
            if backing is None or offset >= backing.length():
                flags |= STATUS_ZERO
        if flags == st.flags:
            return st
        return st._replace(flags=flags)

    async def block_status_above(self, offset: int, length: int) -> BlockStatus:
        """The status through the backing chain: the first node (from this one down) that
        holds the range answers, with its ``depth``; ``depth`` 0 when none does."""
        node: BlockNode | None = self
        depth = 1
        while node is not None:
            st = await node.block_status(offset, length)
            if st.flags & STATUS_ALLOCATED:
                return st._replace(depth=depth)
            backing = node.child_node("backing") if node.supports_backing else None
            if backing is None or offset >= backing.length():
                return st._replace(depth=0)
            length = st.length  # what the next node says is cut to this node's extent
            node = backing
            depth += 1
        raise AssertionError("unreachable")

    # --- blkdebug events ----------------------------------------------------------------------
    def child_debug_event(self, role: str, event: str) -> None:
        """Raise a blkdebug ``event`` (a ``BlkdebugEvent`` value) on the ``role`` child, as
        QEMU's drivers do at the steps the events name. Callers test
        ``self.graph.debug_nodes`` first, so the hook costs nothing without blkdebug."""
        child = self.child_node(role)
        if child is not None:
            child.debug_event(event)

    def debug_event(self, event: str) -> None:
        """Pass an event down the ``file`` children to the first node that takes it (a
        blkdebug node overrides this), as QEMU's bdrv_debug_event looks for one."""
        self.child_debug_event("file", event)

    # --- what drivers implement -----------------------------------------------------------
    async def do_truncate(self, length: int, prealloc: str) -> None:
        raise NotImplementedError

    async def write_zero_buffers(self, offset: int, length: int) -> None:
        """Zeroes written as data through the driver's own ``do_write`` (what a driver falls
        back to where it cannot zero a range otherwise)."""
        zeroes = memoryview(_zero_chunk)
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            await self.do_write(offset, zeroes[:n])
            offset += n

    async def do_allocated_size(self) -> int:
        raise NotImplementedError

    async def do_read(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    async def do_write(self, offset: int, data: Buffer) -> None:
        raise NotImplementedError

    async def do_flush_to_os(self) -> None:
        """Write what the node caches to the nodes below, before :meth:`do_flush` (QEMU's
        flush_to_os step: a format's metadata caches); most nodes cache nothing."""

    async def do_flush(self) -> None:
        raise NotImplementedError

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        raise NotImplementedError

    async def do_discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """This layer's answer: ``STATUS_DATA``/``STATUS_ZERO`` where it holds the range
        (neither: unallocated here), and where the bytes lie when it knows."""
        raise NotImplementedError

    # --- dirty bitmaps -----------------------------------------------------------------------
    async def _enter_gates(self, offset: int, length: int) -> list[tuple[RangeGate, int | None]]:
        """Register a write with every gate (rangelock.py), waiting where a job holds it."""
        entered: list[tuple[RangeGate, int | None]] = []
        try:
            for gate in list(self.write_gates):
                entered.append((gate, await gate.enter(offset, length)))
        except BaseException:
            for gate, token in entered:
                gate.leave(token)
            raise
        return entered

    def _mark_dirty(self, offset: int, length: int) -> None:
        for bitmap in self.dirty_bitmaps:
            if bitmap.enabled:
                bitmap.mark(offset, length)

    def add_dirty_bitmap(self, bitmap: DirtyBitmap) -> None:
        """Mark ``bitmap`` with every write from now on, while it is enabled (see
        :meth:`_record`: the fast paths mark a shared bitmap themselves)."""
        self.dirty_bitmaps.append(bitmap)
        if bitmap.enabled:
            self._record(bitmap)

    def remove_dirty_bitmap(self, bitmap: DirtyBitmap) -> None:
        """Stop marking ``bitmap``."""
        if bitmap in self.dirty_bitmaps:
            self.dirty_bitmaps.remove(bitmap)
        self.open_fast_writes(bitmap)
        self._publish_marks()
        bitmap.unshare()

    def enable_dirty_bitmap(self, bitmap: DirtyBitmap, enabled: bool) -> None:
        """Start or stop recording writes in ``bitmap`` (block-dirty-bitmap-enable/-disable)."""
        bitmap.enabled = enabled
        if enabled:
            self._record(bitmap)
        else:
            self.open_fast_writes(bitmap)
            self._publish_marks()

    def _record(self, bitmap: DirtyBitmap) -> None:
        """A bitmap starts recording. A shared one (the user's) is marked by every fast
        path itself, the daemon's (NBD, /dev/fuse) and the queue workers' (FastPlan.mark
        after each fast write): it closes no plan to writes (a background mirror's is shared
        too: it seals the node at its end, MirrorJob._seal). Any other (a write-blocking
        mirror's) needs every write through the node."""
        if bitmap.shared is None:
            self.close_fast_writes(bitmap)
        self._publish_marks()

    def _resize_dirty_bitmaps(self) -> None:
        """QEMU resizes every bitmap with its node: new chunks clean, cut ones gone."""
        retired = [bitmap.resize(self.length()) for bitmap in self.dirty_bitmaps]
        self._publish_marks()
        for old in retired:  # closed only now: a fork may map what the list names
            if old is not None:
                old.close()

    def _publish_marks(self) -> None:
        """List the recording shared bitmaps for the forks (shared_bits.py); more than the
        page holds: the forks' writes take the coroutines instead."""
        entries = [b.shared_entry() for b in self.dirty_bitmaps if b.enabled]
        listed = [e for e in entries if e is not None]
        if len(listed) > shared_bits.MAX_ENTRIES:
            self.close_fast_writes(shared_bits, forks=True)
            listed = []
        else:
            self.open_fast_writes(shared_bits)
        shared_bits.publish(self.fork_page, listed)

    def close_fast_writes(self, owner: object, forks: bool = True) -> None:
        """Until :meth:`open_fast_writes` (``owner``), every write passes through this
        node's coroutines: the exports' fast plans that reach this node stop writing around
        it (reads still take the fast path), and plans made meanwhile are born so.
        ``forks``: the plans of processes forked from the daemon too (the fork page's gate,
        which they read before every write); False: they mark the node's bitmaps
        themselves."""
        self._slow_writers.add(owner)
        if forks:
            self._fork_blockers.add(owner)
            self.fork_page[0] = 1
        closing = [plan for plan in self.fast_plans if plan not in self._closed_plans]
        for plan in closing:
            self._closed_plans[plan] = plan.writable
            plan.writable = False
        if closing:
            self.fast_plans_changed()

    def open_fast_writes(self, owner: object) -> None:
        """``owner`` no longer needs it; with no owner left, fast plans write again."""
        self._fork_blockers.discard(owner)
        if not self._fork_blockers:
            self.fork_page[0] = 0
        self._slow_writers.discard(owner)
        if self._slow_writers:
            return
        closed, self._closed_plans = self._closed_plans, weakref.WeakKeyDictionary()
        for plan, writable in closed.items():
            plan.writable = writable
        if closed:
            self.fast_plans_changed()

    async def settle_fast_writes(self) -> None:
        """Once the plans are closed (:meth:`close_fast_writes`): wait until the fast writes
        that passed their plan's check before are done, so they marked the node's shared
        bitmaps (fast_settle.py). A plan without ``settle`` is waited for by nobody: its
        owner must finish each fast write in the turn that routed it."""
        for plan in list(self.fast_plans):
            if plan.settle is not None:
                await plan.settle()

    def fast_plans_changed(self) -> None:
        """Something under the plans that reach this node changed (writes closed or opened,
        a child replaced, a reopen): tell the owners that watch their plans (``on_change``:
        FUSE queue workers, whose copies of a plan live in other processes, get a new one
        before this returns)."""
        for plan in list(self.fast_plans):
            if plan.on_change is not None:
                plan.on_change()

    def dirty_bitmap(self, name: str) -> DirtyBitmap | None:
        """The dirty bitmap ``name`` of this node (what NBD exports offer as
        ``qemu:dirty-bitmap:NAME``), or None."""
        for bitmap in self.dirty_bitmaps:
            if bitmap.name == name:
                return bitmap
        return None

    def dirty_bitmaps_info(self) -> list[dict[str, Any]]:
        """``dirty-bitmaps`` of query-named-block-nodes: the named bitmaps, newest first (a
        job's own bitmap has no name: QEMU keeps it on a filter node no query lists)."""
        return [b.info() for b in reversed(self.dirty_bitmaps) if b.name is not None]

    def can_store_dirty_bitmap(self, name: str, granularity: int) -> None:
        """Refuse a persistent bitmap this node cannot store, with QEMU's text; formats
        that store them (qcow2) override this."""
        raise QMPError(
            f"Can't store persistent bitmaps to {self.node_name}: Operation not supported"
        )

    async def remove_persistent_bitmap(self, bitmap: DirtyBitmap) -> None:
        """Drop a persistent bitmap from the image at once (block-dirty-bitmap-remove)."""

    # --- the exports' fast path -------------------------------------------------------------
    def fast_target(self) -> FastTarget | None:
        """What this node's bytes are on the host, for exports that read and write them
        without the node's coroutines (qsd_py/block/fast_map.py); None: always ask the node."""
        return None

    async def prepare_fast_write(self, offset: int, length: int) -> bool:
        """Make ``[offset, +length)`` writable in place through :meth:`fast_target` if that
        needs no data copied (fresh clusters of a format); False: write through the node."""
        return False

    # --- introspection --------------------------------------------------------------------
    format_name: ClassVar[str]

    def filename(self) -> str:
        """QEMU's ``file``/``image.filename``: a path, a protocol URL or ``json:{...}``."""
        raise NotImplementedError

    def full_options(self) -> dict[str, Any]:
        """What reopens this node as it is (QEMU's full_open_options), for the ``json:``
        filenames of the formats above it."""
        return {"driver": self.driver, "filename": self.filename()}

    def allocated_size_now(self) -> int | None:
        """Synchronous allocated size for ``info()`` (an fstat, never slow). None: the node
        cannot say (a remote one: nbd, rbd), and neither can a format stored in it; QEMU then
        shows no ``actual-size``."""
        return 0

    def limits(self) -> dict[str, int]:
        """``image.limits``: the alignment this node really needs from its callers."""
        return {
            "request-alignment": 1,
            "min-mem-alignment": 1,
            "opt-mem-alignment": 4096,
            "max-iov": 1024,
        }

    def image_extra(self) -> dict[str, Any]:
        """Driver-specific ``ImageInfo`` members: ``dirty-flag``, ``cluster-size``, the
        backing file names of the image's header, ``snapshots``, ``format-specific``."""
        return {}

    def image_info(self, flat: bool = False) -> dict[str, Any]:
        """The ``ImageInfo`` of this node, members in the schema's order; with its backing
        node's nested as ``backing-image`` unless ``flat``."""
        extra = self.image_extra()
        image: dict[str, Any] = {"filename": self.filename(), "format": self.format_name}
        if "dirty-flag" in extra:
            image["dirty-flag"] = extra.pop("dirty-flag")
        actual = self.allocated_size_now()
        if actual is not None:
            image["actual-size"] = actual
        image["virtual-size"] = self.length()
        specific = extra.pop("format-specific", None)
        image.update(extra)
        image["limits"] = self.limits()
        if specific is not None:
            image["format-specific"] = specific
        backing = self.child_node("backing")
        if backing is not None and not flat:
            image["backing-image"] = backing.image_info()
        return image

    def specific_stats(self) -> dict[str, Any] | None:
        """``driver-specific`` of query-blockstats (QEMU: only file, host_device, nvme)."""
        return None

    def stats_parent(self) -> BlockNode | None:
        """The child query-blockstats nests as ``parent``: the one that stores the data
        (QEMU's primary child when it holds data or is filtered: ``file``, or an external
        ``data-file``); never the backing node."""
        data = self.child_node("data-file")
        return data if data is not None else self.child_node("file")

    def backing_depth(self) -> int:
        """How many backing nodes lie below this one (a filter below counts its child as
        its backing node, as QEMU counts: :meth:`CopyOnReadNode.backing_depth`)."""
        backing = self.child_node("backing")
        return 0 if backing is None else 1 + backing.backing_depth()

    def info(self, flat: bool = False) -> dict[str, Any]:
        """The ``BlockDeviceInfo`` entry of ``query-named-block-nodes`` (``flat``: no
        nested backing images, and every depth 0, as QEMU answers).

        No throttling or encryption, so those members are the zeroes and ``false`` QEMU
        reports for nodes without them."""
        cache = self.opts.get("cache", {})
        image = self.image_info(flat)
        entry: dict[str, Any] = {
            "file": image["filename"],
            "node-name": self.node_name,
            "ro": self.read_only,
            "drv": self.driver,
        }
        backing = self.child_node("backing")
        if backing is not None:
            entry["backing_file"] = backing.filename()
        entry["backing_file_depth"] = 0 if flat else self.backing_depth()
        # Newest link first, as QEMU lists them (a format's backing before its file).
        entry["children"] = [
            {"child": role, "node-name": child.node.node_name}
            for role, child in reversed(self.children.items())
        ]
        entry.update(
            {
                "active": self.active,
                "encrypted": False,
                "detect_zeroes": "off",
                "bps": 0,
                "bps_rd": 0,
                "bps_wr": 0,
                "iops": 0,
                "iops_rd": 0,
                "iops_wr": 0,
                "image": image,
                "cache": {
                    "writeback": True,
                    "direct": bool(cache.get("direct", False)),
                    "no-flush": bool(cache.get("no-flush", False)),
                },
                # An int64 in BlockDeviceInfo: QEMU shows a uint64 threshold past it negative.
                "write_threshold": (self.stats.threshold ^ 1 << 63) - (1 << 63),
            }
        )
        bitmaps = self.dirty_bitmaps_info()
        if bitmaps:
            entry["dirty-bitmaps"] = bitmaps
        return entry


def _check_range(offset: int, length: int) -> None:
    """A request outside what a 64-bit signed offset can say fails as in QEMU (EIO) before
    it reaches a syscall that could not take it (a damaged image's table can ask for one)."""
    if offset < 0 or length < 0 or offset > MAX_OFFSET - length:
        raise OSError(errno.EIO, f"request at {offset:#x} (+{length}) out of range")
