"""Writes a qcow2 node cannot put in place: cluster allocation and copy-on-write, and the
freeing of the clusters an entry drops.

A write into a cluster that is not this image's alone gets a host cluster of its own, filled
from where the cluster reads now around the new data, and only then does the L2 entry point
at it (node.py's docstring tells the locking). :class:`Allocations` keeps the guest clusters
being allocated, one write each; changes of many entries at once wait them out with
:func:`exclusive`.

Host clusters are placed as QEMU places them for the same request: per L2 slice (its table
made writable first), each run continuing on the host right after the cluster before it in
the request when those clusters are free, else in the first free run; what a write copies
(the cluster, or with extended L2 the touched subclusters, widened over a shared cluster's
allocated ones) is what QEMU copies. Multi-cluster writes into fresh clusters are allocated
together, one batch per L2 slice: the node's own (:func:`write_fresh`) writes the data to
the host run in one request, then sets the entries in one L2 update (after the refcounts,
as QEMU links them); a queue worker's (:func:`prepare_fast_write`) gets the entries first
and writes the data itself, so reused clusters are zeroed whole for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qsd_py.block.drain import InFlight
from qsd_py.block.lock import CrossLoopLock
from qsd_py.block.qcow2.corruption import corruption_error, signal_corruption
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ALLOC,
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
    DISCARD_NEVER,
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

    def any_running(self, clusters: range) -> bool:
        return not self._clusters.keys().isdisjoint(clusters)

    def start_many(self, clusters: range) -> None:
        """:meth:`start` of a batch's clusters, sharing one count (ended together)."""
        mine = InFlight()
        mine.enter()
        self._in_flight.enter()
        self._clusters.update(dict.fromkeys(clusters, mine))

    def end_many(self, clusters: range) -> None:
        pop = self._clusters.pop
        mine = None
        for guest_cluster in clusters:
            mine = pop(guest_cluster)
        if mine is not None:
            mine.leave()
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


@dataclass(slots=True)
class Pending:
    """A cluster's part of a write that needs its metadata changed: ``n`` bytes at guest
    ``pos``, and ``before``: the host end of the request's cluster just before it when that
    one was written in place (else -1), where QEMU tries to continue the allocation."""

    pos: int
    n: int
    before: int = -1


async def write_pending(node: Qcow2Node, offset: int, buf: memoryview, pend: list[Pending]) -> None:
    """Write the parts of a request (``buf`` at ``offset``) that need clusters allocated or
    copied, placing them as QEMU does: per L2 slice, each run continuing on the host where
    the cluster before it ends when those clusters are free, else in the first free run."""
    expect, pos_end = -1, -1
    for group in _groups(node, pend):
        first = group[0]
        if first.before >= 0:
            expect = first.before
        elif first.pos != pos_end:
            expect = -1
        expect = await _write_group(node, offset, buf, group, expect)
        pos_end = group[-1].pos + group[-1].n


def _groups(node: Qcow2Node, pend: list[Pending]) -> list[list[Pending]]:
    """Consecutive pending clusters within one L2 slice (QEMU allocates per slice)."""
    assert node.map is not None
    per_slice = node.map.slice_entries
    groups: list[list[Pending]] = []
    for p in pend:
        if groups and p.before < 0:
            last = groups[-1][-1]
            same_slice = (last.pos >> node.cluster_bits) // per_slice == (
                p.pos >> node.cluster_bits
            ) // per_slice
            if last.pos + last.n == p.pos and same_slice:
                groups[-1].append(p)
                continue
        groups.append([p])
    return groups


