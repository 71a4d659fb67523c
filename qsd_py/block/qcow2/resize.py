"""Resizing a qcow2 node as QEMU's qcow2_co_truncate does it, step for step, so that the
image holds the same bytes afterwards: growing (the L1 table exactly as large as needed,
preallocated on request, the new range flagged zero over a longer backing file) and
shrinking (what lies past the new end dropped, L2 tables and empty refcount blocks freed,
the file cut after its last used cluster), with the header's size written last.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2 import zeroing
from qsd_py.block.qcow2.allocate import exclusive, link_preallocated, preallocate
from qsd_py.block.qcow2.entries import L1E_OFFSET_MASK
from qsd_py.block.qcow2.refcount import DISCARD_ALWAYS

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

_U64 = struct.Struct(">Q")
_SIZE_AT = 24  # the virtual size in the header
_L1_HEADER = struct.Struct(">IQ")  # l1_size, l1_table_offset
_L1_HEADER_AT = 36


async def truncate(node: Qcow2Node, length: int, prealloc: str) -> None:
    """``do_truncate`` of a writable node that is not corrupt."""
    assert node.header is not None and node.map is not None
    if length % 512:
        raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
    if node.header.version < 3 and node.snapshots:
        raise OSError(errno.ENOTSUP, "Can't resize a v2 image which has snapshots")
    old = node.size
    if length < old:
        if prealloc != "off":
            raise OSError(errno.EINVAL, "Preallocation can't be used for shrinking an image")
        await _shrink(node, length)
        if "data-file" in node.children:
            await node.data_node.truncate(length)
        return
    if node.header.data_file_raw and prealloc == "off":
        prealloc = "metadata"  # a raw data file is the disk: its mapping stays complete
    backing = node.backing
    # Over a backing file that reaches past the old end, the new range must read as
    # zeroes, not as the backing file's data (QEMU's BDRV_REQ_ZERO_WRITE).
    zero_new = backing is not None and length > old and backing.length() > old
    async with exclusive(node):
        need = l1_entries(node, length)
        if need * 8 > hdr.MAX_L1_SIZE:
            msg = f"Failed to grow the L1 table: {os.strerror(errno.EFBIG)}"
            raise OSError(errno.EFBIG, msg)
        if need > len(node.map.l1):
            await _grow_l1(node, need)
        node.size = node.header.size = length  # the new range is the node's from here on
        if prealloc == "off" and "data-file" in node.children:
            await node.data_node.truncate(length)
        elif prealloc == "metadata" or (prealloc != "off" and "data-file" in node.children):
            await _preallocate_metadata(node, old, length, prealloc)
        elif prealloc != "off":
            await _preallocate_data(node, old, length, prealloc, zero_new)
            zero_new = False  # the file's new area reads as zeroes: entries say allocated
    if zero_new:
        await _zero_new_range(node, old, length)
    async with exclusive(node):
        if prealloc != "off":
            await node.flush_metadata()
        await node.file.write(_SIZE_AT, _U64.pack(length))
        await node.file.flush()


def l1_entries(node: Qcow2Node, length: int) -> int:
    """L1 entries a virtual size needs."""
    assert node.map is not None
    return -(-length // (node.cluster_size << node.map.l2_bits))


async def _zero_new_range(node: Qcow2Node, old: int, length: int) -> None:
    """The grown range over a longer backing file: flagged zero from the first grain
    boundary on, zeroes written before it (QEMU's order)."""
    size = zeroing.grain(node)
    zero_start = -(-old // size) * size
    if length > zero_start:
        if not await zeroing.zeroize(node, zero_start, length - zero_start, False):
            await node.write_zero_buffers(zero_start, length - zero_start)
    if zero_start > old:
        await node.write_zero_buffers(old, min(zero_start, length) - old)


async def _shrink(node: Qcow2Node, length: int) -> None:
    """Drop everything past ``length``, as QEMU does: the clusters after the one holding
    the new end discarded (L2 tables made for that as everywhere), the L2 tables past the
    new end freed, refcount blocks that count nothing but themselves dropped, and the file
    cut after its last used cluster; then the new size."""
    assert node.map is not None and node.refcounts is not None and node.header is not None
    cs = node.cluster_size
    first_gone = -(-length // cs) * cs
    if first_gone < node.size:
        await zeroing.discard_past(node, first_gone, node.size)
    async with exclusive(node):
        keep = l1_entries(node, length)
        l1 = node.map.l1
        if keep < len(l1):
            await node.file.write(node.map.l1_offset + 8 * keep, bytes(8 * (len(l1) - keep)))
            await node.file.flush()
            for l1_index in range(len(l1) - 1, keep - 1, -1):
                table = l1[l1_index] & L1E_OFFSET_MASK
                l1[l1_index] = 0
                if table:
                    node.map.cache.discard(table, table + cs)
                    await node.refcounts.free(table, cs, DISCARD_ALWAYS)
            node.map.l1_version += 1
        await node.flush_metadata()
        await node.refcounts.drop_empty_blocks()
        await node.refcounts.cut_after_last_used()
        await node.file.write(_SIZE_AT, _U64.pack(length))
        await node.file.flush()
        node.size = node.header.size = length


async def _preallocate_metadata(node: Qcow2Node, start: int, end: int, mode: str) -> None:
    """Host clusters for ``[start, end)`` as a write there would get them, their entries
    set but their subclusters left as they were; the file then reaches the last one
    (QEMU's preallocate_co; with a data file, the data file grows with ``mode``)."""
    assert node.refcounts is not None
    last_end = await preallocate(node, start, end)
    if "data-file" in node.children:
        data = node.data_node
        if last_end > data.length():
            await data.truncate(last_end, "off" if mode == "metadata" else mode)
        return
    if last_end > node.refcounts.image_end:
        node.refcounts.note_end(last_end)


async def _preallocate_data(
    node: Qcow2Node, start: int, end: int, mode: str, zero_new: bool
) -> None:
    """``falloc``/``full`` as QEMU: refcount structures for the grown file built first,
    right after the last cluster in use, the data clusters allocated after them as one
    run, the file grown over them with ``mode``, then the L2 entries (their tables go
    wherever the allocator finds room)."""
    assert node.refcounts is not None and node.map is not None
    refcounts = node.refcounts
    cs, bits = node.cluster_size, node.cluster_bits
    clusters_in_file = -(-refcounts.image_end // cs)
    last = await refcounts.last_used(clusters_in_file)
    old_end = last + 1 if last >= 0 else clusters_in_file
    first_guest = start >> bits
    data_clusters = -(-end // cs) - first_guest
    tables = -(-data_clusters // node.map.l2_entries) + 1
    area_end = await refcounts.refcount_area(old_end, data_clusters + tables, True)
    got = await refcounts.allocate_at(area_end << bits, data_clusters)
    if got != data_clusters:
        raise OSError(errno.EIO, "Failed to allocate data clusters")
    file_end = (area_end + data_clusters) << bits
    # QEMU's file ends with the new table here; it grows over the data clusters with
    # ``mode`` (ours may have grown further ahead: cut back first).
    await node.file.truncate(max(refcounts.image_end, area_end << bits))
    await node.file.truncate(file_end, mode)
    refcounts.file_end = file_end
    refcounts.note_end(file_end)
    await link_preallocated(node, start, area_end << bits, data_clusters, zero_new)


async def _grow_l1(node: Qcow2Node, entries: int) -> None:
    """A new L1 table of exactly ``entries`` (written, flushed), the header switched to
    it in one write, then the old one freed (QEMU's qcow2_grow_l1_table)."""
    assert node.map is not None and node.refcounts is not None
    nbytes = entries * 8
    new = await node.refcounts.allocate(nbytes)
    grown = node.map.l1 + [0] * (entries - len(node.map.l1))
    await node.refcounts.cache.flush()
    await node.file.write(new, b"".join(_U64.pack(e) for e in grown))
    await node.file.flush()
    node.refcounts.note_end(new + nbytes)
    await node.file.write(_L1_HEADER_AT, _L1_HEADER.pack(entries, new))
    await node.file.flush()
    old_offset, old_bytes = node.map.l1_offset, len(node.map.l1) * 8
    node.map.l1 = grown
    node.map.l1_version += 1
    node.map.l1_offset = new
    assert node.header is not None
    node.header.l1_size, node.header.l1_table_offset = entries, new
    if old_bytes:
        await node.refcounts.free(old_offset, old_bytes)
