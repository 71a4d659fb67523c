"""The header parser and writer against images made by qemu-img (QEMU 7.2 on the host)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import images
import pytest

from qsd_py.block.qcow2.header import (
    AUTOCLEAR_MASK,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    QEMU_FEATURE_TABLE,
    V3_HEADER_SIZE,
    Qcow2Error,
    Qcow2Header,
    parse_header,
    serialize_header,
)

# (id, create options): the variety of headers qemu-img writes.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("v3", {}),
    ("v2", {"compat": "0.10"}),
    ("v2-backing", {"compat": "0.10", "backing": "base.qcow2"}),
    ("v3-backing", {"backing": "base.qcow2"}),
    ("v3-backing-raw", {"backing": "base.raw", "backing_fmt": "raw"}),
    ("data-file", {"data_file": "data.raw"}),
    ("data-file-raw", {"data_file": "data.raw", "data_file_raw": True}),
    ("extended-l2", {"extended_l2": True}),
    ("zstd", {"compression_type": "zstd"}),
    ("lazy-refcounts", {"lazy_refcounts": True}),
    ("cluster-512", {"cluster_size": 512}),
    ("cluster-4k", {"cluster_size": 4096}),
    ("cluster-8k-backing", {"cluster_size": 8192, "backing": "base.qcow2"}),
    ("cluster-2m", {"cluster_size": 2 << 20}),
    ("extended-l2-16k", {"extended_l2": True, "cluster_size": 16384}),
    ("refcount-1", {"refcount_bits": 1}),
    ("refcount-64", {"refcount_bits": 64}),
    (
        "everything",
        {
            "extended_l2": True,
            "compression_type": "zstd",
            "lazy_refcounts": True,
            "refcount_bits": 8,
            "cluster_size": 32768,
            "backing": "base.qcow2",
        },
    ),  # fmt: skip
]


def make_variant(d: Path, opts: dict[str, Any]) -> Path:
    opts = dict(opts)
    backing = opts.pop("backing", None)
    if backing == "base.qcow2":
        images.create(d / backing, "8M")
    elif backing is not None:
        images.raw_file(d / backing, b"", 8 << 20)
    return images.create(d / "img.qcow2", "8M", backing=backing, **opts)


def first_cluster(img: Path) -> bytes:
    with open(img, "rb") as f:
        return f.read(2 << 20)


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_parse_agrees_with_qemu_img_info(name: str, opts: dict[str, Any], tmp_path: Path) -> None:
    img = make_variant(tmp_path, opts)
    h = parse_header(first_cluster(img), data_file_given=False)
    info = images.info(img)
    spec = info["format-specific"]["data"]
    assert h.size == info["virtual-size"] == 8 << 20
    assert h.cluster_size == info["cluster-size"]
    assert h.version == (2 if spec["compat"] == "0.10" else 3)
    assert h.refcount_bits == spec["refcount-bits"]
    assert h.lazy_refcounts == spec.get("lazy-refcounts", False)
    assert h.extended_l2 == spec.get("extended-l2", False)
    assert h.compression_type == (COMPRESSION_ZSTD if spec["compression-type"] == "zstd" else 0)
    assert h.data_file == spec.get("data-file")
    assert h.has_data_file == ("data-file" in spec)
    assert h.data_file_raw == spec.get("data-file-raw", False)
    assert h.backing_file == info.get("backing-filename")
    assert h.backing_format == info.get("backing-filename-format")
    assert not h.dirty and not h.corrupt and not h.needs_rewrite and h.warnings == []
    assert h.l1_size >= h.l1_vm_state_index
    assert h.unknown_extensions == []
    if h.version == 3 and h.cluster_size > 4096:
        assert tuple(h.feature_table) == QEMU_FEATURE_TABLE
    else:
        assert h.feature_table == []


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_serialize_round_trips_byte_for_byte(
    name: str, opts: dict[str, Any], tmp_path: Path
) -> None:
    img = make_variant(tmp_path, opts)
    data = first_cluster(img)
    h = parse_header(data)
    written = serialize_header(h)
    assert len(written) == h.cluster_size
    assert written == data[: h.cluster_size]
    assert parse_header(written) == h


def test_header_fields_are_where_qemu_put_them(tmp_path: Path) -> None:
    """Offsets of the tables against qemu-img's layout for a fresh 64 KiB-cluster image."""
    img = images.create(tmp_path / "img.qcow2", "1G")
    h = parse_header(first_cluster(img))
    assert (h.refcount_table_offset, h.refcount_table_clusters) == (0x10000, 1)
    assert (h.l1_table_offset, h.l1_size) == (0x30000, 2)  # 1 GiB / 512 MiB per L2 table
    assert (h.nb_snapshots, h.snapshots_offset) == (0, 0)
    assert (h.refcount_order, h.header_length) == (4, V3_HEADER_SIZE)
    assert h.l2_bits == 13 and h.subclusters_per_cluster == 1