async def _write_group(
    node: Qcow2Node, offset: int, buf: memoryview, group: list[Pending], expect: int
) -> int:
    """Allocate and fill one group; returns the host end of its last cluster (-1 when a
    cluster was taken one at a time because another write is allocating it)."""
    clusters = range(group[0].pos >> node.cluster_bits, (group[-1].pos >> node.cluster_bits) + 1)
    entries = await _begin_allocations(node, clusters)
    if entries is None:
        for p in group:
            await allocating_write(node, p.pos, buf[p.pos - offset : p.pos - offset + p.n])
        return -1
    hosts: list[int] = []
    try:
        for p, (l2e, bitmap) in zip(group, entries, strict=True):
            await node.check_write_entry(p.pos, l2e, bitmap, p.n)
        hosts, never_used = await _place(node, clusters, entries, expect)
        for p, (l2e, bitmap), host in zip(group, entries, hosts, strict=True):
            part = buf[p.pos - offset : p.pos - offset + p.n]
            await _fill(node, p.pos, l2e, bitmap, host, never_used, part)
        return hosts[-1] + node.cluster_size
    finally:
        _release(node, hosts)
        node.allocations.end_many(clusters)


def _release(node: Qcow2Node, hosts: list[int]) -> None:
    """End the busy marks :func:`_place` set."""
    assert node.refcounts is not None
    node.refcounts.release_many([host >> node.cluster_bits for host in hosts])


async def allocating_write(node: Qcow2Node, offset: int, part: memoryview) -> None:
    """Write into one cluster that needs metadata changes, after any other write
    allocating it (looked up again: that write may have made it writable in place)."""
    guest_cluster = offset >> node.cluster_bits
    l2e, bitmap = await _begin_allocation(node, guest_cluster)
    hosts: list[int] = []
    try:
        await node.check_write_entry(offset, l2e, bitmap, len(part))
        one = range(guest_cluster, guest_cluster + 1)
        hosts, never_used = await _place(node, one, [(l2e, bitmap)], -1)
        await _fill(node, offset, l2e, bitmap, hosts[0], never_used, part)
    finally:
        _release(node, hosts)
        node.allocations.end(guest_cluster)


def _keeps_host(node: Qcow2Node, l2e: int) -> bool:
    """Whether a write keeps the cluster's host cluster: this image's alone (COPIED),
    a zero cluster with its allocation or one with subclusters still to allocate."""
    return bool(l2e & OFLAG_COPIED) and node.allocated(l2e)


async def _place(
    node: Qcow2Node, clusters: range, entries: list[tuple[int, int]], expect: int
) -> tuple[list[int], int]:
    """Host clusters for the group (L2 table first, as QEMU), held busy until the caller
    is done with them (:func:`_release`); and the cluster index that was past every
    cluster ever used before (those past it read as zeroes already)."""
    async with node.meta_lock:
        return await _place_locked(node, clusters, entries, expect)


async def _place_locked(
    node: Qcow2Node, clusters: range, entries: list[tuple[int, int]], expect: int, hold: bool = True
) -> tuple[list[int], int]:
    """:func:`_place` with the metadata lock held by the caller; without ``hold`` the
    clusters are not marked busy (the caller links them before the lock goes)."""
    assert node.map is not None and node.refcounts is not None
    cs = node.cluster_size
    hosts: list[int] = []
    await node.map.prepare_table(clusters[0])
    never_used = node.refcounts.high_water
    data_file = "data-file" in node.children
    keeps = [data_file or bool(l2e) and _keeps_host(node, l2e) for l2e, _ in entries]
    i = 0
    while i < len(entries):
        if keeps[i]:
            kept = entries[i][0] & L2E_OFFSET_MASK
            if data_file:
                kept = clusters[i] << node.cluster_bits  # guest = host offsets there
            hosts.append(kept)
            expect = kept + cs
            i += 1
            continue
        run = 1
        while i + run < len(entries) and not keeps[i + run]:
            run += 1
        got = await node.refcounts.allocate_at(expect, run) if expect >= 0 else 0
        hosts += [expect + k * cs for k in range(got)]
        if got < run:
            rest = await node.refcounts.allocate((run - got) * cs)
            hosts += [rest + k * cs for k in range(run - got)]
        expect = hosts[-1] + cs
        i += run
    if hold:
        node.refcounts.hold_many([host >> node.cluster_bits for host in hosts])
    return hosts, never_used


