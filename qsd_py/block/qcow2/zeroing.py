"""Write-zeroes and discard on a qcow2 node: ranges made to read as zeroes, or dropped, by
changing their L2 entries (zero flags, subcluster bits) rather than by writing data, wherever
the format can say it; what it cannot say is written as zeroes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qsd_py.block.node import STATUS_ZERO
from qsd_py.block.qcow2.allocate import exclusive, free_entry
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZEROES,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_UNALLOCATED_ALLOC,
    SUBCLUSTER_UNALLOCATED_PLAIN,
    SUBCLUSTER_ZERO_ALLOC,
    SUBCLUSTER_ZERO_PLAIN,
    SUBCLUSTERS,
    subcluster_index,
    subcluster_mask,
    subcluster_type,
)
from qsd_py.block.qcow2.refcount import DISCARD_REQUEST

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
    if node.header.version < 3:  # no zero flag: only zeroes written as data will do
        await _zeroes_as_data(node, offset, end, no_fallback)
        return
    # As QEMU's generic layer splits it: the part of a grain at the head, whole grains
    # (the image's last one counts as whole), the part of a grain at the tail.
    size = grain(node)
    head_end = min(-(-offset // size) * size, end)
    tail_start = end if end == node.size else max(end // size * size, head_end)
    if head_end > offset:
        await _zero_part_of_grain(node, offset, head_end, unmap, no_fallback)
    if tail_start > head_end:
        await _zero_clusters(node, head_end, tail_start - head_end, unmap)
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
        if await _zero_grain_without_data(node, first, last - first, unmap):
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


async def _zero_grain_without_data(node: Qcow2Node, offset: int, n: int, unmap: bool) -> bool:
    """Flag the grain at ``offset`` zero if it is unallocated or zero here, checked
    under the locks (a write may have allocated it since the caller looked)."""
    assert node.map is not None
    async with node.allocations.change_lock, node.meta_lock:
        guest_cluster = offset >> node.cluster_bits
        old, bitmap = await node.map.entry(guest_cluster)
        index = subcluster_index(offset, node.cluster_bits) if node.map.extended else 0
        has_data_file = "data-file" in node.children
        kind = subcluster_type(old, bitmap, index, node.map.extended, has_data_file)
        shared = node.allocated(old) and not old & OFLAG_COPIED
        if kind not in _WITHOUT_DATA or (shared and node.map.extended):
            return False  # a shared cluster's subcluster is zeroed by copy-on-write
        await node.mark_dirty()
        if node.map.extended:
            in_cluster = offset & (node.cluster_size - 1)
            await _zero_subclusters(node, guest_cluster, old, bitmap, in_cluster, n, unmap)
        else:
            await _zero_cluster(node, guest_cluster, old, unmap)
    return True


async def _zeroes_as_data(node: Qcow2Node, start: int, end: int, no_fallback: bool) -> None:
    """QEMU's generic fallback: the driver could not express these zeroes by flags, so
    they are written; a caller that asked for no fallback gets ENOTSUP instead."""
    if no_fallback:
        raise OSError(errno.ENOTSUP, "zeroing this range would write zeroes as data")
    await node.write_zero_buffers(start, end - start)


async def _zero_clusters(node: Qcow2Node, offset: int, length: int, unmap: bool) -> None:
    """Set the zero flag on whole clusters (subclusters); deallocate with ``unmap``."""
    assert node.map is not None
    as_data: list[tuple[int, int]] = []  # what flags cannot zero: written as zeroes after
    async with exclusive(node):
        await node.mark_dirty()
        for pos, guest_cluster, in_cluster, n in _pieces(node, offset, offset + length):
            old, bitmap = await node.map.entry(guest_cluster)
            if not node.map.extended:
                await _zero_cluster(node, guest_cluster, old, unmap)
            elif not await _zero_subclusters(
                node, guest_cluster, old, bitmap, in_cluster, n, unmap
            ):
                as_data.append((pos, n))
    for pos, n in as_data:
        await node.write_zero_buffers(pos, n)


def _pieces(node: Qcow2Node, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Each cluster's part of ``[start, end)``: ``(guest offset, guest cluster, offset in
    the cluster, bytes)``."""
    pos = start
    while pos < end:
        in_cluster = pos & (node.cluster_size - 1)
        n = min(end - pos, node.cluster_size - in_cluster)
        yield pos, pos >> node.cluster_bits, in_cluster, n
        pos += n


