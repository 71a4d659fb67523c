"""L1/L2 entries, extended L2 bitmaps, compressed descriptors and refcount cells.

The image tests decode images qemu-img wrote, through ``walk.Image`` (nothing but the format
functions), and compare with qemu-img: the guest bytes with ``qemu-img convert -O raw``, the
stored refcounts with the references the metadata makes (which ``qemu-img check`` found clean).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import images
import pytest
from walk import Image

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.entry_checks import EntryChecks

K = 1024
M = 1024 * 1024


def scattered_writes(img: Path, cluster: int, size: int = 4 * M) -> None:
    """Data in a few places, some zeroed and discarded again: every kind of entry."""
    images.write(img, 0, 3 * cluster, 0x11)
    images.write(img, size // 2 + 512, 1536, 0x22)  # inside one cluster
    images.write(img, size - cluster, cluster, 0x33)
    images.write_zeroes(img, cluster, cluster)  # zero flag, allocation kept (v3)
    images.write_zeroes(img, 2 * cluster, cluster, unmap=True)


def plain(size: int = 4 * M, **opts: object) -> Callable[[Path], tuple[Path, bytes]]:
    def make(d: Path) -> tuple[Path, bytes]:
        img = images.create(d / "img.qcow2", size, **opts)
        scattered_writes(img, images.info(img)["cluster-size"], size)
        return img, b""

    return make


def extended_l2_subclusters(d: Path) -> tuple[Path, bytes]:
    """64 KiB clusters, 2 KiB subclusters written, zeroed and discarded one by one."""
    img = images.create(d / "img.qcow2", "4M", extended_l2=True)
    images.write(img, 0, 64 * K, 0x11)
    images.write(img, 4 * K, 2 * K, 0x22)
    images.write(img, 128 * K + 6 * K, 10 * K, 0x44)
    images.write_zeroes(img, 8 * K, 4 * K)
    images.write_zeroes(img, 256 * K + 2 * K, 2 * K)  # zero subcluster, no allocation
    images.discard(img, 32 * K, 64 * K)
    return img, b""


def extended_l2_over_backing(d: Path) -> tuple[Path, bytes]:
    """Subclusters not written in an allocated cluster show the backing file through."""
    base = images.create(d / "base.qcow2", "4M")
    images.write(base, 0, 4 * M, 0x5A)
    img = images.create(d / "img.qcow2", "4M", backing="base.qcow2", extended_l2=True)
    images.write(img, 16 * K, 2 * K, 0x66)
    images.write(img, 1 * M + 60 * K, 8 * K, 0x77)
    images.write_zeroes(img, 2 * M, 4 * K)
    return img, images.to_raw(base, d / "base.raw")


def backing_chain(d: Path) -> tuple[Path, bytes]:
    base = images.create(d / "base.qcow2", "4M")
    images.write(base, 0, 4 * M, 0x5A)
    img = images.create(d / "img.qcow2", "4M", backing="base.qcow2")
    images.write(img, 64 * K + 512, 512, 0x66)
    images.write_zeroes(img, 1 * M, 128 * K)
    return img, images.to_raw(base, d / "base.raw")


def compressed(compression_type: str, cluster_size: int = 64 * K) -> Callable:
    def make(d: Path) -> tuple[Path, bytes]:
        data = images.compressible_data(3 * M, seed=cluster_size)
        data = data[: 1 * M] + bytes(M) + data[2 * M :]  # a hole in the middle
        raw = images.raw_file(d / "src.raw", data, 4 * M)
        img = images.convert_compressed(
            raw, d / "img.qcow2", compression_type=compression_type, cluster_size=cluster_size
        )
        return img, b""

    return make


def snapshots(d: Path) -> tuple[Path, bytes]:
    """Two internal snapshots: shared clusters with refcount 2 lose the copied flag."""
    img = images.create(d / "img.qcow2", "4M")
    images.write(img, 0, 256 * K, 0x11)
    images.snapshot(img, "one")
    images.write(img, 64 * K, 64 * K, 0x22)
    images.snapshot(img, "two")
    images.write(img, 1 * M, 64 * K, 0x33)
    return img, b""


def data_file(raw: bool) -> Callable[[Path], tuple[Path, bytes]]:
    def make(d: Path) -> tuple[Path, bytes]:
        img = images.create(d / "img.qcow2", "4M", data_file="img.raw", data_file_raw=raw)
        scattered_writes(img, 64 * K)
        return img, b""

    return make


def preallocated(mode: str) -> Callable[[Path], tuple[Path, bytes]]:
    def make(d: Path) -> tuple[Path, bytes]:
        img = images.create(d / "img.qcow2", "4M", preallocation=mode)
        images.write(img, 128 * K, 64 * K, 0x44)
        images.write_zeroes(img, 1 * M, 64 * K)
        return img, b""

    return make


SCENARIOS: dict[str, Callable[[Path], tuple[Path, bytes]]] = {
    "v3": plain(),
    "v2": plain(compat="0.10"),
    "lazy-refcounts": plain(lazy_refcounts=True),
    "cluster-512": plain(cluster_size=512),
    "cluster-4k": plain(cluster_size=4096),
    "cluster-2m": plain(16 * M, cluster_size=2 * M),
    **{f"refcount-{bits}": plain(refcount_bits=bits) for bits in (1, 2, 4, 8, 32, 64)},
    "extended-l2": extended_l2_subclusters,
    "extended-l2-backing": extended_l2_over_backing,
    "extended-l2-16k": plain(extended_l2=True, cluster_size=16 * K),
    "backing": backing_chain,
    "zlib": compressed("zlib"),
    "zlib-4k": compressed("zlib", 4 * K),
    "zlib-2m": compressed("zlib", 2 * M),
    "zstd": compressed("zstd"),
    "zstd-512": compressed("zstd", 512),
    "snapshots": snapshots,
    "data-file": data_file(False),
    "data-file-raw": data_file(True),
    "prealloc-metadata": preallocated("metadata"),
    "prealloc-falloc": preallocated("falloc"),
    "prealloc-full": preallocated("full"),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_guest_view_matches_qemu_img_convert(name: str, tmp_path: Path) -> None:
    img, backing = SCENARIOS[name](tmp_path)
    assert Image(img).guest_bytes(backing) == images.to_raw(img, tmp_path / "guest.raw")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_refcounts_match_the_metadata(name: str, tmp_path: Path) -> None:
    img, _ = SCENARIOS[name](tmp_path)
    code, report = images.check(img)
    assert code == 0, report  # qemu-img found the image clean: its refcounts are right
    image = Image(img)
    stored = image.stored_refcounts()
    assert stored == image.referenced()
    assert image.copied_flags_wrong() == []
    if name == "snapshots":
        assert 2 in stored.values() and 3 in stored.values()


def test_entry_kinds_of_a_written_image(tmp_path: Path) -> None:
    """Which types qemu-io's writes leave, entry by entry."""
    img = images.create(tmp_path / "img.qcow2", "4M")
    scattered_writes(img, 64 * K)
    image = Image(img)
    l2 = image.l2_table(e.l1_l2_offset(image.l1_table()[0]))
    kinds = [e.cluster_type(e.read_l2_entry(l2, i, False), False) for i in range(64)]
    assert kinds[:4] == [e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC, e.CLUSTER_ZERO_PLAIN, 0]
    assert kinds[32] == kinds[63] == e.CLUSTER_NORMAL
    assert kinds.count(e.CLUSTER_UNALLOCATED) == 64 - 5
    entry0 = e.read_l2_entry(l2, 0, False)
    assert entry0 & e.OFLAG_COPIED and not entry0 & e.L2E_STD_RESERVED_MASK