async def _fill(
    node: Qcow2Node,
    offset: int,
    l2e: int,
    bitmap: int,
    host: int,
    never_used: int,
    part: memoryview,
) -> None:
    """Write one cluster's part at its host cluster (from :func:`_place`): in place, or
    around it what the cluster reads now (copy-on-write, as far as QEMU copies it), then
    point the L2 entry at it and drop the old cluster's reference."""
    assert node.map is not None and node.refcounts is not None
    guest_cluster = offset >> node.cluster_bits
    in_cluster = offset & (node.cluster_size - 1)
    if node.in_place_host(l2e, bitmap, in_cluster, len(part)) >= 0:
        await node.write_in_place(host + in_cluster, part)  # another write made it so
        return
    own = _keeps_host(node, l2e)
    lo, hi = _cow_span(node, l2e, bitmap, own, in_cluster, len(part))
    data_file = "data-file" in node.children
    # (An encrypted image's zeroes are ciphertext: its fresh clusters are written whole.)
    fresh = not own and not data_file and (host >> node.cluster_bits) >= never_used
    fresh = fresh and node.crypt is None
    if fresh and _reads_zero_everywhere(node, l2e, bitmap):
        # Past every cluster ever used the file reads as zeroes: only the data.
        await node.check_overlap(host + in_cluster, len(part))
        if node.graph.debug_nodes:
            node.child_debug_event("file", "write_aio")
        await node.data_node.write(host + in_cluster, part)
    else:
        span = bytearray(hi - lo)
        view = memoryview(span)
        head, tail = in_cluster - lo, in_cluster - lo + len(part)
        guest_base = guest_cluster << node.cluster_bits
        if head:
            await _read_old(node, guest_base + lo, l2e, bitmap, view[:head])
        if tail < len(span):
            await _read_old(node, guest_base + lo + tail, l2e, bitmap, view[tail:])
        view[head:tail] = part
        await node.check_overlap(host + lo, len(span))
        if node.graph.debug_nodes:
            node.child_debug_event("file", "write_aio")
        await node.data_node.write(host + lo, view)
    if not data_file:
        node.refcounts.note_end(host + hi)
    async with node.meta_lock:
        await _link(node, guest_cluster, l2e, bitmap, host, lo, hi, own)


def _cow_span(
    node: Qcow2Node, l2e: int, bitmap: int, own: bool, in_cluster: int, n: int
) -> tuple[int, int]:
    """The part of the cluster a write fills (data and copy-on-write), as QEMU computes
    it: the whole cluster without subclusters; with them the touched subclusters, widened
    over a shared cluster's allocated ones, or everything of a compressed one."""
    cs = node.cluster_size
    assert node.map is not None
    if not node.map.extended:
        return 0, cs
    sc = cs // SUBCLUSTERS
    lo, hi = in_cluster // sc * sc, -(-(in_cluster + n) // sc) * sc
    if own:
        return lo, hi
    if l2e & OFLAG_COMPRESSED:
        return 0, cs
    alloc = bitmap & BITMAP_ALL_ALLOC
    if alloc and node.allocated(l2e):
        first = (alloc & -alloc).bit_length() - 1
        lo, hi = min(lo, first * sc), max(hi, alloc.bit_length() * sc)
    return lo, hi


async def prepare_fast_write(node: Qcow2Node, offset: int, length: int, expect: int = -1) -> bool:
    """Give the fresh clusters of a write (no host cluster, reading as zeroes) host
    clusters, allocated per L2 slice as QEMU would for this write, so that the data can go
    in place in one request (a queue worker writes it itself: no data passes through the
    daemon). Where QEMU writes zeroes around the data, reused clusters get them here.
    False (nothing done) where a cluster needs its data copied, or another write is
    allocating it. ``expect``: the host end of the cluster before, as for
    :class:`Pending`.

    No data passes here, so nothing waits between placing the clusters and linking them
    (but a reused cluster's zeroes): the whole of it is one critical section under the
    change and metadata locks, where a write of data (:func:`write_fresh`) registers its
    clusters in ``node.allocations`` and takes the metadata lock three times. Every
    allocation of these clusters and every change of many entries waits for those locks,
    so nothing needs registering or holding busy: the entries point at the clusters before
    the locks go, and the fast path's writes come after."""
    if not _may_fill_fresh(node):
        return False
    assert node.map is not None
    bits = node.cluster_bits
    clusters = range(offset >> bits, ((offset + length - 1) >> bits) + 1)
    async with node.allocations.change_lock, node.meta_lock:
        if any(node.allocations.running(c) is not None for c in clusters):
            return False
        await node.mark_dirty()
        entries = [await node.map.entry(c) for c in clusters]
        for l2e, bitmap in entries:
            if not _keeps_host(node, l2e) and (
                node.allocated(l2e) or not _reads_zero_everywhere(node, l2e, bitmap)
            ):
                return False
        for batch in _batches(node, offset, length, clusters, entries, None):
            place = await _place_locked(node, batch.clusters, batch.entries, expect, False)
            hosts, never_used = place
            links = await _fresh_links(node, batch, hosts, never_used)
            await _link_fresh(node, links)
            expect = hosts[-1] + node.cluster_size
        return True


