"""The image's metadata besides the active tables: internal snapshots (their table, and each
snapshot's L1 table), the bitmap directory and the LUKS header area.

The driver needs to know where these lie for two things: the overlap checks that keep data
writes off metadata (overlap.py), and the refcount repair of a dirty image (refscan.py),
which counts every cluster they use. QEMU reads the snapshot table on every open and refuses
an image whose table it cannot parse; so does :func:`load_metadata`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qsd_py.block.qcow2.bitmaps import PersistentBitmap, load_bitmaps
from qsd_py.block.qcow2.header import Qcow2Header
from qsd_py.block.qcow2.snapshots import (
    ENTRY_HEADER,
    Qcow2Snapshot,
    SnapshotTableShort,
    parse_snapshot_table,
)

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode

_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
# Bitmap directory entry: table offset and size, flags, type, granularity, name and extra size.
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")


class BitmapDirectoryError(Exception):
    """A bitmap directory (or bitmap table) that cannot be walked."""


@dataclass
class Bitmap:
    name: str
    table_offset: int
    table_size: int  # entries (8 bytes each)


@dataclass
class Metadata:
    """Where the non-active metadata lies (byte ranges in the image file)."""

    snapshots: list[Qcow2Snapshot] = field(default_factory=list)
    snapshots_offset: int = 0
    snapshots_size: int = 0  # bytes of the table as stored (QEMU's snapshots_size)
    bitmap_directory: tuple[int, int] | None = None  # (offset, size) when bitmaps are in use
    bitmaps: list[PersistentBitmap] = field(default_factory=list)  # its entries (bitmaps.py)
    crypto_header: tuple[int, int] | None = None


async def load_metadata(file: BlockNode, h: Qcow2Header) -> Metadata:
    """Read the snapshot table, then the bitmap directory (Qcow2Error with QEMU's text
    when either is broken), and note where the LUKS header is."""
    meta = Metadata(snapshots_offset=h.snapshots_offset, crypto_header=h.crypto_header)
    if h.nb_snapshots:
        raw = await _read_snapshot_table(file, h)
        meta.snapshots = parse_snapshot_table(raw, h.nb_snapshots, h.size & ~511)
        meta.snapshots_size = stored_table_size(raw, h.nb_snapshots)
    if h.bitmaps_ext is not None:
        _, _, dir_size, dir_offset = _BITMAPS_EXT.unpack(h.bitmaps_ext)
        meta.bitmap_directory = (dir_offset, dir_size)
        meta.bitmaps = await load_bitmaps(file, h)
    return meta


async def _read_snapshot_table(file: BlockNode, h: Qcow2Header) -> bytes:
    """The table's bytes, read in growing pieces until the parser has all it needs."""
    needed = 4096
    while True:
        buf = bytearray(needed)
        await file.read(h.snapshots_offset, memoryview(buf))
        try:
            parse_snapshot_table(buf, h.nb_snapshots, h.size & ~511)
        except SnapshotTableShort as short:
            needed = max(short.needed, 2 * needed)
            continue
        return bytes(buf)


def stored_table_size(raw: bytes | bytearray, nb_snapshots: int) -> int:
    """Bytes the entries take as stored (the last entry unpadded): what QEMU counts and
    protects, which may differ from what a rewrite would take."""
    offset = 0
    for _ in range(nb_snapshots):
        offset = (offset + 7) & ~7
        fields = ENTRY_HEADER.unpack_from(raw, offset)
        id_size, name_size, extra_size = fields[2], fields[3], fields[8]
        offset += ENTRY_HEADER.size + extra_size + id_size + name_size
    return offset


async def read_bitmap_directory(file: BlockNode, offset: int, size: int) -> list[Bitmap]:
    """The bitmaps a directory lists (BitmapDirectoryError when an entry does not fit)."""
    raw = bytearray(size)
    if size:
        await file.read(offset, memoryview(raw))
    bitmaps = []
    pos = 0
    while pos < size:
        if pos + _BITMAP_ENTRY.size > size:
            raise BitmapDirectoryError("Bitmap directory is corrupted")
        table_offset, table_size, _flags, _type, _gran, name_size, extra_size = (
            _BITMAP_ENTRY.unpack_from(raw, pos)
        )
        name_at = pos + _BITMAP_ENTRY.size + extra_size
        end = name_at + name_size
        if end > size:
            raise BitmapDirectoryError("Bitmap directory is corrupted")
        name = bytes(raw[name_at:end]).decode("utf-8", "replace")
        bitmaps.append(Bitmap(name, table_offset, table_size))
        pos = (end + 7) & ~7
    return bitmaps


async def read_bitmap_table(file: BlockNode, bitmap: Bitmap, cluster_size: int) -> list[int]:
    """The entries of a bitmap's table (BitmapDirectoryError if it is misplaced)."""
    if bitmap.table_offset & (cluster_size - 1) or bitmap.table_size > (1 << 26):
        raise BitmapDirectoryError(f"Bitmap '{bitmap.name}' has an invalid bitmap table")
    raw = bytearray(bitmap.table_size * 8)
    if raw:
        await file.read(bitmap.table_offset, memoryview(raw))
    return [v for (v,) in struct.iter_unpack(">Q", raw)]