async def _zero_cluster(node: Qcow2Node, guest_cluster: int, old: int, unmap: bool) -> None:
    assert node.map is not None
    keep = not unmap and old & OFLAG_COPIED and node.allocated(old)
    new = (old | OFLAG_ZERO) if keep else OFLAG_ZERO
    if new == old:
        return
    await node.map.set_entry(guest_cluster, new)
    if not keep:
        await free_entry(node, old, DISCARD_REQUEST)


async def _zero_subclusters(
    node: Qcow2Node,
    guest_cluster: int,
    old: int,
    bitmap: int,
    in_cluster: int,
    n: int,
    unmap: bool,
) -> bool:
    """Zero subclusters by their bits; False where flags cannot do it (part of a shared
    or compressed cluster: the caller writes zeroes, which copies the cluster)."""
    assert node.map is not None
    mask = subcluster_mask(in_cluster, n, node.cluster_size)
    whole = mask == BITMAP_ALL_ALLOC
    if old & OFLAG_COMPRESSED or (node.allocated(old) and not old & OFLAG_COPIED):
        if not whole:
            return False
        await node.map.set_entry(guest_cluster, 0, BITMAP_ALL_ZEROES)
        await free_entry(node, old, DISCARD_REQUEST)
        return True
    if whole and unmap and node.allocated(old):
        await node.map.set_entry(guest_cluster, 0, BITMAP_ALL_ZEROES)
        await free_entry(node, old, DISCARD_REQUEST)
        return True
    new_bitmap = (bitmap & ~mask) | (mask << 32)
    if new_bitmap != bitmap:
        await node.map.set_entry(guest_cluster, old, new_bitmap)
    return True


async def discard(node: Qcow2Node, offset: int, length: int) -> None:
    """``do_discard`` of a writable node that unmaps and is not corrupt: whole clusters
    (subclusters) only, as QEMU's generic layer aligns discards; the entry becomes
    unallocated, or reads as zero where a backing node would show through (v3), and the
    cluster's reference is dropped unless ``discard-no-unref``."""
    assert node.map is not None and node.options is not None
    size = grain(node)
    start = -(-offset // size) * size
    end = (offset + length) // size * size
    if offset + length >= node.size:
        end = node.size
    if start >= end:
        return
    assert node.header is not None
    if node.header.data_file_raw:
        await node.data_node.write_zeroes(start, end - start, True)
    async with exclusive(node):
        for _, guest_cluster, in_cluster, n in _pieces(node, start, end):
            old, bitmap = await node.map.entry(guest_cluster)
            await _discard_cluster(node, guest_cluster, old, bitmap, in_cluster, n)


async def _discard_cluster(
    node: Qcow2Node, guest_cluster: int, old: int, bitmap: int, in_cluster: int, n: int
) -> None:
    assert node.map is not None and node.header is not None and node.options is not None
    allocated = node.allocated(old) or bool(old & OFLAG_COMPRESSED)
    if node.map.extended and n < node.cluster_size:
        mask = subcluster_mask(in_cluster, n, node.cluster_size)
        new_bitmap = (bitmap & ~mask) | ((mask << 32) if node.backing is not None else 0)
        if not old & OFLAG_COMPRESSED and new_bitmap != bitmap:
            await node.map.set_entry(guest_cluster, old, new_bitmap)
        return
    if node.backing is not None or allocated:
        if node.map.extended:
            new, new_bitmap = 0, BITMAP_ALL_ZEROES
        else:
            new, new_bitmap = (OFLAG_ZERO if node.header.version >= 3 else 0), 0
    else:
        new, new_bitmap = 0, 0
    if node.options.discard_no_unref and allocated and not old & OFLAG_COMPRESSED:
        # Keep the cluster (and its reference): only say it reads as zeroes.
        if node.map.extended:
            new, new_bitmap = old, BITMAP_ALL_ZEROES
        else:
            new = old | OFLAG_ZERO
        if (new, new_bitmap) != (old, bitmap):
            await node.map.set_entry(guest_cluster, new, new_bitmap)
        return
    if (new, new_bitmap) == (old, bitmap):
        return
    await node.map.set_entry(guest_cluster, new, new_bitmap)
    if allocated:
        await free_entry(node, old, DISCARD_REQUEST)
