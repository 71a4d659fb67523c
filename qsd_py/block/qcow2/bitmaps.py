"""Persistent dirty bitmaps as QEMU's open meets them: the bitmap directory read and checked,
each bitmap's table checked, and the in-use flags set when the image is opened read-write.

What the directory says is shown in ``query-named-block-nodes`` (``format-specific``'s
``bitmaps``), and the images QEMU refuses are refused. The bits themselves are loaded into
the node's dirty bitmaps, and stored again on close, by bitmap_store.py. A read-write open
sets the in-use flag of every bitmap, as QEMU does: from then on the bitmap lives in memory,
and the flag is cleared when it is stored; a crash leaves it set, and the bitmap then loads
inconsistent, rather than trusted while it misses writes.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qsd_py.block.qcow2.header import Qcow2Error, Qcow2Header

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode

_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
# Directory entry: table offset and size, flags, type, granularity bits, name and extra size.
_ENTRY = struct.Struct(">QIIBBHI")
_FLAGS_AT = 12  # the flags field inside an entry
_FLAGS = struct.Struct(">I")

FLAG_IN_USE = 1 << 0  # not saved cleanly, or open read-write somewhere: not to be trusted
FLAG_AUTO = 1 << 1  # records every write to the image
_RESERVED_FLAGS = 0xFFFF_FFFF & ~(FLAG_IN_USE | FLAG_AUTO)
TYPE_DIRTY_TRACKING = 1
# Bitmap table entries: a data cluster, or none and the all-ones flag (else all zeroes).
BITMAP_TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
BITMAP_TABLE_RESERVED_MASK = 0xFF00_0000_0000_01FE
BITMAP_TABLE_ALL_ONES = 1
# QEMU's limits on an entry (qcow2-bitmap.c's BME_* constants).
MAX_TABLE_SIZE = 1 << 27  # entries
MAX_PHYS_SIZE = 1 << 29  # bytes of bitmap data
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME_SIZE = 1023
EINVAL_TEXT = os.strerror(errno.EINVAL)


@dataclass
class PersistentBitmap:
    """One entry of the bitmap directory."""

    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int  # entries (8 bytes each)
    entry_offset: int  # where the entry lies in the image file

    def info(self) -> dict[str, object]:
        """Qcow2BitmapInfo: the flags QEMU names, in-use first."""
        flags = [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                 if self.flags & bit]  # fmt: skip
        return {"name": self.name, "granularity": 1 << self.granularity_bits, "flags": flags}


async def load_bitmaps(file: BlockNode, h: Qcow2Header) -> list[PersistentBitmap]:
    """The bitmaps of an image whose header has a (consistent) bitmaps extension, refused
    with QEMU's texts where QEMU's open refuses them: the directory first, then in
    directory order each bitmap's name (unique) and, unless in use, its table."""
    if h.bitmaps_ext is None:
        return []
    count, _, size, offset = _BITMAPS_EXT.unpack(h.bitmaps_ext)
    length = h.size & ~511  # the node's length, in whole sectors as QEMU counts it
    bitmaps = await _read_directory(file, count, offset, size, h.cluster_size, length)
    names: set[str] = set()
    for bitmap in bitmaps:
        if bitmap.name in names:
            if bitmap.flags & FLAG_IN_USE:  # QEMU skips it: the loaded one wins
                continue
            raise Qcow2Error(f"Bitmap already exists: {bitmap.name}")
        names.add(bitmap.name)
        if not bitmap.flags & FLAG_IN_USE:
            await _check_table(file, bitmap, h.cluster_size, length)
    return bitmaps


async def _read_directory(
    file: BlockNode, count: int, offset: int, size: int, cluster_size: int, length: int
) -> list[PersistentBitmap]:
    """The directory's entries, with QEMU's checks in QEMU's order."""
    if size == 0:
        raise Qcow2Error("Requested bitmap directory size is zero")
    raw = bytearray(size)
    try:
        await file.read(offset, memoryview(raw))
    except OSError as err:
        text = os.strerror(err.errno or errno.EIO)
        raise Qcow2Error(f"Failed to read bitmap directory: {text}") from err
    bitmaps: list[PersistentBitmap] = []
    pos = 0
    while pos < size:
        if pos + _ENTRY.size > size:
            raise Qcow2Error("Broken bitmap directory")
        if len(bitmaps) == count:
            raise Qcow2Error("More bitmaps found than specified in header extension")
        table_offset, table_size, flags, kind, gran, name_size, extra_size = _ENTRY.unpack_from(
            raw, pos
        )
        entry_size = (_ENTRY.size + name_size + extra_size + 7) & ~7
        if pos + entry_size > size:
            raise Qcow2Error("Broken bitmap directory")
        if extra_size:
            raise Qcow2Error("Bitmap extra data is not supported")
        name_at = pos + _ENTRY.size
        name = _c_string(raw[name_at : name_at + name_size])
        bitmap = PersistentBitmap(name, gran, flags, table_offset, table_size, offset + pos)
        if not _entry_valid(bitmap, kind, name_size, cluster_size, length):
            raise Qcow2Error(f"Bitmap '{name}' doesn't satisfy the constraints")
        bitmaps.append(bitmap)
        pos += entry_size
    if len(bitmaps) != count:
        raise Qcow2Error("Less bitmaps found than specified in header extension")
    return bitmaps