# --- pure functions -----------------------------------------------------------------------------


def test_geometry() -> None:
    assert e.l2_entry_size(False) == 8 and e.l2_entry_size(True) == 16
    assert e.l2_entries_per_cluster(16, False) == 8192
    assert e.l2_entries_per_cluster(16, True) == 4096
    assert e.l1_entries_for(1 << 30, 16, False) == 2
    assert e.l1_entries_for((1 << 29) + 1, 16, False) == 2
    assert e.l1_entries_for(0, 9, False) == 0
    offset = 3 * (1 << 29) + 5 * 65536 + 2048 + 7
    assert e.l1_index(offset, 16, False) == 3
    assert e.l2_index(offset, 16, False) == 5
    assert e.subcluster_index(offset, 16) == 1
    assert e.l1_index(1 << 28, 16, True) == 1


@pytest.mark.parametrize(
    ("entry", "extended", "data_file", "expected"),
    [
        (0, False, False, e.CLUSTER_UNALLOCATED),
        (e.OFLAG_ZERO, False, False, e.CLUSTER_ZERO_PLAIN),
        (e.OFLAG_ZERO | 0x50000, False, False, e.CLUSTER_ZERO_ALLOC),
        (e.OFLAG_ZERO | 0x50000 | e.OFLAG_COPIED, False, False, e.CLUSTER_ZERO_ALLOC),
        (0x50000 | e.OFLAG_COPIED, False, False, e.CLUSTER_NORMAL),
        (0x50000, False, False, e.CLUSTER_NORMAL),
        (e.OFLAG_COMPRESSED | 0x50000, False, False, e.CLUSTER_COMPRESSED),
        (e.OFLAG_COMPRESSED | e.OFLAG_ZERO, False, False, e.CLUSTER_COMPRESSED),
        (e.OFLAG_ZERO | 0x50000, True, False, e.CLUSTER_NORMAL),  # zero flag unused
        (e.OFLAG_ZERO, True, False, e.CLUSTER_UNALLOCATED),
        (e.OFLAG_COPIED, False, False, e.CLUSTER_UNALLOCATED),
        (e.OFLAG_COPIED, False, True, e.CLUSTER_NORMAL),  # offset 0 of a data file
        (0, False, True, e.CLUSTER_UNALLOCATED),
    ],
)
def test_cluster_type(entry: int, extended: bool, data_file: bool, expected: int) -> None:
    assert e.cluster_type(entry, extended, data_file) == expected