def test_extended_l2_geometry(tmp_path: Path) -> None:
    img = images.create(tmp_path / "img.qcow2", "1G", extended_l2=True)
    h = parse_header(first_cluster(img))
    assert h.l2_bits == 12 and h.subclusters_per_cluster == 32
    assert h.l1_size == 4  # 256 MiB per L2 table


def test_error_is_its_message() -> None:
    err = Qcow2Error("Image is not in qcow2 format")
    assert str(err) == "Image is not in qcow2 format"
    assert isinstance(err, Exception)
    with pytest.raises(Qcow2Error, match="^Image is not in qcow2 format$"):
        parse_header(b"")


def test_corrupt_image_opens_read_only_only(tmp_path: Path) -> None:
    img = images.create(tmp_path / "img.qcow2", "1M")
    data = bytearray(first_cluster(img))
    data[79] |= INCOMPAT_CORRUPT
    with pytest.raises(Qcow2Error, match="cannot be opened read/write"):
        parse_header(data)
    assert parse_header(data, read_only=True).corrupt


def test_dirty_image_parses_in_both_modes(tmp_path: Path) -> None:
    img = images.create(tmp_path / "img.qcow2", "1M")
    data = bytearray(first_cluster(img))
    data[79] |= INCOMPAT_DIRTY
    assert parse_header(data).dirty and parse_header(data, read_only=True).dirty


def test_unknown_autoclear_bits_cleared_on_read_write_open_only(tmp_path: Path) -> None:
    img = images.create(tmp_path / "img.qcow2", "1M")
    data = bytearray(first_cluster(img))
    data[95] = 0x81  # autoclear bits 0 (bitmaps) and 7
    rw = parse_header(data)
    assert rw.needs_rewrite and rw.autoclear_features == 0x01 & AUTOCLEAR_MASK
    ro = parse_header(data, read_only=True)
    assert not ro.needs_rewrite and ro.autoclear_features == 0x81


def test_unknown_extensions_kept_and_written_back_reversed() -> None:
    h = Qcow2Header(
        size=1 << 20, l1_size=1, l1_table_offset=0x30000, refcount_table_offset=0x10000,
        refcount_table_clusters=1, unknown_extensions=[(0x1111, b"first"), (0x2222, b"2nd")],
    )  # fmt: skip
    parsed = parse_header(serialize_header(h))
    assert parsed.unknown_extensions == [(0x2222, b"2nd"), (0x1111, b"first")]
    assert parse_header(serialize_header(parsed)).unknown_extensions == h.unknown_extensions


def test_default_header_round_trips() -> None:
    h = Qcow2Header(
        size=10 << 20, l1_size=1, l1_table_offset=0x30000, refcount_table_offset=0x10000,
        refcount_table_clusters=1, backing_file="base.img", backing_format="raw",
        compatible_features=1,
    )  # fmt: skip
    parsed = parse_header(serialize_header(h))
    assert parsed.backing_file == "base.img" and parsed.backing_format == "raw"
    assert parsed.lazy_refcounts
    assert parsed.feature_table == list(QEMU_FEATURE_TABLE)


def test_non_utf8_backing_name_round_trips() -> None:
    h = Qcow2Header(
        size=1 << 20, l1_size=1, l1_table_offset=0x30000, refcount_table_offset=0x10000,
        refcount_table_clusters=1, backing_file=b"caf\xe9.img".decode("utf-8", "surrogateescape"),
    )  # fmt: skip
    raw = serialize_header(h)
    assert b"caf\xe9.img" in raw
    assert parse_header(raw).backing_file == h.backing_file


def test_header_too_big_for_the_cluster() -> None:
    h = Qcow2Header(
        cluster_bits=9, size=1 << 20, l1_size=1, l1_table_offset=0x200,
        refcount_table_offset=0x400, refcount_table_clusters=1, backing_file="b" * 400,
    )  # fmt: skip
    with pytest.raises(OSError) as err:
        serialize_header(h)
    assert err.value.errno == errno.ENOSPC


def test_short_input_reads_as_zeroes_past_its_end(tmp_path: Path) -> None:
    """A file shorter than its cluster: the missing bytes are zeroes, as QEMU reads them."""
    img = images.create(tmp_path / "img.qcow2", "1M")
    data = first_cluster(img)
    end = data.index(bytes(8), V3_HEADER_SIZE + 8 + 48 * 8)  # after the feature table
    assert parse_header(data[: end + 1]) == parse_header(data)
