"""Internal snapshots of a qcow2 image: taking one and deleting one, as QEMU 11.1 does.

Taking a snapshot copies the active L1 table to new clusters, adds one reference to every
L2 table and data cluster it reaches, and clears the COPIED flag of every entry whose
cluster is now shared (refcount above 1): from then on a write to such a cluster allocates
a new one and copies (allocate.py), and an L2 table without COPIED in its L1 entry is copied
before it changes (mapping.py), so the snapshot keeps what it saw. Then the snapshot table is
written anew (new clusters, then the header's count and offset, then the old table freed).

Deleting one writes the table without it first (so a crash leaks clusters at worst), drops
one reference of everything the snapshot's L1 table reaches (tables and clusters only the
snapshot had are freed), frees the L1 copy and sets the COPIED flags of the active tables
again where a refcount went back to 1.

The exports' fast path writes in place where the cluster table says WRITABLE (fast_map.py):
before any COPIED flag goes, the table is cleared and :meth:`ClusterTable.barrier` waits
until no reader can still use an old entry; every active entry is then published again as it
now is, so a shared cluster is never written in place by a queue worker. The node is drained
and no allocation runs meanwhile (``allocate.exclusive``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import struct
from typing import TYPE_CHECKING

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.allocate import exclusive
from qsd_py.block.qcow2.corruption import signal_corruption
from qsd_py.block.qcow2.refcount import DISCARD_SNAPSHOT
from qsd_py.block.qcow2.snapshots import (
    EXTRA,
    MAX_TABLE_SIZE,
    Qcow2Snapshot,
    serialize_snapshot_table,
    snapshot_table_size,
    validate_snapshot_l1,
)

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS
_NB_SNAPSHOTS_AT = 60  # nb_snapshots (4 bytes) and snapshots_offset (8) in the header
_HEADER_SNAPSHOTS = struct.Struct(">IQ")
_LEADING_NUMBER = re.compile(r"\s*\+?(\d+)")


class SnapshotError(OSError):
    """A failure with QEMU's text (and errno, which the QMP layer may add)."""


def find(snapshots: list[Qcow2Snapshot], sn_id: str | None, name: str | None) -> int:
    """Index of the first snapshot matching ``sn_id`` and/or ``name``, -1 if none."""
    for i, sn in enumerate(snapshots):
        if (sn_id is None or sn.id == sn_id) and (name is None or sn.name == name):
            return i
    return -1


def new_id(snapshots: list[Qcow2Snapshot]) -> str:
    """QEMU's find_new_snapshot_id: one more than the largest number an id starts with."""
    top = 0
    for sn in snapshots:
        match = _LEADING_NUMBER.match(sn.id)
        if match:
            top = max(top, int(match.group(1)))
    return str(top + 1)


async def create(node: Qcow2Node, sn: Qcow2Snapshot) -> None:
    """Take snapshot ``sn`` (name, dates, VM clock and icount filled in by the caller; the
    id, the disk size and the L1 copy are set here)."""
    assert node.map is not None and node.metadata is not None and node.refcounts is not None
    if len(node.snapshots) >= MAX_SNAPSHOTS:
        raise SnapshotError(errno.EFBIG, os.strerror(errno.EFBIG))
    if "data-file" in node.children:
        raise SnapshotError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
    async with node.drained(), exclusive(node):
        await _hide_fast_entries(node)
        try:
            sn.id = new_id(node.snapshots)
            sn.disk_size = node.length()
            sn.extra_data_size = EXTRA.size
            l1 = node.map.l1
            sn.l1_size = len(l1)
            sn.l1_table_offset = await node.refcounts.allocate(8 * len(l1))
            raw = b"".join(struct.pack(">Q", v) for v in l1)
            await node.file.write(sn.l1_table_offset, raw)
            node.refcounts.note_end(sn.l1_table_offset + len(raw))
            await update_refcounts(node, node.map.l1_offset, len(l1), 1)
            await write_table(node, [*node.snapshots, sn])
        finally:
            _publish_active(node)
        await _reload_overlap(node)