def _may_fill_fresh(node: Qcow2Node) -> bool:
    """Whether fresh clusters can be filled in batches at all: a writable image whose data
    clusters are counted here and whose zeroes need no cipher."""
    if node.read_only or node.corrupt or node.map is None or "data-file" in node.children:
        return False
    return node.crypt is None  # fresh clusters need encrypted zeroes around the data


def _batches(
    node: Qcow2Node,
    offset: int,
    length: int,
    clusters: range,
    entries: list[tuple[int, int]],
    data: memoryview | None,
) -> list[_Batch]:
    """The clusters of a fresh write split per L2 slice (QEMU allocates per slice)."""
    assert node.map is not None
    per_slice = node.map.slice_entries
    batches = []
    i = 0
    while i < len(clusters):
        j = i + 1
        while j < len(clusters) and clusters[j] // per_slice == clusters[i] // per_slice:
            j += 1
        batches.append(_Batch(offset, length, clusters[i:j], entries[i:j], data))
        i = j
    return batches


async def write_fresh(
    node: Qcow2Node, offset: int, buf: memoryview, start: int, length: int, expect: int = -1
) -> bool:
    """Write ``[start, +length)`` of a request (``buf`` at ``offset``), all of it fresh
    clusters, as one batch per L2 slice: host clusters placed as QEMU places them (one
    refcount update for the run), the data written in one request per host run, zeroes
    only where the write leaves part of a reused cluster, then the entries in one L2
    update (after the data and the refcounts, as QEMU links them). False (nothing done)
    as :func:`prepare_fast_write`."""
    return await _fresh(node, start, length, expect, buf[start - offset : start - offset + length])


async def _fresh(node: Qcow2Node, offset: int, length: int, expect: int, data: memoryview) -> bool:
    """:func:`write_fresh`: ``data`` at ``offset`` written, then linked."""
    if not _may_fill_fresh(node):
        return False
    bits = node.cluster_bits
    clusters = range(offset >> bits, ((offset + length - 1) >> bits) + 1)
    entries = await _begin_allocations(node, clusters)
    if entries is None:
        return False
    try:
        unbacked = node.backing is None
        for guest_cluster, (l2e, bitmap) in zip(clusters, entries, strict=True):
            if unbacked and not (l2e or bitmap):
                continue  # never allocated, reads as zeroes: no check can refuse it
            # QEMU's entry checks, as the planning pass makes them
            base = guest_cluster << bits
            n = min(offset + length, base + node.cluster_size) - max(offset, base)
            await node.check_write_entry(max(offset, base), l2e, bitmap, n)
            if _keeps_host(node, l2e):
                return False  # made writable meanwhile: the caller's plan is stale
            if node.allocated(l2e) or not _reads_zero_everywhere(node, l2e, bitmap):
                return False
        for batch in _batches(node, offset, length, clusters, entries, data):
            expect = await _fill_fresh(node, batch, expect)
        return True
    finally:
        node.allocations.end_many(clusters)


@dataclass(slots=True)
class _Batch:
    """The clusters of one L2 slice in a fresh write of ``length`` bytes at guest
    ``offset`` (``data``: the whole write's bytes, or None when a queue worker writes them)."""

    offset: int
    length: int
    clusters: range
    entries: list[tuple[int, int]]
    data: memoryview | None