def test_subcluster_types_of_an_extended_entry() -> None:
    host = 0x50000 | e.OFLAG_COPIED
    bitmap = e.alloc_range(0, 4) | e.zero_range(4, 6) | e.alloc_range(10, 11)
    types = [e.subcluster_type(host, bitmap, sc, True) for sc in range(32)]
    assert types[:4] == [e.SUBCLUSTER_NORMAL] * 4
    assert types[4:6] == [e.SUBCLUSTER_ZERO_ALLOC] * 2
    assert types[6:10] == [e.SUBCLUSTER_UNALLOCATED_ALLOC] * 4
    assert types[10] == e.SUBCLUSTER_NORMAL
    assert set(types[11:]) == {e.SUBCLUSTER_UNALLOCATED_ALLOC}
    assert e.subcluster_type(host, e.alloc_range(0, 1) | e.zero_range(0, 1), 5, True) == (
        e.SUBCLUSTER_INVALID
    )
    assert e.subcluster_type(0, e.zero_range(3, 4), 3, True) == e.SUBCLUSTER_ZERO_PLAIN
    assert e.subcluster_type(0, e.zero_range(3, 4), 2, True) == e.SUBCLUSTER_UNALLOCATED_PLAIN
    assert e.subcluster_type(0, e.alloc_range(3, 4), 2, True) == e.SUBCLUSTER_INVALID
    compressed = e.OFLAG_COMPRESSED | 0x50000
    assert e.subcluster_type(compressed, 0, 7, True) == e.SUBCLUSTER_COMPRESSED
    assert e.bitmap_alloc_mask(bitmap) == 0b100_0000_1111
    assert e.bitmap_zero_mask(bitmap) == 0b11_0000


