"""Write-zeroes and discard on a qcow2 node: ranges made to read as zeroes, or dropped, by
changing their L2 entries (zero flags, subcluster bits) rather than by writing data, wherever
the format can say it; what it cannot say is written as zeroes.

The entries change as QEMU changes them (qcow2_subcluster_zeroize, qcow2_cluster_discard),
down to the L2 table each L2 slice of the range gets first, missing or not: the images then
hold the same bytes as QEMU's after the same requests.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qsd_py.block.node import STATUS_ZERO
from qsd_py.block.qcow2.allocate import exclusive, free_entry
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ZEROES,
    CLUSTER_COMPRESSED,
    CLUSTER_NORMAL,
    CLUSTER_UNALLOCATED,
    CLUSTER_ZERO_ALLOC,
    L2E_OFFSET_MASK,
    SUBCLUSTER_UNALLOCATED_ALLOC,
    SUBCLUSTER_UNALLOCATED_PLAIN,
    SUBCLUSTER_ZERO_ALLOC,
    SUBCLUSTER_ZERO_PLAIN,
    SUBCLUSTERS,
    cluster_type,
    subcluster_index,
    subcluster_mask,
    subcluster_type,
)
from qsd_py.block.qcow2.refcount import DISCARD_ALWAYS, DISCARD_REQUEST

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

# Grains that hold no data of their own: zeroing part of one may flag the whole grain zero.
_WITHOUT_DATA = frozenset(
    {
        SUBCLUSTER_UNALLOCATED_PLAIN,
        SUBCLUSTER_UNALLOCATED_ALLOC,
        SUBCLUSTER_ZERO_PLAIN,
        SUBCLUSTER_ZERO_ALLOC,
    }
)
# Cluster types with a host cluster of their own (QEMU's qcow2_cluster_is_allocated).
_ALLOCATED = frozenset({CLUSTER_NORMAL, CLUSTER_ZERO_ALLOC, CLUSTER_COMPRESSED})


def grain(node: Qcow2Node) -> int:
    """The smallest piece an entry can flag: a subcluster with extended L2, else a cluster."""
    assert node.map is not None
    return node.cluster_size // SUBCLUSTERS if node.map.extended else node.cluster_size


async def write_zeroes(
    node: Qcow2Node, offset: int, length: int, unmap: bool, no_fallback: bool
) -> None:
    """``do_write_zeroes`` of a writable node that is not corrupt."""
    assert node.header is not None
    unmap = unmap and node.discard_unmap
    if node.header.data_file_raw:
        # A raw data file is the guest's disk itself: it must read as zeroes too.
        await node.data_node.write_zeroes(offset, length, unmap, no_fallback)
    end = offset + length
    # As QEMU's generic layer splits it: the part of a grain at the head, whole grains
    # (the image's last one counts as whole), the part of a grain at the tail.
    size = grain(node)
    head_end = min(-(-offset // size) * size, end)
    tail_start = end if end == node.size else max(end // size * size, head_end)
    if head_end > offset:
        await _zero_part_of_grain(node, offset, head_end, unmap, no_fallback)
    if tail_start > head_end:
        if not await zeroize(node, head_end, tail_start - head_end, unmap):
            await _zeroes_as_data(node, head_end, tail_start, no_fallback)
    if end > tail_start:
        await _zero_part_of_grain(node, tail_start, end, unmap, no_fallback)


async def _zero_part_of_grain(
    node: Qcow2Node, start: int, end: int, unmap: bool, no_fallback: bool
) -> None:
    """Zeroes for part of one grain. As in QEMU, the whole grain becomes a zero one when
    the rest of it reads as zeroes already and it holds no data here (zeroing 4 KiB of an
    unallocated cluster allocates nothing); otherwise the zeroes are written as data."""
    size = grain(node)
    first = start // size * size
    last = min(first + size, node.size)
    if await _reads_as_zeroes(node, first, start) and await _reads_as_zeroes(node, end, last):
        if await _without_data(node, first) and await zeroize(node, first, last - first, unmap):
            return
    await _zeroes_as_data(node, start, end, no_fallback)


async def _reads_as_zeroes(node: Qcow2Node, start: int, end: int) -> bool:
    """Whether ``[start, end)`` reads as zeroes by block status through the backing
    chain (QEMU's test: zero clusters and unallocated ranges count, data does not)."""
    while start < end:
        st = await node.block_status_above(start, end - start)
        if not st.flags & STATUS_ZERO or st.length <= 0:
            return False
        start += st.length
    return True


async def _without_data(node: Qcow2Node, offset: int) -> bool:
    """Whether the grain at ``offset`` is unallocated or zero here (QEMU looks before it
    zeroes part of a grain)."""
    assert node.map is not None
    async with node.meta_lock:
        old, bitmap = await node.map.entry(offset >> node.cluster_bits)
    index = subcluster_index(offset, node.cluster_bits) if node.map.extended else 0
    kind = subcluster_type(old, bitmap, index, node.map.extended, "data-file" in node.children)
    return kind in _WITHOUT_DATA


async def _zeroes_as_data(node: Qcow2Node, start: int, end: int, no_fallback: bool) -> None:
    """QEMU's generic fallback: the driver could not express these zeroes by flags, so
    they are written; a caller that asked for no fallback gets ENOTSUP instead."""
    if no_fallback:
        raise OSError(errno.ENOTSUP, "zeroing this range would write zeroes as data")
    await node.write_zero_buffers(start, end - start)


async def zeroize(node: Qcow2Node, offset: int, length: int, unmap: bool) -> bool:
    """Flag ``[offset, +length)`` (whole grains, or up to the image's end) as zeroes
    (QEMU's qcow2_subcluster_zeroize): False where flags cannot do it (a v2 image over a
    backing file, part of a compressed cluster): the caller writes zeroes as data. A v2
    image has no zero flag: without a backing file its clusters are discarded instead."""
    assert node.map is not None and node.header is not None
    if node.header.version < 3:
        if node.backing is not None:
            return False
        await _discard_range(node, offset, offset + length, DISCARD_REQUEST, False)
        return True
    as_data = False
    async with exclusive(node):
        await node.mark_dirty()
        for pos, guest_cluster, in_cluster, n in _pieces(node, offset, offset + length):
            await _prepare_slice(node, guest_cluster, pos == offset)
            old, bitmap = await node.map.entry(guest_cluster)
            whole = in_cluster == 0 and (n == node.cluster_size or pos + n >= node.size)
            if whole or not node.map.extended:
                await _zero_cluster(node, guest_cluster, old, bitmap, unmap)
            elif not await _zero_subclusters(node, guest_cluster, old, bitmap, in_cluster, n):
                as_data = True
                break
    return not as_data


async def _prepare_slice(node: Qcow2Node, guest_cluster: int, first: bool) -> None:
    """The L2 table of the slice a loop enters, made writable (allocated if missing) as
    QEMU's loops over slices do before they look at the entries."""
    assert node.map is not None
    if first or guest_cluster % node.map.slice_entries == 0:
        await node.map.prepare_table(guest_cluster)


def _pieces(node: Qcow2Node, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Each cluster's part of ``[start, end)``: ``(guest offset, guest cluster, offset in
    the cluster, bytes)``."""
    pos = start
    while pos < end:
        in_cluster = pos & (node.cluster_size - 1)
        n = min(end - pos, node.cluster_size - in_cluster)
        yield pos, pos >> node.cluster_bits, in_cluster, n
        pos += n


async def _zero_cluster(
    node: Qcow2Node, guest_cluster: int, old: int, bitmap: int, unmap: bool
) -> None:
    """A whole cluster reads as zeroes: the zero flag (all zero bits with extended L2);
    its host cluster goes with ``unmap`` (a compressed one always) unless
    ``discard-no-unref`` keeps it, as QEMU's zero_in_l2_slice."""
    assert node.map is not None and node.options is not None
    extended = node.map.extended
    ctype = cluster_type(old, extended, "data-file" in node.children)
    drop = ctype == CLUSTER_COMPRESSED or (unmap and ctype in _ALLOCATED)
    keep_ref = node.options.discard_no_unref and ctype != CLUSTER_COMPRESSED
    new = 0 if drop and not keep_ref else old
    new_bitmap = BITMAP_ALL_ZEROES if extended else 0
    if not extended:
        new |= 1  # OFLAG_ZERO
    if (new, new_bitmap) == (old, bitmap if extended else 0):
        return
    await node.map.set_entry(guest_cluster, new, new_bitmap)
    if drop:
        await _drop_reference(node, old, ctype, keep_ref, DISCARD_REQUEST)


async def _drop_reference(
    node: Qcow2Node, old: int, ctype: int, keep_ref: bool, discard_type: int
) -> None:
    """Free the old entry's cluster, or with ``discard-no-unref`` keep it and only pass
    the discard on to the file (if allowed)."""
    assert node.options is not None
    if not keep_ref:
        await free_entry(node, old, discard_type)
    elif node.options.pass_discard_request and ctype in (CLUSTER_NORMAL, CLUSTER_ZERO_ALLOC):
        await node.data_node.discard(old & L2E_OFFSET_MASK, node.cluster_size)


async def _zero_subclusters(
    node: Qcow2Node, guest_cluster: int, old: int, bitmap: int, in_cluster: int, n: int
) -> bool:
    """Zero bits for some subclusters (QEMU's zero_l2_subclusters); False for part of a
    compressed cluster (the caller writes zeroes, which copies the cluster)."""
    assert node.map is not None
    if old & (1 << 62):  # compressed
        return False
    mask = subcluster_mask(in_cluster, n, node.cluster_size)
    new_bitmap = (bitmap | (mask << 32)) & ~mask
    if new_bitmap != bitmap:
        await node.map.set_entry(guest_cluster, old, new_bitmap)
    return True


async def discard(node: Qcow2Node, offset: int, length: int) -> None:
    """``do_discard`` of a writable node that unmaps and is not corrupt: whole clusters
    only (QEMU ignores the rest, subclusters too), the partial cluster at the end of the
    image included; the entry becomes unallocated, or reads as zero where a backing node
    would show through (v3), and the cluster's reference is dropped unless
    ``discard-no-unref``. A v2 image over a backing file cannot discard at all."""
    assert node.map is not None and node.header is not None
    if node.header.version < 3 and node.backing is not None:
        return
    cs = node.cluster_size
    start = -(-offset // cs) * cs
    end = (offset + length) // cs * cs
    if offset + length >= node.size:
        end = node.size
    if start >= end:
        return
    if node.header.data_file_raw:
        await node.data_node.write_zeroes(start, end - start, True)
    await _discard_range(node, start, end, DISCARD_REQUEST, False)


async def _discard_range(
    node: Qcow2Node, start: int, end: int, discard_type: int, full: bool
) -> None:
    """QEMU's qcow2_cluster_discard over whole clusters: ``full`` drops the entries
    (nothing reads as zero: a shrink), else what would show the backing file or holds
    data reads as zero from now on."""
    assert node.map is not None
    async with exclusive(node):
        for pos, guest_cluster, _, _ in _pieces(node, start, end):
            await _prepare_slice(node, guest_cluster, pos == start)
            old, bitmap = await node.map.entry(guest_cluster)
            await _discard_cluster(node, guest_cluster, old, bitmap, discard_type, full)


async def _discard_cluster(
    node: Qcow2Node, guest_cluster: int, old: int, bitmap: int, discard_type: int, full: bool
) -> None:
    assert node.map is not None and node.header is not None and node.options is not None
    extended = node.map.extended
    ctype = cluster_type(old, extended, "data-file" in node.children)
    keep_ref = (
        ctype != CLUSTER_COMPRESSED
        and not full
        and node.options.discard_no_unref
        and discard_type == DISCARD_REQUEST
    )
    new, new_bitmap = old, bitmap
    if full:
        new, new_bitmap = 0, 0
    elif node.backing is not None or ctype in _ALLOCATED:
        if extended:
            new, new_bitmap = (old if keep_ref else 0), BITMAP_ALL_ZEROES
        elif node.header.version >= 3:
            new = (old | 1) if keep_ref else 1  # OFLAG_ZERO
        else:
            new = 0
    if (new, new_bitmap) == (old, bitmap):
        return
    await node.map.set_entry(guest_cluster, new, new_bitmap)
    if ctype != CLUSTER_UNALLOCATED:
        await _drop_reference(node, old, ctype, keep_ref, discard_type)


async def discard_past(node: Qcow2Node, start: int, end: int) -> None:
    """What a shrink drops: every cluster of ``[start, end)`` unallocated, its host
    cluster freed and discarded in the file (QEMU's full discard)."""
    await _discard_range(node, start, end, DISCARD_ALWAYS, True)