async def delete(node: Qcow2Node, index: int) -> Qcow2Snapshot:
    """Delete the snapshot at ``index`` of the table; returns it."""
    assert node.map is not None and node.metadata is not None and node.refcounts is not None
    async with node.drained(), exclusive(node):
        sn = node.snapshots[index]
        validate_snapshot_l1(sn, node.cluster_size)
        remaining = [s for i, s in enumerate(node.snapshots) if i != index]
        try:
            await write_table(node, remaining)
        except OSError as err:
            raise SnapshotError(
                err.errno, f"Failed to remove snapshot from snapshot list: {_strerror(err)}"
            ) from None
        await _hide_fast_entries(node)
        try:
            await update_refcounts(node, sn.l1_table_offset, sn.l1_size, -1)
            await _free(node, sn.l1_table_offset, 8 * sn.l1_size)
            await update_refcounts(node, node.map.l1_offset, len(node.map.l1), 0)
            await node.flush_metadata()
            await node.file.flush()
        finally:
            _publish_active(node)
    await _reload_overlap(node)
    return sn


def forget(node: Qcow2Node, index: int) -> None:
    """Drop the snapshot from the list in memory only: QEMU's state after it failed to
    write the table without it (the image keeps it; the node shows it no more)."""
    assert node.metadata is not None and node.header is not None
    del node.metadata.snapshots[index]
    node.header.nb_snapshots = len(node.metadata.snapshots)


# --- the refcount walk (QEMU's qcow2_update_snapshot_refcount) ----------------------------------
async def update_refcounts(node: Qcow2Node, l1_offset: int, l1_size: int, addend: int) -> None:
    """Add ``addend`` (1, -1 or 0) to the refcount of every L2 table and data cluster the
    L1 table at ``l1_offset`` reaches, and set each entry's COPIED flag to "refcount is 1".
    The active L1 table (in memory) is written back when a flag changed; another one only
    when ``addend`` is not negative (one being deleted is not)."""
    assert node.map is not None
    active = l1_offset == node.map.l1_offset
    l1 = node.map.l1 if active else await _read_l1(node, l1_offset, l1_size)
    if addend > 0:
        await node.map.cache.depend_on(node.refcounts.cache)  # type: ignore[union-attr]
    modified = False
    for i, l1e in enumerate(l1):
        table = l1e & e.L1E_OFFSET_MASK
        if not table:
            continue
        if table & (node.cluster_size - 1):
            text = f"L2 table offset {table:#x} unaligned (L1 index: {i:#x})"
            await signal_corruption(node, text, -1, -1)
            raise OSError(errno.EIO, text)
        await _walk_table(node, table, addend)
        count = await _add(node, table >> node.cluster_bits, addend)
        new = table | e.OFLAG_COPIED if count == 1 else table
        if new != l1e:
            l1[i] = new
            modified = True
    if modified and addend >= 0:
        raw = b"".join(struct.pack(">Q", v) for v in l1)
        await node.file.write(l1_offset, raw)
        await node.file.flush()
        if active:
            node.map.l1_version += 1


async def _walk_table(node: Qcow2Node, table: int, addend: int) -> None:
    """The entries of one L2 table, slice by slice through the L2 cache."""
    assert node.map is not None
    cache = node.map.cache
    extended = node.map.extended
    size = node.map.entry_size
    for slice_off in range(table, table + node.cluster_size, cache.entry_size):
        buf = await cache.get(slice_off)
        for j in range(len(buf) // size):
            old = e.read_l2_entry(buf, j, extended)
            entry = old & ~e.OFLAG_COPIED
            ctype = e.cluster_type(entry, extended)
            count = 0
            if ctype == e.CLUSTER_COMPRESSED:
                if addend:
                    host, n = e.compressed_range(entry, node.cluster_bits)
                    first, last = host >> node.cluster_bits, (host + n - 1) >> node.cluster_bits
                    for index in range(first, last + 1):
                        await _add(node, index, addend)
                count = 2  # compressed clusters are never written in place
            elif ctype in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC):
                host = entry & e.L2E_OFFSET_MASK
                if host & (node.cluster_size - 1):
                    text = f"Cannot update refcount: data offset {host:#x} unaligned"
                    await signal_corruption(node, text, -1, -1)
                    raise OSError(errno.EIO, text)
                count = await _add(node, host >> node.cluster_bits, addend)
            if count == 1:
                entry |= e.OFLAG_COPIED
            if entry != old:
                e.write_l2_entry(buf, j, extended, entry)
                cache.mark_dirty(slice_off)