async def _fill_fresh(node: Qcow2Node, batch: _Batch, expect: int) -> int:
    """One L2 slice of :func:`_fresh`; returns the host end of its last cluster."""
    hosts, never_used = await _place(node, batch.clusters, batch.entries, expect)
    try:
        links = await _fresh_links(node, batch, hosts, never_used)
        try:
            await _write_runs(node, batch, hosts)
        except BaseException:
            await _abort(node, links)
            raise
        async with node.meta_lock:
            await _link_fresh(node, links)
    finally:
        _release(node, hosts)
    return hosts[-1] + node.cluster_size


async def _fresh_links(
    node: Qcow2Node, batch: _Batch, hosts: list[int], never_used: int
) -> list[tuple[int, int, int, int, int, int]]:
    """What :func:`_link_fresh` links for a batch placed at ``hosts``: every cluster that
    took a new host cluster, a reused one zeroed first where the data does not cover it."""
    assert node.refcounts is not None and node.map is not None
    cs, extended = node.cluster_size, node.map.extended
    links = []
    for guest_cluster, (l2e, bitmap), host in zip(
        batch.clusters, batch.entries, hosts, strict=True
    ):
        if l2e and _keeps_host(node, l2e):
            continue  # an earlier write got there first: written in place
        base = guest_cluster << node.cluster_bits
        start = max(batch.offset, base)
        end = min(batch.offset + batch.length, base + cs)
        lo, hi = 0, cs  # the whole cluster without subclusters
        if extended:
            lo, hi = _cow_span(node, l2e, bitmap, False, start - base, end - start)
        if (host >> node.cluster_bits) < never_used:  # a reused cluster: zero it
            await _zero_around(node, host, lo, hi, start - base, end - base, batch.data)
        node.refcounts.note_end(host + hi)
        links.append((guest_cluster, l2e, bitmap, host, lo, hi))
    return links


async def _abort(node: Qcow2Node, links: list[tuple[int, int, int, int, int, int]]) -> None:
    """The data never landed: give the clusters placed for it back (no entry points at
    them yet), as QEMU's qcow2_alloc_cluster_abort does, so that nothing leaks."""
    assert node.refcounts is not None
    async with node.meta_lock:
        for _, _, _, host, _, _ in links:
            await node.refcounts.free(host, node.cluster_size, DISCARD_NEVER)


async def _zero_around(
    node: Qcow2Node, host: int, lo: int, hi: int, w_lo: int, w_hi: int, data: memoryview | None
) -> None:
    """Zeroes in a reused cluster's ``[lo, hi)``: all of it when a queue worker writes the
    data after the entry is linked (the entry must never show the old content), else only
    around the written ``[w_lo, w_hi)``, which the data covers before the entry exists."""
    if data is None:
        await node.data_node.write_zeroes(host + lo, hi - lo, False)
        return
    for a, b in ((lo, w_lo), (w_hi, hi)):
        if b > a:
            await node.data_node.write_zeroes(host + a, b - a, False)


async def _write_runs(node: Qcow2Node, batch: _Batch, hosts: list[int]) -> None:
    """The batch's data, one request per run of consecutive host clusters."""
    assert batch.data is not None
    bits, cs = node.cluster_bits, node.cluster_size
    first = max(batch.offset, batch.clusters[0] << bits)
    end = min(batch.offset + batch.length, (batch.clusters[-1] + 1) << bits)
    run_start = first
    for k in range(len(hosts)):
        cluster_end = min(end, (batch.clusters[k] + 1) << bits)
        if k + 1 < len(hosts) and hosts[k + 1] == hosts[k] + cs:
            continue
        host = hosts[k] - ((batch.clusters[k] << bits) - run_start)
        rel = run_start - batch.offset
        part = batch.data[rel : rel + cluster_end - run_start]
        await node.write_in_place(host, part)
        run_start = cluster_end


