"""Resizing a qcow2 node: growing (the L1 table with it, preallocated on request) and
shrinking (what lies past the new end dropped), with the header's size written last.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2.allocate import exclusive, free_entry
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ALLOC,
    L1E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
)
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
        await _shrink(node, length)
        return
    async with exclusive(node):
        need = -(-length // (node.cluster_size << node.map.l2_bits))
        if need * 8 > hdr.MAX_L1_SIZE:
            msg = f"Failed to grow the L1 table: {os.strerror(errno.EFBIG)}"
            raise OSError(errno.EFBIG, msg)
        if need > len(node.map.l1):
            await _grow_l1(node, need)
        await node.file.write(_SIZE_AT, _U64.pack(length))
        await node.file.flush()
        node.size = node.header.size = length
        if prealloc != "off" and length > old:
            await _preallocate(node, old, length, prealloc)
    backing = node.backing
    if backing is not None and backing.length() > old and length > old:
        # The new range must read as zeroes, not as the backing file's data.
        await node.do_write_zeroes(old, min(length, backing.length()) - old, False)


async def _shrink(node: Qcow2Node, length: int) -> None:
    """Drop everything past ``length``, as QMP's block_resize does to a qcow2 node in
    QEMU: the tail of the last cluster zeroed, the clusters after it discarded (their
    references dropped), the L2 tables past the end freed, then the new size."""
    assert node.map is not None and node.refcounts is not None and node.header is not None
    cs = node.cluster_size
    first_gone = -(-length // cs)
    if length % cs:
        await node.do_write_zeroes(length, min(first_gone * cs, node.size) - length, False)
    async with exclusive(node):
        for guest_cluster in range(first_gone, -(-node.size // cs)):
            if not node.map.l2_table(guest_cluster):
                continue
            old, bitmap = await node.map.entry(guest_cluster)
            if old or bitmap:
                await node.map.set_entry(guest_cluster, 0, 0)
                if node.allocated(old) or old & OFLAG_COMPRESSED:
                    await free_entry(node, old, DISCARD_ALWAYS)
        await node.flush_metadata()
        tables_kept = (first_gone + node.map.l2_entries - 1) >> node.map.l2_bits
        for l1_index in range(tables_kept, len(node.map.l1)):
            table = node.map.l1[l1_index] & L1E_OFFSET_MASK
            if not table:
                continue
            await node.map.write_l1(l1_index, 0)
            await node.file.flush()  # the L1 entry is gone on disk before the table is
            node.map.cache.discard(table, table + cs)
            await node.refcounts.free(table, cs, DISCARD_ALWAYS)
        await node.file.write(_SIZE_AT, _U64.pack(length))
        await node.file.flush()
        node.size = node.header.size = length


async def _preallocate(node: Qcow2Node, start: int, end: int, mode: str) -> None:
    """Give the unallocated clusters of ``[start, end)`` host clusters reading as zeroes,
    allocated on the host too (``falloc``: zero ranges; ``full``: zeroes written), as
    QEMU's preallocate_co does."""
    assert node.map is not None and node.refcounts is not None
    data = node.data_node
    if "data-file" in node.children:
        if end > data.length():
            await data.truncate(end, mode)
        return
    cs = node.cluster_size
    for guest_cluster in range(start >> node.cluster_bits, -(-end // cs)):
        l2e, _ = await node.map.entry(guest_cluster)
        partial = guest_cluster << node.cluster_bits < start
        if node.allocated(l2e) or l2e & OFLAG_COMPRESSED or (partial and node.backing):
            continue  # allocated, or the old part reads from the backing node
        await node.map.prepare_table(guest_cluster)
        host = await node.refcounts.allocate(cs)
        await data.write_zeroes(host, cs, False)  # allocates it on the host, zeroed
        await node.map.cache.depend_on(node.refcounts.cache)
        await node.map.set_entry(guest_cluster, host | OFLAG_COPIED, BITMAP_ALL_ALLOC)


async def _grow_l1(node: Qcow2Node, entries: int) -> None:
    """A new L1 table of ``entries`` (copied, written, flushed), the header switched to
    it in one write, then the old one freed."""
    assert node.map is not None and node.refcounts is not None
    nbytes = -(-entries * 8 // node.cluster_size) * node.cluster_size
    new = await node.refcounts.allocate(nbytes)
    grown = node.map.l1 + [0] * (entries - len(node.map.l1))
    table = b"".join(_U64.pack(e) for e in grown)
    await node.refcounts.cache.flush()
    await node.file.write(new, table + bytes(nbytes - len(table)))
    await node.file.flush()
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