async def _add(node: Qcow2Node, index: int, addend: int) -> int:
    """The cluster's refcount after adding ``addend``; a cluster whose count drops to 0 is
    forgotten by the caches and reported free (its discard passed on per the options)."""
    refcounts = node.refcounts
    assert refcounts is not None and node.map is not None
    if not addend:
        return await refcounts.get(index)
    count = await refcounts.update(index, addend)
    if count == 0:
        offset = index << node.cluster_bits
        node.map.cache.discard(offset, offset + node.cluster_size)
        if refcounts.on_free is not None:
            await refcounts.on_free(offset, node.cluster_size, DISCARD_SNAPSHOT)
    return count


async def _free(node: Qcow2Node, offset: int, nbytes: int) -> None:
    if nbytes:
        first, last = offset >> node.cluster_bits, (offset + nbytes - 1) >> node.cluster_bits
        for index in range(first, last + 1):
            await _add(node, index, -1)


async def _read_l1(node: Qcow2Node, offset: int, size: int) -> list[int]:
    buf = bytearray(8 * size)
    if size:
        await node.file.read(offset, memoryview(buf))
    return [v for (v,) in struct.iter_unpack(">Q", buf)]


# --- the snapshot table (QEMU's qcow2_write_snapshots) -------------------------------------------
async def write_table(node: Qcow2Node, snapshots: list[Qcow2Snapshot]) -> None:
    """Write ``snapshots`` as the new table: new clusters (what was cached written back
    first), the table, the header's count and offset, then the old table freed."""
    meta, h, refcounts = node.metadata, node.header, node.refcounts
    assert meta is not None and h is not None and refcounts is not None
    size = snapshot_table_size(snapshots)
    if size > MAX_TABLE_SIZE:
        raise SnapshotError(errno.EFBIG, os.strerror(errno.EFBIG))
    offset = await _allocate(node, size)
    await node.flush_metadata()
    await node.file.flush()
    if size:
        await node.file.write(offset, serialize_snapshot_table(snapshots))
        refcounts.note_end(offset + size)
    await node.file.flush()
    await node.file.write(_NB_SNAPSHOTS_AT, _HEADER_SNAPSHOTS.pack(len(snapshots), offset))
    await node.file.flush()
    old_offset, old_size = meta.snapshots_offset, meta.snapshots_size
    h.nb_snapshots, h.snapshots_offset = len(snapshots), offset
    meta.snapshots, meta.snapshots_offset, meta.snapshots_size = snapshots, offset, size
    await _free(node, old_offset, old_size)


async def _allocate(node: Qcow2Node, size: int) -> int:
    """QEMU's qcow2_alloc_clusters: for 0 bytes, where the free-cluster search stands."""
    refcounts = node.refcounts
    assert refcounts is not None
    if size:
        return await refcounts.allocate(size)
    return refcounts.free_index << node.cluster_bits


# --- the exports' cluster table -------------------------------------------------------------
async def _hide_fast_entries(node: Qcow2Node) -> None:
    """No reader may use a mapping from before the change: fast-path readers forget the
    table (a WRITABLE entry could let a queue worker write into a cluster the snapshot now
    shares) and data I/O the node planned before the metadata lock was taken ends first
    (a write planned in place must not land after the cluster became shared)."""
    if node.table is not None:
        node.table.clear_all()
        if not await node.table.barrier():
            raise SnapshotError(errno.EIO, "a fast-path reader did not finish its requests")
    assert node.refcounts is not None
    while node.refcounts.busy:  # such I/O needs no lock to finish
        await asyncio.sleep(0.0005)


def _publish_active(node: Qcow2Node) -> None:
    """Publish every cached active entry as it now is (the rest is published when read)."""
    m = node.map
    if node.table is None or m is None or m.publish is None:
        return
    cache = m.cache
    for l1_index, l1e in enumerate(m.l1):
        table = l1e & e.L1E_OFFSET_MASK
        if not table or table & (node.cluster_size - 1):
            continue
        for slice_off in range(table, table + node.cluster_size, cache.entry_size):
            buf = cache.peek(slice_off)
            if buf is None:
                continue
            first = l1_index * m.l2_entries + (slice_off - table) // m.entry_size
            m._publish_slice(first, buf)


async def _reload_overlap(node: Qcow2Node) -> None:
    """The overlap checks learn the snapshots' L2 tables anew (``inactive-l2``)."""
    if node.overlap is not None:
        node.overlap.inactive_l2 = set()
        await node.overlap.load_inactive_l2(node.file)


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)