def test_subcluster_runs() -> None:
    host = 0x50000
    bitmap = e.alloc_range(0, 4) | e.zero_range(4, 6) | e.alloc_range(10, 32)
    assert e.subcluster_run(host, bitmap, 0, True) == (e.SUBCLUSTER_NORMAL, 4)
    assert e.subcluster_run(host, bitmap, 2, True) == (e.SUBCLUSTER_NORMAL, 2)
    assert e.subcluster_run(host, bitmap, 4, True) == (e.SUBCLUSTER_ZERO_ALLOC, 2)
    assert e.subcluster_run(host, bitmap, 6, True) == (e.SUBCLUSTER_UNALLOCATED_ALLOC, 4)
    assert e.subcluster_run(host, bitmap, 10, True) == (e.SUBCLUSTER_NORMAL, 22)
    assert e.subcluster_run(0, 0, 5, True) == (e.SUBCLUSTER_UNALLOCATED_PLAIN, 27)
    assert e.subcluster_run(0, e.zero_range(9, 32), 0, True) == (
        e.SUBCLUSTER_UNALLOCATED_PLAIN, 9,
    )  # fmt: skip
    assert e.subcluster_run(0, e.zero_range(9, 32), 9, True) == (e.SUBCLUSTER_ZERO_PLAIN, 23)
    assert e.subcluster_run(e.OFLAG_COMPRESSED | host, 0, 3, True) == (
        e.SUBCLUSTER_COMPRESSED, 29,
    )  # fmt: skip
    assert e.subcluster_run(host, bitmap | e.zero_range(0, 1), 0, True) == (
        e.SUBCLUSTER_INVALID, 0,
    )  # fmt: skip
    assert e.subcluster_run(host | e.OFLAG_COPIED, 0, 0, False) == (e.SUBCLUSTER_NORMAL, 1)


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_descriptor_round_trips(cluster_bits: int) -> None:
    rng = random.Random(cluster_bits)
    shift = e.compressed_shift(cluster_bits)
    for _ in range(200):
        offset = rng.randrange(0, 1 << min(shift, 50))
        length = rng.randrange(1, (1 << cluster_bits) - (offset & 511) + 1)
        entry = e.compressed_entry(offset, length, cluster_bits)
        assert e.cluster_type(entry, False) == e.CLUSTER_COMPRESSED
        start, nbytes = e.compressed_range(entry, cluster_bits)
        assert start == offset
        assert length <= nbytes < length + 512 and (start + nbytes) % 512 == 0
    with pytest.raises(ValueError):
        e.compressed_entry(1 << shift, 100, cluster_bits)


def test_compressed_descriptor_layout() -> None:
    """64 KiB clusters: offset in bits 0-53, additional sectors in bits 54-61."""
    entry = e.OFLAG_COMPRESSED | (3 << 54) | 0x12345
    assert e.compressed_range(entry, 16) == (0x12345, 4 * 512 - 0x145)
    assert e.compressed_entry(0x12345, 4 * 512 - 0x145, 16) == entry


@pytest.mark.parametrize("order", range(7))
def test_refcount_cells_round_trip(order: int) -> None:
    rng = random.Random(order)
    cells = e.refcount_block_entries(12, order)
    values = [rng.randrange(0, e.refcount_max(order) + 1) for _ in range(cells)]
    block = bytearray(4096)
    for i, value in enumerate(values):
        e.set_refcount(block, i, order, value)
    assert [e.get_refcount(block, i, order) for i in range(cells)] == values
    with pytest.raises(ValueError):
        e.set_refcount(block, 0, order, e.refcount_max(order) + 1)


