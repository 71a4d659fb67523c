"""The internal snapshot table: read with QEMU 11.1's checks and texts, written as QEMU writes it.

Each entry: L1 table offset (8), L1 size (4), id length (2), name length (2), date seconds (4)
and nanoseconds (4), VM clock in ns (8), VM state size (4), extra data size (4), the extra data
(v3: 64-bit VM state size, virtual disk size, icount; more is kept as unknown), the id and the
name (no NUL); every entry starts 8-byte aligned.

The table's length is only known while reading it, so ``parse_snapshot_table`` raises
``SnapshotTableShort`` with the number of bytes it needs when the data given ends too early; the
caller reads at least that much (zeroes past the end of the file, as QEMU reads them; doubling
the read keeps a long table linear) and calls again with the table from its start.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from qsd_py.block.qcow2.header import MAX_L1_SIZE, Qcow2Error, validate_table

ENTRY_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
EXTRA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount
MAX_EXTRA_DATA = 1024
MAX_TABLE_SIZE = 1024 * 65536  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
INT_MAX = (1 << 31) - 1
NO_ICOUNT = (1 << 64) - 1  # what QEMU keeps when the entry has no icount


class SnapshotTableShort(Exception):
    """The data ends before the table does: ``needed`` bytes (from the table start) are needed."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"snapshot table needs {needed} bytes")
        self.needed = needed


@dataclass
class Qcow2Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = NO_ICOUNT
    # The extra data size as stored (>= 24 once QEMU rewrote the entry) and the bytes past the
    # 24 QEMU knows, kept on rewrite.
    extra_data_size: int = EXTRA.size
    unknown_extra_data: bytes = b""


def parse_snapshot_table(
    data: bytes | bytearray | memoryview, nb_snapshots: int, disk_size: int
) -> list[Qcow2Snapshot]:
    """The ``nb_snapshots`` entries of the table whose bytes start ``data``.

    ``disk_size`` is the image's virtual size rounded down to 512 bytes: entries without the
    disk size field have that size. Raises Qcow2Error with QEMU's text for a table QEMU refuses.
    """
    view = memoryview(data)
    snapshots = []
    offset = 0
    for i in range(nb_snapshots):
        offset = (offset + 7) & ~7
        snapshot, offset = _parse_entry(view, offset, i, disk_size)
        snapshots.append(snapshot)
        if offset > MAX_TABLE_SIZE or offset > INT_MAX:
            raise Qcow2Error("Snapshot table is too big")
    return snapshots


def snapshot_table_size(snapshots: Iterable[Qcow2Snapshot]) -> int:
    """Bytes the table takes once written (entries 8-byte aligned, the last one not padded)."""
    size = 0
    for sn in snapshots:
        size = (size + 7) & ~7
        size += ENTRY_HEADER.size + max(EXTRA.size, sn.extra_data_size)
        size += len(_encode(sn.id)) + len(_encode(sn.name))
    return size


def serialize_snapshot_table(snapshots: Iterable[Qcow2Snapshot]) -> bytes:
    """The table as QEMU's qcow2_write_snapshots writes it.

    A VM state size over 32 bits leaves the 32-bit field 0 (older readers then see a disk-only
    snapshot); the extra data is at least the 24 bytes QEMU knows, then the unknown bytes kept.
    """
    out = bytearray()
    for sn in snapshots:
        out += bytes(-len(out) % 8)
        sn_id, name = _encode(sn.id), _encode(sn.name)
        extra_size = max(EXTRA.size, sn.extra_data_size)
        out += ENTRY_HEADER.pack(
            sn.l1_table_offset, sn.l1_size, len(sn_id), len(name), sn.date_sec, sn.date_nsec,
            sn.vm_clock_nsec, sn.vm_state_size if sn.vm_state_size <= 0xFFFF_FFFF else 0,
            extra_size,
        )  # fmt: skip
        out += EXTRA.pack(sn.vm_state_size, sn.disk_size, sn.icount)
        out += sn.unknown_extra_data[: extra_size - EXTRA.size]
        out += sn_id + name
    return bytes(out)


def validate_snapshot_l1(sn: Qcow2Snapshot, cluster_size: int) -> None:
    """QEMU's check before it uses a snapshot's L1 table (goto, delete, check)."""
    name = "Snapshot L1 table"
    validate_table(sn.l1_table_offset, sn.l1_size, 8, MAX_L1_SIZE, name, cluster_size)


def _parse_entry(
    view: memoryview, offset: int, index: int, disk_size: int
) -> tuple[Qcow2Snapshot, int]:
    (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state32,
     extra_size) = ENTRY_HEADER.unpack(_take(view, offset, ENTRY_HEADER.size))  # fmt: skip
    offset += ENTRY_HEADER.size
    if extra_size > MAX_EXTRA_DATA:
        raise Qcow2Error(f"Too much extra metadata in snapshot table entry {index}")
    known = _take(view, offset, min(EXTRA.size, extra_size)) + bytes(EXTRA.size)
    vm_state_large, stored_disk_size, icount = EXTRA.unpack_from(known)
    offset += min(EXTRA.size, extra_size)
    unknown = b""
    if extra_size > EXTRA.size:
        unknown = _take(view, offset, extra_size - EXTRA.size)
        offset += extra_size - EXTRA.size
    sn_id = _take(view, offset, id_size)
    name = _take(view, offset + id_size, name_size)
    snapshot = Qcow2Snapshot(
        l1_table_offset=l1_offset,
        l1_size=l1_size,
        id=_c_string(sn_id),
        name=_c_string(name),
        date_sec=date_sec,
        date_nsec=date_nsec,
        vm_clock_nsec=vm_clock,
        vm_state_size=vm_state_large if extra_size >= 8 else vm_state32,
        disk_size=stored_disk_size if extra_size >= 16 else disk_size,
        icount=icount if extra_size >= EXTRA.size else NO_ICOUNT,
        extra_data_size=extra_size,
        unknown_extra_data=unknown,
    )
    return snapshot, offset + id_size + name_size


def _take(view: memoryview, offset: int, length: int) -> bytes:
    if offset + length > len(view):
        raise SnapshotTableShort(offset + length)
    return bytes(view[offset : offset + length])


def _c_string(raw: bytes) -> str:
    """QEMU keeps ids and names as C strings: cut at a NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
