"""Writing compressed clusters (what backup's ``compress`` writes), byte for byte as QEMU's
qcow2_co_pwritev_compressed_part: whole clusters from a cluster boundary (the last, shorter
cluster of an image padded with zeroes), each deflated as compress.py does; a cluster that
does not shrink below a cluster's size is written normally. The cluster must not be
allocated yet (EIO: compressed data never overwrites); its L2 table is found or made first,
then the compressed bytes are packed after the previous compressed data
(refcount.allocate_bytes), the L2 entry points at them and the bytes are written. (QEMU
compresses the clusters of one request in parallel, so their order on disk may differ from
qsd-py's, which places them in guest order.)
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from qsd_py.block.qcow2 import allocate
from qsd_py.block.qcow2.compress import compress_cluster
from qsd_py.block.qcow2.entries import L2E_OFFSET_MASK, compressed_entry
from qsd_py.block.qcow2.refcount import allocate_bytes

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


async def write_compressed(node: Qcow2Node, offset: int, data: memoryview) -> None:
    """Whole clusters from a cluster boundary (a shorter tail only at the image's end), one
    after the other."""
    cs = node.cluster_size
    if not data:  # QEMU's: the file's end up to a whole sector (qemu-img convert -c ends so)
        assert node.refcounts is not None
        refcounts = node.refcounts
        refcounts.note_end(-(-refcounts.image_end // 512) * 512)
        if refcounts.file_end < refcounts.image_end:
            await node.file.truncate(refcounts.image_end)
            refcounts.file_end = refcounts.image_end
        return
    if "data-file" in node.children:
        raise _error(errno.ENOTSUP)
    if offset & (cs - 1) or (len(data) & (cs - 1) and offset + len(data) != node.length()):
        raise _error(errno.EINVAL)
    for pos in range(0, len(data), cs):
        await _write_cluster(node, offset + pos, data[pos : pos + cs])


async def _write_cluster(node: Qcow2Node, offset: int, data: memoryview) -> None:
    cs = node.cluster_size
    if len(data) < cs:  # the image's last cluster, padded
        data = memoryview(bytes(data) + bytes(cs - len(data)))
    assert node.header is not None
    out = compress_cluster(data, node.header.compression_type)
    if len(out) > cs - 1:  # no smaller: a normal cluster
        await node.write(offset, data[: min(cs, node.length() - offset)])
        return
    host = await _place(node, offset >> node.cluster_bits, len(out))
    await node.check_overlap(host, len(out))
    if node.graph.debug_nodes:
        node.child_debug_event("file", "write_compressed")
    await node.data_node.write(host, out)


async def _place(node: Qcow2Node, guest_cluster: int, size: int) -> int:
    """QEMU's qcow2_alloc_compressed_cluster_offset: the L2 table, the bytes, the entry."""
    assert node.map is not None and node.refcounts is not None
    await allocate._begin_allocation(node, guest_cluster)
    try:
        async with node.meta_lock:
            await node.map.prepare_table(guest_cluster)
            l2e, _ = await node.map.entry(guest_cluster)
            if l2e & L2E_OFFSET_MASK:
                raise _error(errno.EIO)  # compressed data never overwrites a cluster
            host = await allocate_bytes(node.refcounts, size, node.free_byte_offset)
            end = host + size
            node.free_byte_offset = end if end % node.cluster_size else 0
            if not node.lazy_refcounts():
                await node.map.cache.depend_on(node.refcounts.cache)
            await node.map.set_entry(
                guest_cluster, compressed_entry(host, size, node.cluster_bits), 0
            )
            node.refcounts.note_end(host + size)
    finally:
        node.allocations.end(guest_cluster)
    return host