async def preallocate(node: Qcow2Node, start: int, end: int) -> int:
    """Host clusters for every cluster of ``[start, end)`` without one, placed as a write
    of the range would place them, their entries set with the subcluster bits left as
    they were (QEMU's preallocate_co); a partly covered first or last cluster gets its
    other part copied as a write would. Returns the host end of the range's last byte
    (where QEMU makes the file reach). The caller holds :func:`exclusive`."""
    assert node.map is not None
    bits, cs = node.cluster_bits, node.cluster_size
    clusters = range(start >> bits, ((end - 1) >> bits) + 1)
    per_slice = node.map.slice_entries
    expect = last_host = -1
    entries = [await node.map.entry(c) for c in clusters]
    i = 0
    while i < len(clusters):
        j = i + 1
        while j < len(clusters) and clusters[j] // per_slice == clusters[i] // per_slice:
            j += 1
        hosts, _ = await _place_locked(node, clusters[i:j], entries[i:j], expect)
        try:
            for guest_cluster, (l2e, bitmap), host in zip(
                clusters[i:j], entries[i:j], hosts, strict=True
            ):
                if not _keeps_host(node, l2e):
                    await _preallocated(node, guest_cluster, l2e, bitmap, host, start, end)
        finally:
            _release(node, hosts)
        expect = last_host = hosts[-1] + cs
        i = j
    return last_host - cs + ((end - 1) & (cs - 1)) + 1


async def _preallocated(
    node: Qcow2Node, guest_cluster: int, l2e: int, bitmap: int, host: int, start: int, end: int
) -> None:
    """One cluster of :func:`preallocate`: the part outside ``[start, end)`` copied (as
    far as a write would copy it), then the entry."""
    assert node.refcounts is not None
    cs = node.cluster_size
    base = guest_cluster << node.cluster_bits
    lo, hi = max(start, base) - base, min(end, base + cs) - base
    span_lo, span_hi = _cow_span(node, l2e, bitmap, False, lo, hi - lo)
    for a, b in ((span_lo, lo), (hi, span_hi)):
        if b > a:
            old = bytearray(b - a)
            await _read_old(node, base + a, l2e, bitmap, memoryview(old))
            await node.check_overlap(host + a, b - a)
            await node.data_node.write(host + a, old)
            if "data-file" not in node.children:
                node.refcounts.note_end(host + b)
    await _link_preallocated_one(node, guest_cluster, l2e, bitmap, host, False)


async def link_preallocated(
    node: Qcow2Node, start: int, host: int, count: int, allocate_subclusters: bool
) -> None:
    """Point ``count`` clusters from guest ``start`` (rounded down to a cluster) at the
    consecutive host clusters from ``host`` (preallocated by a resize), per L2 slice; the
    part of the first cluster before ``start`` is copied over first, as QEMU does. With
    ``allocate_subclusters`` every subcluster is marked allocated (the new range must not
    show a backing file), else the bits stay as they were. The caller holds
    :func:`exclusive`."""
    assert node.map is not None
    bits, cs = node.cluster_bits, node.cluster_size
    head = start & (cs - 1)
    first = start >> bits
    if head:
        l2e, bitmap = await node.map.entry(first)
        old = bytearray(head)
        await _read_old(node, first << bits, l2e, bitmap, memoryview(old))
        await node.check_overlap(host, head)
        await node.data_node.write(host, old)
    for i in range(count):
        guest_cluster = first + i
        if i == 0 or guest_cluster % node.map.slice_entries == 0:
            await node.map.prepare_table(guest_cluster)
        l2e, bitmap = await node.map.entry(guest_cluster)
        await _link_preallocated_one(
            node, guest_cluster, l2e, bitmap, host + i * cs, allocate_subclusters
        )


async def _link_preallocated_one(
    node: Qcow2Node, guest_cluster: int, old: int, bitmap: int, host: int, all_alloc: bool
) -> None:
    assert node.map is not None and node.refcounts is not None
    new_bitmap = bitmap
    if node.map.extended and all_alloc:
        new_bitmap = BITMAP_ALL_ALLOC
    if not node.lazy_refcounts():
        await node.map.cache.depend_on(node.refcounts.cache)
    await node.map.set_entry(guest_cluster, host | OFLAG_COPIED, new_bitmap)
    if old:
        await free_entry(node, old, DISCARD_NEVER)


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


