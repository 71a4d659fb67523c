"""Persistent dirty bitmaps of a qcow2 image, in QEMU's on-disk format (qcow2-bitmap.c).

On open every entry of the bitmap directory (bitmaps.py read and checked it) becomes a
:class:`~qsd_py.block.dirty.DirtyBitmap` of the node: one found in use cannot be trusted and
is loaded *inconsistent* (no bits, not recording); the others with their bits, recording if
their ``auto`` flag says so, read-only on a read-only node. A read-write open then flags
every entry in use (bitmaps.py), since from now on the bits live in memory.

On close the node's persistent bitmaps are stored as QEMU stores them: each bitmap's data in
new clusters (a cluster whose bits are all clean is not stored: its table entry is 0), its
table after them, then a new directory, then the header's bitmaps extension pointing to it
(after the refcounts reached the disk), and only then the old directory and the replaced
tables and data are freed. Entries the node has no usable bitmap for (inconsistent ones)
are kept as they are. block-dirty-bitmap-remove of a persistent bitmap writes a directory
without it at once and frees its clusters.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2.bitmaps import (
    BITMAP_TABLE_ALL_ONES,
    BITMAP_TABLE_OFFSET_MASK,
    FLAG_AUTO,
    FLAG_IN_USE,
    TYPE_DIRTY_TRACKING,
    PersistentBitmap,
    bitmap_entry_valid,
    table_entries_needed,
)
from qsd_py.block.qcow2.refcount import DISCARD_ALWAYS, DISCARD_OTHER
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
_ENTRY = struct.Struct(">QIIBBHI")  # as bitmaps.py reads it
_U64 = struct.Struct(">Q")
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 1 << 27
MAX_PHYS_SIZE = 1 << 29


# --- open -------------------------------------------------------------------------------------


async def load_dirty_bitmaps(node: Qcow2Node) -> None:
    """Give the node a DirtyBitmap for every directory entry (the first of a name)."""
    assert node.metadata is not None
    seen: set[str] = set()
    for entry in node.metadata.bitmaps:
        if entry.name in seen:
            continue
        seen.add(entry.name)
        bitmap = DirtyBitmap(node.length(), 1 << entry.granularity_bits, entry.name)
        bitmap.persistent = True
        if entry.flags & FLAG_IN_USE:
            bitmap.inconsistent = True
            bitmap.enabled = False
        else:
            await _read_bits(node, entry, bitmap)
            bitmap.enabled = bool(entry.flags & FLAG_AUTO)
        bitmap.readonly = node.read_only
        bitmap.share()
        node.add_dirty_bitmap(bitmap)


async def _read_bits(node: Qcow2Node, entry: PersistentBitmap, bitmap: DirtyBitmap) -> None:
    """The bitmap's data through its table: stored clusters, all-ones entries, zeroes."""
    cs = node.cluster_size
    raw = bytearray(8 * entry.table_size)
    await node.file.read(entry.table_offset, memoryview(raw))
    data = bytearray(entry.table_size * cs)
    for i, (value,) in enumerate(struct.iter_unpack(">Q", raw)):
        offset = value & BITMAP_TABLE_OFFSET_MASK
        if offset:
            await node.file.read(offset, memoryview(data)[i * cs : (i + 1) * cs])
        elif value & BITMAP_TABLE_ALL_ONES:
            data[i * cs : (i + 1) * cs] = b"\xff" * cs
    bitmap.deserialize(data)


# --- checks of block-dirty-bitmap-add -------------------------------------------------------