@pytest.mark.parametrize(
    ("order", "index", "value", "raw"),
    [
        (0, 0, 1, b"\x01\x00"),
        (0, 9, 1, b"\x00\x02"),
        (1, 1, 3, b"\x0c\x00"),
        (2, 1, 0xA, b"\xa0\x00"),
        (3, 1, 0x7F, b"\x00\x7f"),
        (4, 0, 0x1234, b"\x12\x34"),
        (5, 0, 0x01020304, b"\x01\x02\x03\x04"),
        (6, 0, 0x0102030405060708, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
    ],
)
def test_refcount_bit_order_is_qemus(order: int, index: int, value: int, raw: bytes) -> None:
    block = bytearray(8)
    e.set_refcount(block, index, order, value)
    assert bytes(block[: len(raw)]) == raw
    assert e.get_refcount(block, index, order) == value


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_blocks_from_qemu_img_re_encode_identically(bits: int, tmp_path: Path) -> None:
    img = images.create(tmp_path / "img.qcow2", "4M", refcount_bits=bits)
    images.write(img, 0, 256 * K, 0x11)
    image = Image(img)
    order = image.h.refcount_order
    assert 1 << order == bits
    block_offset = e.reftable_block_offset(
        int.from_bytes(image.read(image.h.refcount_table_offset, 8), "big")
    )
    block = image.read(block_offset, image.cs)
    cells = [e.get_refcount(block, i, order) for i in range(e.refcount_block_entries(16, order))]
    assert cells[:9] == [1] * 9 and set(cells[9:]) == {0}  # header .. last data cluster
    again = bytearray(image.cs)
    for i, value in enumerate(cells):
        e.set_refcount(again, i, order, value)
    assert bytes(again) == block


def test_refcount_location() -> None:
    assert e.refcount_location(0x50000, 16, 4) == (0, 5)
    assert e.refcount_location(32768 * 65536 + 65536, 16, 4) == (1, 1)
    assert e.refcount_location(3 * 512, 9, 0) == (0, 3)
    assert e.refcount_location(4096 * 512, 9, 0) == (1, 0)


def test_write_and_read_entries() -> None:
    table = bytearray(64)
    e.write_l2_entry(table, 1, True, 0x50000 | e.OFLAG_COPIED, e.alloc_range(0, 3))
    assert e.read_l2_entry(table, 1, True) == 0x50000 | e.OFLAG_COPIED
    assert e.read_l2_bitmap(table, 1) == 0b111
    e.write_l2_entry(table, 3, False, 0x60000)
    assert e.read_l2_entry(table, 3, False) == 0x60000
    assert table[24:32] == (0x60000).to_bytes(8, "big")


def test_corruption_texts_use_c_hex() -> None:
    assert e.c_hex(0) == "0" and e.c_hex(255) == "0xff"
    text = e.l2_table_unaligned_text(0x40200, 0)
    assert text == "L2 table offset 0x40200 unaligned (L1 index: 0)"
    assert e.cluster_unaligned_text(0x50200, 0x40000, 3) == (
        "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0x3)"
    )
    assert e.invalid_entry_text(0x40000, 0).startswith("Invalid cluster entry found  (L2")


def test_read_refuses_any_in_a_run() -> None:
    """A run of entries is told clean in one pass, and a refused one anywhere in it is
    found as :meth:`EntryChecks.on_read` finds it (unaligned host offset; a v2 zero flag)."""
    checks = EntryChecks(16, False, 3, False, lambda cluster: 0x50000)
    good = [((0x100000 + i * 0x10000) | e.OFLAG_COPIED, 0) for i in range(16)]
    assert not checks.read_refuses_any(0, good)
    bad = list(good)
    bad[9] = (0x100200 | e.OFLAG_COPIED, 0)  # not at a cluster boundary
    assert checks.read_refuses_any(0, bad)
    assert checks.on_read(9, *bad[9], 0) is not None
    v2 = EntryChecks(16, False, 2, False, lambda cluster: 0x50000)
    zero = [(0, 0)] * 3 + [(e.OFLAG_ZERO, 0)]
    assert v2.read_refuses_any(0, zero)
    assert not checks.read_refuses_any(0, zero)