async def _begin_allocations(node: Qcow2Node, clusters: range) -> list[tuple[int, int]] | None:
    """:func:`_begin_allocation` of several clusters at once; None (nothing registered)
    if one of them is being allocated already."""
    assert node.map is not None
    async with node.allocations.change_lock, node.meta_lock:
        if node.allocations.any_running(clusters):
            return None
        node.allocations.start_many(clusters)
        await node.mark_dirty()
        return await node.map.entries(clusters)


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
    the refcount cache), the subclusters ``[lo, hi)`` allocated, then drop the old
    cluster's reference (never passed on as a discard, as QEMU)."""
    assert node.map is not None and node.refcounts is not None
    if not node.lazy_refcounts():
        await node.map.cache.depend_on(node.refcounts.cache)
    await node.map.set_entry(guest_cluster, *_new_entry(node, bitmap, new_host, lo, hi))
    if not own:
        await free_entry(node, old, DISCARD_NEVER)


def _new_entry(node: Qcow2Node, bitmap: int, host: int, lo: int, hi: int) -> tuple[int, int]:
    """The entry of a cluster written at ``host`` with its subclusters ``[lo, hi)`` now
    allocated (the other bits as they were)."""
    assert node.map is not None
    new_bitmap = 0
    if node.map.extended:
        mask = subcluster_mask(lo, hi - lo, node.cluster_size)
        new_bitmap = (bitmap | mask) & ~(mask << 32)
    return host | OFLAG_COPIED, new_bitmap


async def _link_fresh(node: Qcow2Node, links: list[tuple[int, int, int, int, int, int]]) -> None:
    """:func:`_link` of fresh clusters (``(guest, l2e, bitmap, host, lo, hi)`` in guest
    order, one L2 slice; their old entries hold no cluster): the refcounts first as for
    one, then each run of consecutive entries in one go. The caller holds the metadata
    lock."""
    assert node.map is not None and node.refcounts is not None
    if not links:
        return
    if not node.lazy_refcounts():
        await node.map.cache.depend_on(node.refcounts.cache)
    i = 0
    while i < len(links):
        j = i + 1
        while j < len(links) and links[j][0] == links[i][0] + (j - i):
            j += 1
        values = [_new_entry(node, b, host, lo, hi) for _, _, b, host, lo, hi in links[i:j]]
        await node.map.set_entries(links[i][0], values)
        i = j
    for _, l2e, _, _, _, _ in links:
        if l2e & L2E_OFFSET_MASK or l2e & OFLAG_COMPRESSED:
            await free_entry(node, l2e, DISCARD_NEVER)  # not for the fresh clusters it takes


async def free_entry(node: Qcow2Node, l2e: int, discard_type: int) -> None:
    """Drop the reference an old L2 entry held (data or compressed clusters); the L2
    update must reach the disk first (the refcount cache depends on the L2 cache)."""
    assert node.map is not None and node.refcounts is not None
    if l2e & OFLAG_COMPRESSED:
        start, n = compressed_range(l2e, node.cluster_bits)  # the range QEMU counts
    else:
        start, n = l2e & L2E_OFFSET_MASK, node.cluster_size
        if "data-file" in node.children:
            # Data clusters are not counted there: only the discard reaches the data file.
            if node.allocated(l2e) and passes_discard(node, discard_type):
                await node.data_node.discard(start, n)
            return
        if not start:
            return  # nothing allocated
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
    if passes_discard(node, kind):
        await node.file.discard(offset, nbytes)


def passes_discard(node: Qcow2Node, kind: int) -> bool:
    """Whether a cluster freed for ``kind`` is discarded in the file too (the
    ``pass-discard-*`` options)."""
    opts = node.options
    assert opts is not None
    return {
        DISCARD_NEVER: False,
        DISCARD_REQUEST: opts.pass_discard_request,
        DISCARD_SNAPSHOT: opts.pass_discard_snapshot,
        DISCARD_OTHER: opts.pass_discard_other,
        DISCARD_ALWAYS: True,
    }[kind]