def check_new_bitmap(node: Qcow2Node, name: str, granularity: int) -> None:
    """QEMU's qcow2_co_can_store_new_dirty_bitmap, with its texts."""
    assert node.header is not None and node.metadata is not None
    prefix = f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
    if node.header.version < 3:
        raise QMPError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
    bits = granularity.bit_length() - 1
    length = node.length()
    if length > MAX_PHYS_SIZE << bits or length > (MAX_TABLE_SIZE * node.cluster_size) << bits:
        raise QMPError(
            prefix + "Too much space will be occupied by the bitmap. Use larger granularity"
        )
    if len(name.encode()) > MAX_NAME_SIZE:
        raise QMPError(prefix + f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
    entries = node.metadata.bitmaps
    if not entries:
        return
    if len(entries) >= MAX_BITMAPS:
        raise QMPError(prefix + "Maximum number of persistent bitmaps is already reached")
    used = node.metadata.bitmap_directory[1] if node.metadata.bitmap_directory else 0
    if used + _entry_size(name) > MAX_DIRECTORY_SIZE:
        raise QMPError(prefix + "Not enough space in the bitmap directory")


# --- close ------------------------------------------------------------------------------------


async def store_dirty_bitmaps(node: Qcow2Node) -> None:
    """Write every usable persistent bitmap of the node into the image (on close)."""
    assert node.metadata is not None and node.refcounts is not None
    entries = list(node.metadata.bitmaps)
    by_name = {entry.name: entry for entry in entries}
    replaced: list[tuple[int, int]] = []
    pairs: list[tuple[PersistentBitmap, DirtyBitmap]] = []
    # Newest first, as QEMU walks a node's bitmaps: new entries join the directory so.
    for bitmap in reversed(node.dirty_bitmaps):
        if not bitmap.persistent or bitmap.inconsistent or bitmap.name is None:
            continue
        entry = by_name.get(bitmap.name)
        if entry is None:
            entry = PersistentBitmap(bitmap.name, 0, 0, 0, 0, 0)
            entries.append(entry)
            by_name[bitmap.name] = entry
        elif entry.table_offset:
            replaced.append((entry.table_offset, entry.table_size))
        entry.flags = FLAG_AUTO if bitmap.enabled else 0
        entry.granularity_bits = bitmap.granularity.bit_length() - 1
        pairs.append((entry, bitmap))
    if not pairs:
        return
    async with node.meta_lock:
        for entry, bitmap in sorted(pairs, key=lambda pair: entries.index(pair[0])):
            entry.table_offset, entry.table_size = await _store_bits(node, bitmap)
        await _replace_directory(node, entries)
        for offset, size in replaced:
            await _free_table(node, offset, size)


async def _store_bits(node: Qcow2Node, bitmap: DirtyBitmap) -> tuple[int, int]:
    """The bitmap's data clusters (clean ones left out), then its table: (offset, size)."""
    assert node.refcounts is not None
    cs = node.cluster_size
    data = bitmap.serialize()
    size = table_entries_needed(bitmap.length, bitmap.shift, cs) or 1
    table = bytearray(8 * size)
    zero = bytes(cs)
    for i in range(size):
        chunk = data[i * cs : (i + 1) * cs]
        if not chunk or chunk == zero[: len(chunk)]:
            continue
        offset = await node.refcounts.allocate(cs)
        await node.file.write(offset, chunk + zero[len(chunk) :])
        node.refcounts.note_end(offset + cs)
        _U64.pack_into(table, 8 * i, offset)
    table_offset = await node.refcounts.allocate(len(table))
    await node.file.write(table_offset, table)
    node.refcounts.note_end(table_offset + len(table))
    return table_offset, size


async def _free_table(node: Qcow2Node, offset: int, size: int) -> None:
    """Free a bitmap's data clusters and its table (QEMU's free_bitmap_clusters)."""
    assert node.refcounts is not None
    cs = node.cluster_size
    if offset % cs or not 0 < size <= MAX_TABLE_SIZE:
        return  # a broken entry (one found in use is never checked): leak, never corrupt
    raw = bytearray(8 * size)
    await node.file.read(offset, memoryview(raw))
    values = [value for (value,) in struct.iter_unpack(">Q", raw)]
    if not all(bitmap_entry_valid(value, cs) for value in values):
        return
    for value in values:
        cluster = value & BITMAP_TABLE_OFFSET_MASK
        if cluster:
            await node.refcounts.free(cluster, cs, DISCARD_ALWAYS)
    await node.refcounts.free(offset, 8 * size, DISCARD_OTHER)


# --- the directory ----------------------------------------------------------------------------


def _entry_size(name: str) -> int:
    return (_ENTRY.size + len(name.encode()) + 7) & ~7


def _serialize_directory(entries: list[PersistentBitmap], base: int) -> bytes:
    """The directory's bytes; each entry learns where it lies (``base`` + its position)."""
    out = bytearray()
    for entry in entries:
        name = entry.name.encode()
        entry.entry_offset = base + len(out)
        out += _ENTRY.pack(
            entry.table_offset, entry.table_size, entry.flags, TYPE_DIRTY_TRACKING,
            entry.granularity_bits, len(name), 0,
        )  # fmt: skip
        out += name + bytes(-(_ENTRY.size + len(name)) % 8)
    return bytes(out)


async def _replace_directory(node: Qcow2Node, entries: list[PersistentBitmap]) -> None:
    """Write ``entries`` as a new directory, point the header at it (none: no extension,
    the autoclear bit cleared) and free the old one (QEMU's update_ext_header_and_dir).
    The metadata lock is held."""
    assert node.metadata is not None and node.refcounts is not None and node.header is not None
    offset, raw = 0, b""
    if entries:
        size = sum(_entry_size(entry.name) for entry in entries)
        offset = await node.refcounts.allocate(size)
        raw = _serialize_directory(entries, offset)
        await node.file.write(offset, raw)
        node.refcounts.note_end(offset + len(raw))
    await node.flush_metadata()
    await node.file.flush()
    old = node.metadata.bitmap_directory
    h = node.header
    if entries:
        h.bitmaps_ext = _BITMAPS_EXT.pack(len(entries), 0, len(raw), offset)
        h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
        node.metadata.bitmap_directory = (offset, len(raw))
    else:
        h.bitmaps_ext = None
        h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        node.metadata.bitmap_directory = None
    node.metadata.bitmaps = entries
    if node.overlap is not None:
        node.overlap.bitmaps_in_use = bool(entries)
    await node.write_header()
    if old is not None and old[1]:
        await node.refcounts.free(old[0], old[1], DISCARD_OTHER)


async def remove_persistent(node: Qcow2Node, name: str) -> None:
    """block-dirty-bitmap-remove: a directory without the entry, then its clusters freed
    (a bitmap not stored yet is not in the image: nothing to do)."""
    assert node.metadata is not None
    entries = node.metadata.bitmaps
    found = next((entry for entry in entries if entry.name == name), None)
    if found is None:
        return
    async with node.meta_lock:
        await _replace_directory(node, [entry for entry in entries if entry is not found])
        if found.table_offset:
            await _free_table(node, found.table_offset, found.table_size)
