"""Writes a qcow2 node cannot put in place: cluster allocation and copy-on-write, and the
freeing of the clusters an entry drops.

A write into a cluster that is not this image's alone gets a host cluster of its own, filled
from where the cluster reads now around the new data, and only then does the L2 entry point
at it (node.py's docstring tells the locking). :class:`Allocations` keeps the guest clusters
being allocated, one write each; changes of many entries at once wait them out with
:func:`exclusive`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from qsd_py.block.drain import InFlight
from qsd_py.block.lock import CrossLoopLock
from qsd_py.block.qcow2.corruption import corruption_error, signal_corruption
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZEROES,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    c_hex,
    compressed_range,
    subcluster_mask,
)
from qsd_py.block.qcow2.mapping import MappingError, Run
from qsd_py.block.qcow2.refcount import (
    DISCARD_ALWAYS,
    DISCARD_OTHER,
    DISCARD_REQUEST,
    DISCARD_SNAPSHOT,
)

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

log = logging.getLogger(__name__)


class Allocations:
    """The guest clusters whose allocating write is in flight, and the lock that lets a
    change of many entries stop new ones from starting while it waits for these."""

    def __init__(self) -> None:
        self.change_lock = CrossLoopLock()
        self._clusters: dict[int, InFlight] = {}  # guest cluster -> its allocation
        self._in_flight = InFlight()  # every allocating write

    def running(self, guest_cluster: int) -> InFlight | None:
        return self._clusters.get(guest_cluster)

    def start(self, guest_cluster: int) -> None:
        mine = self._clusters[guest_cluster] = InFlight()
        mine.enter()
        self._in_flight.enter()

    def end(self, guest_cluster: int) -> None:
        self._clusters.pop(guest_cluster).leave()
        self._in_flight.leave()

    async def wait_idle(self) -> None:
        await self._in_flight.wait_idle()


@contextlib.asynccontextmanager
async def exclusive(node: Qcow2Node) -> AsyncIterator[None]:
    """For changes of many entries at once (discard, zeroing, resize): no allocation in
    flight, none starting, and the metadata lock held."""
    async with node.allocations.change_lock:
        await node.allocations.wait_idle()
        async with node.meta_lock:
            yield


async def allocating_write(node: Qcow2Node, offset: int, part: memoryview) -> None:
    """Write into one cluster that needs metadata changes (looked up again: an earlier
    write may have made it writable in place meanwhile)."""
    assert node.refcounts is not None
    guest_cluster = offset >> node.cluster_bits
    in_cluster = offset & (node.cluster_size - 1)
    l2e, bitmap = await _begin_allocation(node, guest_cluster)
    try:
        await node.check_write_entry(offset, l2e, bitmap, len(part))
        host = node.in_place_host(l2e, bitmap, in_cluster, len(part))
        if host < 0:
            await _cow_write(node, guest_cluster, l2e, bitmap, in_cluster, part)
            return
        node.refcounts.hold(host >> node.cluster_bits)
        try:
            await node.write_in_place(host, part)
        finally:
            node.refcounts.release(host >> node.cluster_bits)
    finally:
        node.allocations.end(guest_cluster)


async def _begin_allocation(node: Qcow2Node, guest_cluster: int) -> tuple[int, int]:
    """Become the one allocation of ``guest_cluster`` (a second write to it waits for
    the first, allocations of other clusters run in parallel; discards, zeroing and
    resizes wait until none is in flight, see :func:`exclusive`). Returns the entry, which
    nobody else changes until ``node.allocations.end``."""
    assert node.map is not None
    while True:
        async with node.allocations.change_lock, node.meta_lock:
            other = node.allocations.running(guest_cluster)
            if other is None:
                node.allocations.start(guest_cluster)
                await node.mark_dirty()
                return await node.map.entry(guest_cluster)
        await other.wait_idle()


async def prepare_run(node: Qcow2Node, pending: list[tuple[int, int]]) -> bool:
    """Whether the clusters a write must allocate are consecutive, fresh, and were
    allocated together (:func:`prepare_fast_write`)."""
    for (start, n), (after, _) in itertools.pairwise(pending):
        if start + n != after:
            return False
    start = pending[0][0]
    return await prepare_fast_write(node, start, pending[-1][0] + pending[-1][1] - start)


async def prepare_fast_write(node: Qcow2Node, offset: int, length: int) -> bool:
    """Give the fresh clusters of a write (no host cluster, reading as zeroes) host
    clusters of zeroes, allocated as one run, so that the data can go in place in one
    request (a queue worker writes it itself: no data passes through the daemon).
    False where a cluster needs its data copied, or another write is allocating it."""
    if node.read_only or node.corrupt or node.map is None or "data-file" in node.children:
        return False
    bits = node.cluster_bits
    clusters = range(offset >> bits, ((offset + length - 1) >> bits) + 1)
    entries = await _begin_allocations(node, clusters)
    if entries is None:
        return False
    try:
        fresh = []
        for guest_cluster, (l2e, bitmap) in zip(clusters, entries, strict=True):
            if node.in_place_host(l2e, bitmap, 0, node.cluster_size) >= 0:
                continue  # an earlier write got there first
            if node.allocated(l2e) or not _reads_zero_everywhere(node, l2e, bitmap):
                return False
            fresh.append((guest_cluster, l2e, bitmap))
        if fresh:
            await _allocate_fresh(node, fresh)
        return True
    finally:
        for guest_cluster in clusters:
            node.allocations.end(guest_cluster)


async def _begin_allocations(node: Qcow2Node, clusters: range) -> list[tuple[int, int]] | None:
    """:func:`_begin_allocation` of several clusters at once; None (nothing registered)
    if one of them is being allocated already."""
    assert node.map is not None
    async with node.allocations.change_lock, node.meta_lock:
        if any(node.allocations.running(c) is not None for c in clusters):
            return None
        for guest_cluster in clusters:
            node.allocations.start(guest_cluster)
        await node.mark_dirty()
        return [await node.map.entry(c) for c in clusters]


async def _allocate_fresh(node: Qcow2Node, fresh: list[tuple[int, int, int]]) -> None:
    """Consecutive host clusters of zeroes for ``fresh`` (guest cluster, entry, bitmap),
    linked in order."""
    assert node.refcounts is not None and node.map is not None
    cs = node.cluster_size
    async with node.meta_lock:
        for guest_cluster, _, _ in fresh:
            await node.map.prepare_table(guest_cluster)
        never_used = node.refcounts.high_water
        host = await node.refcounts.allocate(len(fresh) * cs)
    held = range(host >> node.cluster_bits, (host >> node.cluster_bits) + len(fresh))
    for index in held:
        node.refcounts.hold(index)
    try:
        if held.start < never_used:  # reused clusters: zero them
            await node.data_node.write_zeroes(host, len(fresh) * cs, False)
        async with node.meta_lock:
            for i, (guest_cluster, l2e, bitmap) in enumerate(fresh):
                await _link(node, guest_cluster, l2e, bitmap, host + i * cs, 0, cs, False)
    finally:
        for index in held:
            node.refcounts.release(index)


async def _cow_write(
    node: Qcow2Node, guest_cluster: int, l2e: int, bitmap: int, in_cluster: int, part: memoryview
) -> None:
    """Allocate (or reuse, for a subcluster of a cluster of ours) a host cluster, fill
    it from where the cluster reads now around the new data, then point the L2 entry at
    it and drop the old cluster's reference."""
    assert node.map is not None and node.refcounts is not None
    cs = node.cluster_size
    extended = node.map.extended
    own = extended and l2e & OFLAG_COPIED and node.allocated(l2e)
    # The span to write: the whole cluster, or (extended L2) whole subclusters.
    if extended:
        sc = cs // SUBCLUSTERS
        lo = in_cluster - in_cluster % sc
        hi = -(-(in_cluster + len(part)) // sc) * sc
        if not own and l2e & OFLAG_COMPRESSED:
            lo, hi = 0, cs  # a compressed cluster is copied whole
        elif not own and bitmap & BITMAP_ALL_ALLOC and node.allocated(l2e):
            lo, hi = 0, cs  # a shared cluster with data: copied whole
    else:
        lo, hi = 0, cs
    guest_base = guest_cluster << node.cluster_bits
    async with node.meta_lock:
        await node.map.prepare_table(guest_cluster)
        # Fresh: past every cluster ever used, so it reads as zeroes already.
        never_used = node.refcounts.high_water
        if own:
            new_host = l2e & L2E_OFFSET_MASK
        elif "data-file" in node.children:
            new_host = guest_base  # an external data file maps guest = host offsets
            never_used = 1 << 62
        else:
            new_host = await node.refcounts.allocate(cs)
        fresh = not own and (new_host >> node.cluster_bits) >= never_used
        node.refcounts.hold(new_host >> node.cluster_bits)
    try:
        span = bytearray(hi - lo)
        view = memoryview(span)
        head = in_cluster - lo
        tail = head + len(part)
        skip_zero_cow = fresh and _reads_zero_everywhere(node, l2e, bitmap)
        if not skip_zero_cow:
            if head:
                await _read_old(node, guest_base + lo, l2e, bitmap, view[:head])
            if tail < len(span):
                await _read_old(node, guest_base + lo + tail, l2e, bitmap, view[tail:])
            view[head:tail] = part
            await node.check_overlap(new_host + lo, len(span))
            await node.data_node.write(new_host + lo, view)
        else:
            await node.check_overlap(new_host + in_cluster, len(part))
            await node.data_node.write(new_host + in_cluster, part)
        async with node.meta_lock:
            await _link(node, guest_cluster, l2e, bitmap, new_host, lo, hi, own)
    finally:
        node.refcounts.release(new_host >> node.cluster_bits)


def _reads_zero_everywhere(node: Qcow2Node, l2e: int, bitmap: int) -> bool:
    """Whether the cluster's old content is all zeroes without reading anything."""
    if l2e & OFLAG_COMPRESSED:
        return False
    if node.map is not None and node.map.extended:
        if bitmap & BITMAP_ALL_ALLOC:
            return False
        if bitmap >> 32 == BITMAP_ALL_ALLOC:
            return True
    elif l2e & OFLAG_ZERO:
        return True
    elif node.allocated(l2e):
        return False
    return node.backing is None


async def _read_old(node: Qcow2Node, offset: int, l2e: int, bitmap: int, out: memoryview) -> None:
    """What ``out``'s range of the guest reads now (copy-on-write source)."""
    in_cluster = offset & (node.cluster_size - 1)
    guest_cluster = offset >> node.cluster_bits
    pos = 0
    try:
        pieces = node.classify(guest_cluster, l2e, bitmap, in_cluster, len(out))
    except MappingError as err:
        raise await corruption_error(node, str(err)) from err
    for kind, host, n in pieces:
        await node.read_run(Run(kind, offset + pos, n, host), out[pos : pos + n])
        pos += n


async def _link(
    node: Qcow2Node,
    guest_cluster: int,
    old: int,
    bitmap: int,
    new_host: int,
    lo: int,
    hi: int,
    own: bool,
) -> None:
    """Point the entry at the new cluster (after its refcount: the L2 cache depends on
    the refcount cache), then drop the old cluster's reference."""
    assert node.map is not None and node.refcounts is not None
    new_bitmap = 0
    if node.map.extended:
        mask = subcluster_mask(lo, hi - lo, node.cluster_size)
        new_bitmap = (bitmap | mask) & ~(mask << 32)
        if not own and (lo, hi) == (0, node.cluster_size):
            new_bitmap = BITMAP_ALL_ALLOC
        elif not own:
            new_bitmap = mask | (bitmap & ~mask & BITMAP_ALL_ZEROES)
    if not node.lazy_refcounts():
        await node.map.cache.depend_on(node.refcounts.cache)
    await node.map.set_entry(guest_cluster, new_host | OFLAG_COPIED, new_bitmap)
    if not own:
        await free_entry(node, old, DISCARD_OTHER)


async def free_entry(node: Qcow2Node, l2e: int, discard_type: int) -> None:
    """Drop the reference an old L2 entry held (data or compressed clusters); the L2
    update must reach the disk first (the refcount cache depends on the L2 cache)."""
    assert node.map is not None and node.refcounts is not None
    if l2e & OFLAG_COMPRESSED:
        host, nbytes = compressed_range(l2e, node.cluster_bits)
        start, n = host & ~511, nbytes
    else:
        start, n = l2e & L2E_OFFSET_MASK, node.cluster_size
        if not start or "data-file" in node.children:
            return  # nothing allocated, or data clusters are not refcounted
        if start & (node.cluster_size - 1):
            text = f"Cannot free unaligned cluster {c_hex(start)}"
            await signal_corruption(node, text, fatal=False)
            return
    if not node.lazy_refcounts():
        await node.refcounts.cache.depend_on(node.map.cache)
    if node.table is not None and not await node.table.barrier():
        log.error("qcow2: leaking cluster %#x: a fast-path request still uses it", start)
        return
    await node.refcounts.free(start, n, discard_type)


async def discard_freed(node: Qcow2Node, offset: int, nbytes: int, kind: int) -> None:
    """A cluster's last reference went: pass the discard to the file if allowed."""
    opts = node.options
    assert opts is not None
    allowed = {
        DISCARD_REQUEST: opts.pass_discard_request,
        DISCARD_SNAPSHOT: opts.pass_discard_snapshot,
        DISCARD_OTHER: opts.pass_discard_other,
        DISCARD_ALWAYS: True,
    }[kind]
    if allowed:
        await node.file.discard(offset, nbytes)
