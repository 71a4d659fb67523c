"""The internal snapshot table against tables qemu-img wrote."""

from __future__ import annotations

import struct
from pathlib import Path

import damage
import images
import pytest
from walk import Image

from qsd_py.block.qcow2.header import Qcow2Error
from qsd_py.block.qcow2.snapshots import (
    NO_ICOUNT,
    Qcow2Snapshot,
    SnapshotTableShort,
    parse_snapshot_table,
    serialize_snapshot_table,
    snapshot_table_size,
    validate_snapshot_l1,
)


def table_bytes(image: Image) -> bytes:
    return image.read(image.h.snapshots_offset, snapshot_table_size(image.snapshots()))


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_qemu_img_snapshots_parse_and_write_back_identically(compat: str, tmp_path: Path) -> None:
    img = images.create(tmp_path / "img.qcow2", "4M", compat=compat)
    images.write(img, 0, 65536, 0x11)
    images.snapshot(img, "one")
    images.write(img, 65536, 65536, 0x22)
    images.snapshot(img, "a longer name, spaces")
    image = Image(img)
    snapshots = image.snapshots()
    assert [(s.id, s.name) for s in snapshots] == [("1", "one"), ("2", "a longer name, spaces")]
    for sn in snapshots:
        assert sn.disk_size == 4 << 20 and sn.vm_state_size == 0
        assert sn.extra_data_size == 24 and sn.unknown_extra_data == b""
        assert sn.l1_size == 1 and sn.l1_table_offset % 65536 == 0
        assert sn.date_sec > 1_600_000_000
        validate_snapshot_l1(sn, 65536)
    assert snapshots[0].l1_table_offset != snapshots[1].l1_table_offset
    raw = table_bytes(image)
    assert serialize_snapshot_table(snapshots) == raw


def test_unknown_extra_data_survives_qemus_rewrite(tmp_path: Path) -> None:
    """qemu-img rewrites the whole table when it adds a snapshot; the unknown extra data of
    the old entry stays, and the new table is what serialize_snapshot_table gives."""
    img = damage.snapshot_extra_unknown(tmp_path)
    before = Image(img).snapshots()
    assert before[0].extra_data_size == 40
    assert before[0].unknown_extra_data == b"UNKNOWN EXTRA 16"
    assert before[0].name == "one"
    images.snapshot(img, "two")
    image = Image(img)
    after = image.snapshots()
    assert after[0] == before[0]
    assert serialize_snapshot_table(after) == table_bytes(image)


def entry(extra: bytes, sn_id: bytes = b"7", name: bytes = b"old", vm_state: int = 5) -> bytes:
    return struct.pack(">QIHHIIQII", 0x70000, 2, len(sn_id), len(name), 10, 20, 30, vm_state,
                       len(extra)) + extra + sn_id + name  # fmt: skip


def test_entry_without_extra_data_takes_the_disk_size() -> None:
    (sn,) = parse_snapshot_table(entry(b""), 1, 12345 * 512)
    assert (sn.id, sn.name, sn.vm_state_size, sn.disk_size) == ("7", "old", 5, 12345 * 512)
    assert sn.icount == NO_ICOUNT and sn.extra_data_size == 0
    assert (sn.date_sec, sn.date_nsec, sn.vm_clock_nsec) == (10, 20, 30)
    written = serialize_snapshot_table([sn])
    assert struct.unpack_from(">I", written, 36)[0] == 24  # QEMU writes its 24 bytes
    assert parse_snapshot_table(written, 1, 0) == [
        Qcow2Snapshot(0x70000, 2, "7", "old", 10, 20, 30, 5, 12345 * 512, NO_ICOUNT, 24)
    ]


def test_partial_extra_data() -> None:
    (sn,) = parse_snapshot_table(entry(struct.pack(">Q", 1 << 40)), 1, 4096)
    assert sn.vm_state_size == 1 << 40 and sn.disk_size == 4096
    (sn,) = parse_snapshot_table(entry(struct.pack(">QQ", 9, 8192)), 1, 4096)
    assert sn.vm_state_size == 9 and sn.disk_size == 8192 and sn.icount == NO_ICOUNT
    (sn,) = parse_snapshot_table(entry(struct.pack(">QQQ", 9, 8192, 77)), 1, 4096)
    assert sn.icount == 77


def test_large_vm_state_leaves_the_32_bit_field_zero() -> None:
    sn = Qcow2Snapshot(0x70000, 1, "1", "big", vm_state_size=5 << 32, disk_size=1 << 20)
    raw = serialize_snapshot_table([sn])
    assert struct.unpack_from(">I", raw, 32)[0] == 0
    assert parse_snapshot_table(raw, 1, 0)[0].vm_state_size == 5 << 32


def test_entries_are_8_byte_aligned_and_names_cut_at_nul() -> None:
    first = entry(bytes(24), b"1", b"abc")  # 40 + 24 + 4 = 68 bytes: 4 bytes of padding
    second = entry(bytes(24), b"2", b"x\0y")
    table = first + bytes(4) + second
    snapshots = parse_snapshot_table(table, 2, 0)
    assert [(s.id, s.name) for s in snapshots] == [("1", "abc"), ("2", "x")]
    assert snapshot_table_size(snapshots) == len(first) + 4 + len(second) - 2


def test_short_data_asks_for_more() -> None:
    table = entry(bytes(24)) + bytes(4) + entry(bytes(24), b"8", b"second")
    with pytest.raises(SnapshotTableShort) as short:
        parse_snapshot_table(table[:50], 2, 0)
    assert short.value.needed == 64  # header and extra data of the first entry
    with pytest.raises(SnapshotTableShort) as short:
        parse_snapshot_table(table[:72], 2, 0)
    assert short.value.needed == 72 + 40  # the second entry's header
    assert len(parse_snapshot_table(table, 2, 0)) == 2
    assert parse_snapshot_table(b"", 0, 0) == []


def test_qemus_refusals() -> None:
    with pytest.raises(Qcow2Error, match="^Too much extra metadata in snapshot table entry 0$"):
        parse_snapshot_table(entry(bytes(1025)), 1, 0)
    big = struct.pack(">QIHHIIQII", 0, 0, 65535, 65535, 0, 0, 0, 0, 1024)
    stride = (40 + 1024 + 2 * 65535 + 7) & ~7
    table = bytearray(stride * 520)
    for i in range(520):
        table[i * stride : i * stride + 40] = big
    with pytest.raises(Qcow2Error, match="^Snapshot table is too big$"):
        parse_snapshot_table(table, 520, 0)


def test_snapshot_l1_checks() -> None:
    sn = Qcow2Snapshot(0x70008, 1, "1", "x")
    with pytest.raises(Qcow2Error, match="^Snapshot L1 table offset invalid$"):
        validate_snapshot_l1(sn, 65536)
    sn = Qcow2Snapshot(0x70000, 5_000_000, "1", "x")
    with pytest.raises(Qcow2Error, match="^Snapshot L1 table too large$"):
        validate_snapshot_l1(sn, 65536)