def _entry_valid(
    bitmap: PersistentBitmap, kind: int, name_size: int, cluster_size: int, length: int
) -> bool:
    """QEMU's constraints on an entry; a consistent bitmap must also cover the image."""
    b = bitmap
    if (
        b.table_size == 0
        or b.table_offset == 0
        or b.table_offset % cluster_size
        or b.table_size > MAX_TABLE_SIZE
        or not MIN_GRANULARITY_BITS <= b.granularity_bits <= MAX_GRANULARITY_BITS
        or b.flags & _RESERVED_FLAGS
        or name_size > MAX_NAME_SIZE
        or kind != TYPE_DIRTY_TRACKING
    ):
        return False
    data_bytes = b.table_size * cluster_size
    if data_bytes > MAX_PHYS_SIZE:
        return False
    return bool(b.flags & FLAG_IN_USE) or length <= (data_bytes * 8) << b.granularity_bits


async def _check_table(
    file: BlockNode, bitmap: PersistentBitmap, cluster_size: int, length: int
) -> None:
    """A consistent bitmap's table: valid entries, exactly as many as the image needs."""
    raw = bytearray(8 * bitmap.table_size)
    prefix = f"Could not read bitmap_table table from image for bitmap '{bitmap.name}'"
    try:
        await file.read(bitmap.table_offset, memoryview(raw))
    except OSError as err:
        raise Qcow2Error(f"{prefix}: {os.strerror(err.errno or errno.EIO)}") from err
    for (entry,) in struct.iter_unpack(">Q", raw):
        if not bitmap_entry_valid(entry, cluster_size):
            raise Qcow2Error(f"{prefix}: {EINVAL_TEXT}")
    if table_entries_needed(length, bitmap.granularity_bits, cluster_size) != bitmap.table_size:
        raise Qcow2Error(f"Could not read bitmap '{bitmap.name}' from image: {EINVAL_TEXT}")


def table_entries_needed(length: int, granularity_bits: int, cluster_size: int) -> int:
    """Clusters of bitmap data an image of ``length`` bytes needs: one bit per granule,
    stored in whole 64-bit words (QEMU's serialization of its bitmaps)."""
    if length == 0:
        return 0
    words = ((length - 1) >> granularity_bits >> 6) + 1
    return -(-words * 8 // cluster_size)


def bitmap_entry_valid(entry: int, cluster_size: int) -> bool:
    """QEMU's check of a bitmap table entry: no reserved bits, an aligned cluster, and the
    all-ones flag only on entries without a cluster."""
    offset = entry & BITMAP_TABLE_OFFSET_MASK
    if entry & BITMAP_TABLE_RESERVED_MASK or offset & (cluster_size - 1):
        return False
    return not (offset and entry & BITMAP_TABLE_ALL_ONES)


async def mark_in_use(file: BlockNode, bitmaps: list[PersistentBitmap]) -> None:
    """Set the in-use flag of every bitmap that lacks it, in the file and here. Each flag
    is a 4-byte field that no sector boundary cuts: a crash leaves every entry either as
    it was or flagged, and both are valid (QEMU rewrites the whole directory in place
    and so drops the extension's autoclear bit meanwhile; setting a flag needs no such
    care)."""
    changed = False
    for bitmap in bitmaps:
        if bitmap.flags & FLAG_IN_USE:
            continue
        flags = bitmap.flags | FLAG_IN_USE
        await file.write(bitmap.entry_offset + _FLAGS_AT, _FLAGS.pack(flags))
        bitmap.flags = flags
        changed = True
    if changed:
        await file.flush()


def _c_string(data: bytes | bytearray) -> str:
    """A name as QEMU copies it (up to a NUL byte); undecodable bytes replaced."""
    return bytes(data).split(b"\0", 1)[0].decode("utf-8", "replace")
