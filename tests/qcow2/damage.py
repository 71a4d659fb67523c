"""Damaged qcow2 images: a valid image from the host's qemu-img, then a few bytes edited.

Each damage is a function ``make(directory) -> image path`` registered in ``DAMAGES`` under an
id, with a kind that says what its QEMU expectation covers:

- ``header``: refused or accepted by QEMU's open on the header cluster alone; qsd-py's
  ``parse_header`` must give QEMU's text (read-write and read-only),
- ``snapshot``: the same for the snapshot table (``parse_snapshot_table``),
- ``open``: an open outcome decided elsewhere (backing chain, refcounts); recorded for the driver,
- ``runtime``: the image opens; the damage shows when a cluster is read or written, recorded
  with QEMU's qemu-io (its messages, and whether QEMU marked the image corrupt).

What QEMU 11.1 does with each is checked in as ``data/qemu-11.1-open.json``, made by
``scripts/qcow2-corpus-expectations`` (or ``--real-qsd`` ``test_corpus_realqsd.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import images

# Header fields: (offset, struct format).
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

EXT_FEATURE_TABLE = 0x6803F857
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


@dataclass(frozen=True)
class Damage:
    id: str
    kind: str  # header, snapshot, open, runtime
    make: Callable[[Path], Path]
    doc: str
    io: tuple[str, ...] = ()  # qemu-io commands for runtime damages
    # More blockdev-add arguments for the qcow2 node; "$DIR" stands for the image's directory.
    options: dict[str, Any] = field(default_factory=dict)


DAMAGES: dict[str, Damage] = {}


def damage(
    kind: str, *io: str, options: dict[str, Any] | None = None
) -> Callable[[Callable[[Path], Path]], Callable[[Path], Path]]:
    """Register ``make`` under its name with dashes (``bad_magic`` -> ``bad-magic``)."""

    def register(make: Callable[[Path], Path]) -> Callable[[Path], Path]:
        did = make.__name__.replace("_", "-")
        doc = (make.__doc__ or "").strip()
        DAMAGES[did] = Damage(did, kind, make, doc, io, options or {})
        return make

    return register


# --- byte editing -------------------------------------------------------------------------------


def get(img: Path, name: str) -> int:
    offset, fmt = FIELDS[name]
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def put(img: Path, name: str, value: int) -> None:
    offset, fmt = FIELDS[name]
    poke(img, offset, struct.pack(fmt, value))


def poke(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek_u64(img: Path, offset: int) -> int:
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def poke_u64(img: Path, offset: int, value: int) -> None:
    poke(img, offset, struct.pack(">Q", value))


def extensions(img: Path) -> list[tuple[int, bytes]]:
    """The header extensions of an image (without backing file), in file order."""
    data = img.read_bytes()
    offset = get(img, "header_length") if get(img, "version") == 3 else 72
    exts = []
    while True:
        ext_type, length = struct.unpack_from(">II", data, offset)
        if ext_type == 0:
            return exts
        exts.append((ext_type, data[offset + 8 : offset + 8 + length]))
        offset += 8 + ((length + 7) & ~7)


def set_extensions(img: Path, exts: list[tuple[int, bytes]], raw: bytes = b"") -> None:
    """Rewrite the extension area: ``exts``, the end marker (unless ``raw`` replaces it all)."""
    start = get(img, "header_length") if get(img, "version") == 3 else 72
    area = bytearray()
    for ext_type, data in exts:
        area += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    area += raw or bytes(8)
    cluster = 1 << get(img, "cluster_bits")
    poke(img, start, bytes(area) + bytes(max(0, cluster - start - len(area))))


def l1_entry(img: Path, index: int = 0) -> int:
    return peek_u64(img, get(img, "l1_table_offset") + 8 * index)


def l2_entry_offset(img: Path, index: int = 0, l1_index: int = 0) -> int:
    """File offset of an L2 entry of the first L2 table (standard 8-byte entries)."""
    return (l1_entry(img, l1_index) & OFFSET_MASK) + 8 * index


# --- base images --------------------------------------------------------------------------------


def base(d: Path, name: str = "img.qcow2", **opts: object) -> Path:
    """4 MiB, 64 KiB clusters, v3; the first cluster written (0x11), so an L2 table exists."""
    img = images.create(d / name, "4M", **opts)
    images.write(img, 0, 65536, 0x11)
    return img


def compressed(d: Path, name: str = "img.qcow2") -> Path:
    """Two compressed clusters (qemu-img convert -c) of text-like data."""
    raw = images.raw_file(d / "src.raw", images.compressible_data(131072), 1 << 20)
    return images.convert_compressed(raw, d / name)


# --- header damages -----------------------------------------------------------------------------


@damage("header")
def valid(d: Path) -> Path:
    """The undamaged base image."""
    return base(d)


@damage("header")
def empty_file(d: Path) -> Path:
    """A file of 0 bytes."""
    img = d / "img.qcow2"
    img.write_bytes(b"")
    return img


@damage("header")
def truncated_in_header(d: Path) -> Path:
    """The file cut after 50 bytes (QEMU reads the rest of the header as zeroes)."""
    img = base(d)
    with open(img, "r+b") as f:
        f.truncate(50)
    return img


@damage("header")
def truncated_after_header(d: Path) -> Path:
    """The file cut after the header cluster: tables read as zeroes."""
    img = base(d)
    with open(img, "r+b") as f:
        f.truncate(65536)
    return img


@damage("header")
def bad_magic(d: Path) -> Path:
    """Magic QFI\\xfa."""
    img = base(d)
    put(img, "magic", 0x514649FA)
    return img


@damage("header")
def version_1(d: Path) -> Path:
    """Version 1 (qcow, not qcow2)."""
    img = base(d)
    put(img, "version", 1)
    return img


@damage("header")
def version_4(d: Path) -> Path:
    """Version 4."""
    img = base(d)
    put(img, "version", 4)
    return img


@damage("header")
def cluster_bits_8(d: Path) -> Path:
    """256-byte clusters."""
    img = base(d)
    put(img, "cluster_bits", 8)
    return img


@damage("header")
def cluster_bits_22(d: Path) -> Path:
    """4 MiB clusters."""
    img = base(d)
    put(img, "cluster_bits", 22)
    return img


@damage("header")
def header_length_short(d: Path) -> Path:
    """header_length 100 (< 104)."""
    img = base(d)
    put(img, "header_length", 100)
    return img


@damage("header")
def header_length_104(d: Path) -> Path:
    """header_length 104: no compression type byte (zlib assumed); extensions start at 104."""
    img = base(d)
    exts = extensions(img)
    put(img, "header_length", 104)
    set_extensions(img, exts)
    return img


@damage("header")
def header_length_odd(d: Path) -> Path:
    """header_length 105, extensions moved there: QEMU reads them at an odd offset."""
    img = base(d)
    exts = extensions(img)
    put(img, "header_length", 105)
    set_extensions(img, exts)
    return img


@damage("header")
def header_length_unknown_fields(d: Path) -> Path:
    """header_length 120: 8 unknown header bytes (kept by QEMU) before the extensions."""
    img = base(d)
    exts = extensions(img)
    put(img, "header_length", 120)
    poke(img, 112, b"UNKNOWN!")
    set_extensions(img, exts)
    return img


@damage("header")
def header_length_over_cluster(d: Path) -> Path:
    """header_length larger than the cluster."""
    img = base(d)
    put(img, "header_length", 65536 + 8)
    return img


@damage("header")
def refcount_order_7(d: Path) -> Path:
    """128-bit refcounts."""
    img = base(d)
    put(img, "refcount_order", 7)
    return img


@damage("header")
def backing_offset_past_cluster(d: Path) -> Path:
    """Backing file name offset beyond the header cluster."""
    img = base(d)
    put(img, "backing_file_offset", 65536 + 512)
    put(img, "backing_file_size", 4)
    return img


@damage("header")
def compression_type_2(d: Path) -> Path:
    """Compression type 2 (unknown), with the compression type bit."""
    img = base(d)
    put(img, "compression_type", 2)
    put(img, "incompatible_features", 1 << 3)
    return img


@damage("header")
def zlib_with_compression_bit(d: Path) -> Path:
    """zlib compression type with the compression type bit set."""
    img = base(d)
    put(img, "incompatible_features", 1 << 3)
    return img


@damage("header")
def zstd_without_compression_bit(d: Path) -> Path:
    """zstd compression type without the compression type bit."""
    img = base(d, compression_type="zstd")
    put(img, "incompatible_features", 0)
    return img


@damage("header")
def unknown_incompat_bit(d: Path) -> Path:
    """Incompatible bit 5, not in the feature table."""
    img = base(d)
    put(img, "incompatible_features", 1 << 5)
    return img


@damage("header")
def unknown_incompat_named(d: Path) -> Path:
    """Incompatible bits 9 and 40 and 63; the feature table names 40 and 9 (in that order)."""
    img = base(d)
    exts = [
        (
            EXT_FEATURE_TABLE,
            bytes([0, 40]) + b"future feature".ljust(46, b"\0")
            + bytes([1, 9]) + b"compatible nine".ljust(46, b"\0")
            + bytes([0, 9]) + b"incompatible nine".ljust(46, b"\0"),
        )
    ]  # fmt: skip
    set_extensions(img, exts)
    put(img, "incompatible_features", (1 << 9) | (1 << 40) | (1 << 63))
    return img


@damage("header")
def unknown_incompat_table_after_bad_ext(d: Path) -> Path:
    """Unknown bit 6 named in a feature table that follows a too-long backing format ext."""
    img = base(d)
    exts = [
        (EXT_BACKING_FORMAT, b"x" * 20),
        (EXT_FEATURE_TABLE, bytes([0, 6]) + b"six".ljust(46, b"\0")),
    ]
    set_extensions(img, exts)
    put(img, "incompatible_features", 1 << 6)
    return img


@damage("header")
def corrupt_bit(d: Path) -> Path:
    """The corrupt bit set."""
    img = base(d)
    put(img, "incompatible_features", 1 << 1)
    return img


@damage("header")
def dirty_bit(d: Path) -> Path:
    """The dirty bit set (QEMU repairs the refcounts on a read-write open)."""
    img = base(d)
    put(img, "incompatible_features", 1 << 0)
    return img


@damage("header")
def dirty_bit_lazy_refcounts(d: Path) -> Path:
    """lazy_refcounts=on with the dirty bit set and a refcount dropped to 0, as after a crash."""
    img = base(d, lazy_refcounts=True)
    put(img, "incompatible_features", 1 << 0)
    data_cluster = peek_u64(img, l2_entry_offset(img)) & OFFSET_MASK
    refblock = peek_u64(img, get(img, "refcount_table_offset")) & OFFSET_MASK
    poke(img, refblock + 2 * (data_cluster >> 16), b"\0\0")
    return img


@damage("header")
def dirty_bit_v2(d: Path) -> Path:
    """A v2 image with byte 79 set: v2 has no feature bits, so QEMU does not look."""
    img = base(d, compat="0.10")
    put(img, "incompatible_features", 1 << 0)
    return img


@damage("header")
def extended_l2_4k_clusters(d: Path) -> Path:
    """The extended L2 bit on an image with 4 KiB clusters (128-byte subclusters)."""
    img = base(d, cluster_size=4096)
    put(img, "incompatible_features", 1 << 4)
    return img


@damage("header")
def refcount_table_clusters_0(d: Path) -> Path:
    """No refcount table."""
    img = base(d)
    put(img, "refcount_table_clusters", 0)
    return img


@damage("header")
def refcount_table_too_large(d: Path) -> Path:
    """A refcount table of 129 clusters (over QEMU's 8 MiB)."""
    img = base(d)
    put(img, "refcount_table_clusters", 129)
    return img


@damage("header")
def refcount_table_unaligned(d: Path) -> Path:
    """Refcount table offset not cluster-aligned."""
    img = base(d)
    put(img, "refcount_table_offset", get(img, "refcount_table_offset") + 512)
    return img


@damage("header")
def refcount_table_at_header(d: Path) -> Path:
    """Refcount table at offset 0: the header read as refcount table (QEMU opens it)."""
    img = base(d)
    put(img, "refcount_table_offset", 0)
    return img


@damage("header")
def refcount_table_overflow(d: Path) -> Path:
    """Refcount table offset so high that offset + size passes INT64_MAX."""
    img = base(d)
    put(img, "refcount_table_offset", (1 << 63) - 65536)
    return img


@damage("header")
def snapshot_table_unaligned(d: Path) -> Path:
    """Snapshot table offset not aligned (no snapshots)."""
    img = base(d)
    put(img, "snapshots_offset", 0x10200)
    return img


@damage("header")
def snapshot_count_huge(d: Path) -> Path:
    """70000 snapshots (over QEMU's 65536)."""
    img = base(d)
    put(img, "nb_snapshots", 70000)
    put(img, "snapshots_offset", 0x100000)
    return img


@damage("header")
def l1_unaligned(d: Path) -> Path:
    """L1 table offset not cluster-aligned."""
    img = base(d)
    put(img, "l1_table_offset", get(img, "l1_table_offset") + 8)
    return img


@damage("header")
def l1_at_zero(d: Path) -> Path:
    """L1 table at offset 0: the header read as L1 table (QEMU opens it)."""
    img = base(d)
    put(img, "l1_table_offset", 0)
    return img


@damage("header")
def l1_past_eof(d: Path) -> Path:
    """L1 table beyond the end of the file (QEMU reads zeroes: everything unallocated)."""
    img = base(d)
    put(img, "l1_table_offset", 1 << 40)
    return img


@damage("header")
def l1_size_huge(d: Path) -> Path:
    """l1_size of 5 million entries (over QEMU's 32 MiB)."""
    img = base(d)
    put(img, "l1_size", 5_000_000)
    return img


@damage("header")
def l1_too_small(d: Path) -> Path:
    """l1_size 0 for a 4 MiB disk."""
    img = base(d)
    put(img, "l1_size", 0)
    return img


@damage("header")
def size_huge(d: Path) -> Path:
    """Virtual size 2^62: more L1 entries than an int."""
    img = base(d)
    put(img, "size", 1 << 62)
    return img


@damage("header")
def size_unaligned(d: Path) -> Path:
    """Virtual size 4 MiB + 100 bytes (QEMU rounds down to sectors)."""
    img = base(d)
    put(img, "size", (4 << 20) + 100)
    return img


@damage("header")
def crypt_method_aes(d: Path) -> Path:
    """crypt_method 1 (AES) set on a plain image."""
    img = base(d)
    put(img, "crypt_method", 1)
    return img


@damage("header")
def crypt_method_luks_no_ext(d: Path) -> Path:
    """crypt_method 2 (LUKS) without the encryption header extension."""
    img = base(d)
    put(img, "crypt_method", 2)
    return img


@damage("header")
def crypt_method_3(d: Path) -> Path:
    """crypt_method 3 (unknown)."""
    img = base(d)
    put(img, "crypt_method", 3)
    return img


@damage("header")
def luks_without_key(d: Path) -> Path:
    """LUKS crypt method with a well-formed encryption header extension (no key given)."""
    img = base(d)
    put(img, "crypt_method", 2)
    set_extensions(img, [(EXT_CRYPTO_HEADER, struct.pack(">QQ", 0x100000, 4096))])
    return img


@damage("header")
def crypto_ext_unencrypted(d: Path) -> Path:
    """An encryption header extension in an unencrypted image."""
    img = base(d)
    set_extensions(img, [(EXT_CRYPTO_HEADER, struct.pack(">QQ", 0x100000, 4096))])
    return img


@damage("header")
def crypto_ext_bad_size(d: Path) -> Path:
    """LUKS crypt method with a 12-byte encryption header extension."""
    img = base(d)
    put(img, "crypt_method", 2)
    set_extensions(img, [(EXT_CRYPTO_HEADER, bytes(12))])
    return img


@damage("header")
def crypto_ext_unaligned(d: Path) -> Path:
    """LUKS crypt method with the encryption header at an unaligned offset."""
    img = base(d)
    put(img, "crypt_method", 2)
    set_extensions(img, [(EXT_CRYPTO_HEADER, struct.pack(">QQ", 0x100200, 4096))])
    return img


@damage("header")
def extension_too_large(d: Path) -> Path:
    """An extension whose length runs past the header cluster."""
    img = base(d)
    set_extensions(img, [], raw=struct.pack(">II", 0x12345678, 70000))
    return img


@damage("header")
def extension_at_cluster_end(d: Path) -> Path:
    """The last 8 bytes of the cluster hold an extension header with 1 byte of data."""
    img = base(d)
    set_extensions(img, [(0x12345678, bytes(65536 - 112 - 16))], raw=struct.pack(">II", 7, 1))
    return img


@damage("header")
def backing_format_too_long(d: Path) -> Path:
    """A backing format name of 16 bytes."""
    img = base(d)
    set_extensions(img, [(EXT_BACKING_FORMAT, b"q" * 16)])
    return img


@damage("header")
def unknown_extensions(d: Path) -> Path:
    """Two unknown extensions (QEMU keeps them, in reverse order, when it rewrites)."""
    img = base(d)
    set_extensions(img, [*extensions(img), (0x11111111, b"first"), (0x22222222, b"second!!x")])
    return img


@damage("header")
def unknown_autoclear_bit(d: Path) -> Path:
    """Autoclear bit 7 set (a read-write open clears it)."""
    img = base(d)
    put(img, "autoclear_features", 1 << 7)
    return img


@damage("header")
def bitmaps_ext_bad_length(d: Path) -> Path:
    """A bitmaps extension of 16 bytes."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, bytes(16))])
    put(img, "autoclear_features", 1)
    return img


@damage("header")
def bitmaps_ext_without_autoclear(d: Path) -> Path:
    """A bitmaps extension without the bitmaps autoclear bit (left by an old program)."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, struct.pack(">IIQQ", 1, 0, 64, 0x200000))])
    return img


@damage("header")
def bitmaps_ext_zero_bitmaps(d: Path) -> Path:
    """A bitmaps extension (autoclear bit set) counting zero bitmaps."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, struct.pack(">IIQQ", 0, 0, 64, 0x200000))])
    put(img, "autoclear_features", 1)
    return img


@damage("header")
def bitmaps_ext_reserved(d: Path) -> Path:
    """A bitmaps extension with its reserved field set."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, struct.pack(">IIQQ", 1, 7, 64, 0x200000))])
    put(img, "autoclear_features", 1)
    return img


@damage("header")
def bitmaps_ext_too_many(d: Path) -> Path:
    """A bitmaps extension counting 65536 bitmaps."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, struct.pack(">IIQQ", 65536, 0, 64, 0x200000))])
    put(img, "autoclear_features", 1)
    return img


@damage("header")
def bitmaps_ext_dir_unaligned(d: Path) -> Path:
    """A bitmaps extension with an unaligned bitmap directory."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, struct.pack(">IIQQ", 1, 0, 64, 0x200008))])
    put(img, "autoclear_features", 1)
    return img


@damage("header")
def bitmaps_ext_dir_too_big(d: Path) -> Path:
    """A bitmaps extension with a bitmap directory over QEMU's 64 MiB."""
    img = base(d)
    set_extensions(img, [(EXT_BITMAPS, struct.pack(">IIQQ", 1, 0, 1 << 27, 0x200000))])
    put(img, "autoclear_features", 1)
    return img


@damage("header")
def data_file_bit_without_name(d: Path) -> Path:
    """The external data file bit set, no data file name."""
    img = base(d)
    put(img, "incompatible_features", 1 << 2)
    return img


@damage("header")
def data_file_raw_without_data_file(d: Path) -> Path:
    """The raw external data autoclear bit without an external data file."""
    img = base(d)
    put(img, "autoclear_features", 1 << 1)
    return img


@damage("header")
def data_file_name_without_bit(d: Path) -> Path:
    """A data file name extension without the external data file bit (QEMU ignores it)."""
    img = base(d)
    set_extensions(img, [(EXT_DATA_FILE, b"data.raw"), *extensions(img)])
    return img


@damage("header")
def backing_name_too_long(d: Path) -> Path:
    """A backing file name length of 2000."""
    img = base(d)
    put(img, "backing_file_offset", 0x1000)
    put(img, "backing_file_size", 2000)
    return img


@damage("header")
def backing_name_past_cluster(d: Path) -> Path:
    """A 600-byte backing file name starting 512 bytes before the end of the cluster."""
    img = base(d)
    put(img, "backing_file_offset", 65536 - 512)
    put(img, "backing_file_size", 600)
    return img


@damage("header")
def backing_name_1023_in_4k_cluster(d: Path) -> Path:
    """A 1023-byte backing file name (QEMU's maximum) of zero bytes at 0xc00 in a 4 KiB cluster."""
    img = base(d, cluster_size=4096)
    put(img, "backing_file_offset", 0xC00)
    put(img, "backing_file_size", 1023)
    return img


# --- header rewrites: an unknown autoclear bit makes QEMU rewrite the header on open ------------


def with_rewrite(img: Path) -> Path:
    """Set autoclear bit 7: a read-write open clears it by rewriting the whole header cluster."""
    put(img, "autoclear_features", get(img, "autoclear_features") | 1 << 7)
    return img


@damage("header")
def rewrite_plain(d: Path) -> Path:
    """The base image, rewritten."""
    return with_rewrite(base(d))


@damage("header")
def rewrite_unknown_extensions(d: Path) -> Path:
    """Two unknown extensions, rewritten (QEMU writes them back in reverse order)."""
    return with_rewrite(unknown_extensions(d))


@damage("header")
def rewrite_unknown_header_fields(d: Path) -> Path:
    """header_length 120 with unknown fields, rewritten."""
    return with_rewrite(header_length_unknown_fields(d))


@damage("header")
def rewrite_header_length_104(d: Path) -> Path:
    """header_length 104, rewritten (QEMU writes its 112-byte header)."""
    return with_rewrite(header_length_104(d))


@damage("header")
def rewrite_size_unaligned(d: Path) -> Path:
    """Virtual size not a multiple of 512, rewritten."""
    return with_rewrite(size_unaligned(d))


@damage("header")
def rewrite_backing(d: Path) -> Path:
    """An overlay with backing file and format, rewritten."""
    base(d, "base.qcow2")
    img = images.create(d / "img.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    return with_rewrite(img)


DATA_FILE_OPTION = {"data-file": {"driver": "file", "filename": "$DIR/img.raw"}}


@damage("header", options=DATA_FILE_OPTION)
def rewrite_data_file(d: Path) -> Path:
    """An image with an external raw data file (given as option), rewritten."""
    img = images.create(d / "img.qcow2", data_file="img.raw", data_file_raw=True)
    return with_rewrite(img)


@damage("header")
def rewrite_extended_l2_zstd(d: Path) -> Path:
    """Extended L2 entries and zstd compression, rewritten."""
    return with_rewrite(base(d, extended_l2=True, compression_type="zstd"))


@damage("header")
def rewrite_4k_clusters(d: Path) -> Path:
    """4 KiB clusters (QEMU writes no feature table), rewritten."""
    return with_rewrite(base(d, cluster_size=4096))


@damage("header")
def rewrite_v2_stale_bitmaps(d: Path) -> Path:
    """A v2 image with a backing file and a bitmaps extension: QEMU drops the extension."""
    base(d, "base.qcow2")
    img = images.create(d / "img.qcow2", backing="base.qcow2", backing_fmt="qcow2", compat="0.10")
    exts = extensions(img)
    name = img.read_bytes()[get(img, "backing_file_offset") :][: get(img, "backing_file_size")]
    set_extensions(img, [*exts, (EXT_BITMAPS, struct.pack(">IIQQ", 1, 0, 64, 0x200000))])
    start = 72 + sum(8 + ((len(data) + 7) & ~7) for _, data in exts) + 8 + 24 + 8
    poke(img, start, name)
    put(img, "backing_file_offset", start)
    return img


# --- snapshot table damages ---------------------------------------------------------------------


def with_snapshots(d: Path) -> Path:
    """The base image with two internal snapshots."""
    img = base(d)
    images.snapshot(img, "one")
    images.write(img, 0, 4096, 0x22)
    images.snapshot(img, "second")
    return img


def snapshot_entry_offsets(img: Path) -> list[int]:
    """File offsets of the snapshot table entries."""
    offset = get(img, "snapshots_offset")
    found = []
    for _ in range(get(img, "nb_snapshots")):
        offset = (offset + 7) & ~7
        found.append(offset)
        with open(img, "rb") as f:
            f.seek(offset + 12)
            id_size, name_size = struct.unpack(">HH", f.read(4))
            f.seek(offset + 36)
            (extra,) = struct.unpack(">I", f.read(4))
        offset += 40 + extra + id_size + name_size
    return found


@damage("snapshot")
def snapshots_valid(d: Path) -> Path:
    """Two snapshots, as qemu-img made them."""
    return with_snapshots(d)


@damage("snapshot")
def snapshot_extra_too_large(d: Path) -> Path:
    """The second snapshot's extra data size is 1025 (over QEMU's 1024)."""
    img = with_snapshots(d)
    poke(img, snapshot_entry_offsets(img)[1] + 36, struct.pack(">I", 1025))
    return img


@damage("snapshot")
def snapshot_extra_unknown(d: Path) -> Path:
    """A single snapshot whose entry carries 16 bytes of extra data QEMU does not know."""
    img = base(d)
    images.snapshot(img, "one")
    entry = snapshot_entry_offsets(img)[0]
    raw = img.read_bytes()[entry:]
    id_size, name_size = struct.unpack_from(">HH", raw, 12)
    tail = raw[64 : 64 + id_size + name_size]
    poke(img, entry + 36, struct.pack(">I", 40))
    poke(img, entry + 64, b"UNKNOWN EXTRA 16" + tail)
    return img


@damage("snapshot")
def snapshot_table_past_eof(d: Path) -> Path:
    """One snapshot, table beyond the end of the file (QEMU reads a zeroed entry)."""
    img = base(d)
    put(img, "nb_snapshots", 1)
    put(img, "snapshots_offset", 1 << 30)
    return img


@damage("snapshot")
def snapshot_count_beyond_table(d: Path) -> Path:
    """nb_snapshots 3 for a table of two: the third entry is what follows the table."""
    img = with_snapshots(d)
    put(img, "nb_snapshots", 3)
    return img


@damage("snapshot")
def snapshot_table_too_big(d: Path) -> Path:
    """520 entries with 1024 bytes of extra data and 64 KiB ids and names: over 64 MiB."""
    img = base(d)
    entry = struct.pack(">QIHHIIQII", 0, 0, 65535, 65535, 0, 0, 0, 0, 1024)
    stride = (40 + 1024 + 2 * 65535 + 7) & ~7
    table = 1 << 20
    for i in range(520):
        poke(img, table + i * stride, entry)
    put(img, "nb_snapshots", 520)
    put(img, "snapshots_offset", table)
    return img


@damage("snapshot")
def snapshot_l1_unaligned(d: Path) -> Path:
    """A snapshot whose L1 table offset is unaligned (QEMU checks it only when used)."""
    img = with_snapshots(d)
    entry = snapshot_entry_offsets(img)[0]
    poke_u64(img, entry, peek_u64(img, entry) + 8)
    return img


# --- run-time damages: the image opens; reading or writing a cluster meets the damage ---------

READ = "read 0 64k"
WRITE = "write -P 0x55 0 64k"
ALLOCATE = "write -P 0x55 1M 64k"  # a cluster not allocated yet


def data_cluster(img: Path) -> int:
    """Host offset of the base image's first data cluster."""
    return peek_u64(img, l2_entry_offset(img)) & OFFSET_MASK


@damage("runtime", READ, WRITE)
def l1_entry_unaligned(d: Path) -> Path:
    """L1[0] points 512 bytes into its L2 table's cluster."""
    img = base(d)
    poke_u64(img, get(img, "l1_table_offset"), l1_entry(img) + 512)
    return img


@damage("runtime", READ, WRITE)
def l1_entry_past_eof(d: Path) -> Path:
    """L1[0] points beyond the end of the file (the L2 table reads as zeroes)."""
    img = base(d)
    poke_u64(img, get(img, "l1_table_offset"), COPIED | 1 << 40)
    return img


@damage("runtime", READ, WRITE)
def l2_table_at_l1(d: Path) -> Path:
    """L1[0] points at the L1 table itself: L1 and L2 tables overlap."""
    img = base(d)
    l1 = get(img, "l1_table_offset")
    poke_u64(img, l1, COPIED | l1)
    return img


@damage("runtime", READ, WRITE)
def l2_entry_unaligned(d: Path) -> Path:
    """L2[0] points 512 bytes into a cluster."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED | (data_cluster(img) + 512))
    return img


@damage("runtime", READ, WRITE)
def l2_entry_past_eof(d: Path) -> Path:
    """L2[0] points beyond the end of the file."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED | 1 << 40)
    return img


@damage("runtime", READ, WRITE)
def l2_entry_at_refcount_table(d: Path) -> Path:
    """L2[0] points at the refcount table: guest data over metadata."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED | get(img, "refcount_table_offset"))
    return img


@damage("runtime", READ, WRITE)
def l2_entry_at_header(d: Path) -> Path:
    """L2[0] is offset 0 with the copied flag: without a data file that reads as unallocated."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED)
    return img


@damage("runtime", READ, WRITE)
def l2_entry_at_own_table(d: Path) -> Path:
    """L2[0] points at its own L2 table."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED | (l1_entry(img) & OFFSET_MASK))
    return img


@damage("runtime", READ, WRITE)
def l2_entry_reserved_bits(d: Path) -> Path:
    """L2[0] with reserved bits 56 and 1 set (QEMU looks at them only in qemu-img check)."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED | 1 << 56 | 2 | data_cluster(img))
    return img


@damage("runtime", READ, WRITE)
def zero_cluster_unaligned(d: Path) -> Path:
    """L2[0] a preallocated zero cluster 512 bytes into a cluster."""
    img = base(d)
    poke_u64(img, l2_entry_offset(img), COPIED | 1 | (data_cluster(img) + 512))
    return img


@damage("runtime", READ, WRITE)
def zero_cluster_in_v2(d: Path) -> Path:
    """A v2 image with the zero flag in L2[0] (v2 has no zero clusters)."""
    img = base(d, compat="0.10")
    poke_u64(img, l2_entry_offset(img), COPIED | 1 | data_cluster(img))
    return img


def extended(d: Path) -> Path:
    img = images.create(d / "img.qcow2", "4M", extended_l2=True)
    images.write(img, 0, 65536, 0x11)
    return img


@damage("runtime", READ, WRITE)
def extended_l2_alloc_and_zero(d: Path) -> Path:
    """An extended L2 bitmap marking subcluster 3 both allocated and zero."""
    img = extended(d)
    poke_u64(img, l2_entry_offset(img) + 8, 0xFFFF_FFFF | 1 << 35)
    return img


@damage("runtime", READ, WRITE)
def extended_l2_alloc_without_cluster(d: Path) -> Path:
    """An extended L2 entry without a cluster whose bitmap marks subclusters allocated."""
    img = extended(d)
    poke_u64(img, l2_entry_offset(img), 0)
    return img


def compressed_entry_offset(img: Path, index: int = 0) -> int:
    return l2_entry_offset(img, index)


@damage("runtime", READ, WRITE)
def compressed_garbage(d: Path) -> Path:
    """The first compressed cluster's bytes overwritten with non-deflate bytes."""
    img = compressed(d)
    entry = peek_u64(img, compressed_entry_offset(img))
    poke(img, entry & ((1 << 54) - 1), bytes(range(7, 256)) * 8)
    return img


@damage("runtime", READ)
def compressed_past_eof(d: Path) -> Path:
    """A compressed descriptor pointing beyond the end of the file."""
    img = compressed(d)
    poke_u64(img, compressed_entry_offset(img), COMPRESSED | 3 << 54 | 1 << 40)
    return img


@damage("runtime", READ)
def compressed_truncated(d: Path) -> Path:
    """A compressed descriptor counting 2 sectors fewer than the stream needs."""
    img = compressed(d)
    entry = peek_u64(img, compressed_entry_offset(img))
    sectors = (entry >> 54) & 0xFF
    poke_u64(img, compressed_entry_offset(img), entry & ~(0xFF << 54) | (sectors - 2) << 54)
    return img


@damage("runtime", READ)
def compressed_zstd_garbage(d: Path) -> Path:
    """A zstd image whose first compressed cluster starts with a bad frame magic."""
    raw = images.raw_file(d / "src.raw", images.compressible_data(131072), 1 << 20)
    img = images.convert_compressed(raw, d / "img.qcow2", compression_type="zstd")
    entry = peek_u64(img, compressed_entry_offset(img))
    poke(img, entry & ((1 << 54) - 1), b"\x00\x11\x22\x33")
    return img


def with_data_file(d: Path) -> Path:
    img = images.create(d / "img.qcow2", "4M", data_file=str(d / "img.raw"))
    images.write(img, 0, 65536, 0x11)
    images.write(img, 65536, 65536, 0x22)
    return img


@damage("runtime", READ)
def compressed_in_data_file_image(d: Path) -> Path:
    """A compressed descriptor in an image with an external data file."""
    img = with_data_file(d)
    poke_u64(img, l2_entry_offset(img), COMPRESSED | 0x50000)
    return img


@damage("runtime", READ, WRITE)
def data_file_offset_mismatch(d: Path) -> Path:
    """L2[0] of an external data file image pointing at the data of guest cluster 1."""
    img = with_data_file(d)
    poke_u64(img, l2_entry_offset(img), COPIED | 0x10000)
    return img


def first_refblock(img: Path) -> int:
    return peek_u64(img, get(img, "refcount_table_offset")) & OFFSET_MASK


@damage("runtime", READ, ALLOCATE)
def reftable_entry_unaligned(d: Path) -> Path:
    """The refcount table's first entry points 512 bytes into its refcount block."""
    img = base(d)
    poke_u64(img, get(img, "refcount_table_offset"), first_refblock(img) + 512)
    return img


@damage("runtime", READ, ALLOCATE)
def refblock_past_eof(d: Path) -> Path:
    """The first refcount block beyond the end of the file (all refcounts read as 0)."""
    img = base(d)
    poke_u64(img, get(img, "refcount_table_offset"), 1 << 40)
    return img


@damage("runtime", READ, ALLOCATE)
def refcount_of_data_cluster_zero(d: Path) -> Path:
    """The refcount of the first data cluster dropped to 0 (its L2 entry keeps the copied flag)."""
    img = base(d)
    poke(img, first_refblock(img) + 2 * (data_cluster(img) >> 16), b"\0\0")
    return img


@damage("runtime", READ, WRITE, ALLOCATE)
def refcount_table_at_header_io(d: Path) -> Path:
    """Refcount table at offset 0 (the header read as refcount table), then I/O."""
    return refcount_table_at_header(d)


@damage("runtime", READ, WRITE, ALLOCATE)
def l1_at_zero_io(d: Path) -> Path:
    """L1 table at offset 0 (the header read as L1 table), then I/O."""
    return l1_at_zero(d)


# --- open damages decided outside the header: backing chains, data files ---------------------


@damage("open")
def backing_missing(d: Path) -> Path:
    """The backing file does not exist (any more)."""
    base(d, "gone.qcow2")
    img = images.create(d / "img.qcow2", backing="gone.qcow2", backing_fmt="qcow2")
    (d / "gone.qcow2").unlink()
    return img


def set_backing(img: Path, name: bytes) -> None:
    """Point the image at another backing file name (stored at offset 0x1000 of the header)."""
    poke(img, 0x1000, name)
    put(img, "backing_file_offset", 0x1000)
    put(img, "backing_file_size", len(name))


@damage("open")
def backing_loop(d: Path) -> Path:
    """img.qcow2 backed by other.qcow2, backed by img.qcow2."""
    base(d, "other.qcow2")
    img = images.create(d / "img.qcow2", backing="other.qcow2", backing_fmt="qcow2")
    set_backing(d / "other.qcow2", b"img.qcow2")
    return img


@damage("open")
def backing_self(d: Path) -> Path:
    """An image backed by itself."""
    img = base(d)
    set_backing(img, b"img.qcow2")
    return img


@damage("open")
def backing_self_by_symlink(d: Path) -> Path:
    """An image backed by a symbolic link to itself."""
    img = base(d)
    (d / "sym.qcow2").symlink_to("img.qcow2")
    set_backing(img, b"sym.qcow2")
    return img


@damage("open")
def backing_self_by_hardlink(d: Path) -> Path:
    """An image backed by a second name (a hard link) of its own file."""
    img = base(d)
    (d / "link.qcow2").hardlink_to(img)
    set_backing(img, b"link.qcow2")
    return img


@damage("open")
def backing_self_as_raw(d: Path) -> Path:
    """An image backed by itself read as raw: no loop (a raw node has no backing file)."""
    img = base(d)
    set_extensions(img, [(EXT_BACKING_FORMAT, b"raw"), *extensions(img)])
    set_backing(img, b"img.qcow2")
    return img


@damage("open")
def backing_format_unknown(d: Path) -> Path:
    """A backing format extension naming no driver."""
    base(d, "base.qcow2")
    img = images.create(d / "img.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    exts = [(t, b"nosuchfmt" if t == EXT_BACKING_FORMAT else data) for t, data in extensions(img)]
    name = b"base.qcow2"
    set_extensions(img, exts)
    set_backing(img, name)
    return img


@damage("open")
def backing_format_mismatch(d: Path) -> Path:
    """A qcow2 backing file whose format is given as raw (QEMU opens it raw, as told)."""
    base(d, "base.qcow2")
    return images.create(d / "img.qcow2", backing="base.qcow2", backing_fmt="raw")


@damage("open")
def data_file_missing(d: Path) -> Path:
    """The external data file named in the header does not exist."""
    img = with_data_file(d)
    (d / "img.raw").unlink()
    return img


# --- bitmap directories: QEMU loads every persistent bitmap on open ----------------------------

BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # table offset, size, flags, type, granularity bits,
# name size, extra data size; the name follows


def with_bitmaps(d: Path) -> Path:
    """Two bitmaps: bm0 (recording, 64 KiB granularity) that saw a write, bm1 (disabled,
    1 MiB): bm0's table points at a data cluster."""
    img = base(d)
    images.add_bitmap(img, "bm0")
    images.add_bitmap(img, "bm1", granularity=1 << 20, disabled=True)
    images.write(img, 65536, 65536, 0x22)
    return img


def bitmaps_ext_fields(img: Path) -> tuple[int, int, int]:
    """(number of bitmaps, directory size, directory offset) of the bitmaps extension."""
    data = dict(extensions(img))[EXT_BITMAPS]
    nb, _, size, offset = struct.unpack(">IIQQ", data)
    return nb, size, offset


def set_bitmaps_ext(img: Path, nb: int, size: int, offset: int) -> None:
    exts = [
        (t, struct.pack(">IIQQ", nb, 0, size, offset) if t == EXT_BITMAPS else data)
        for t, data in extensions(img)
    ]
    set_extensions(img, exts)


def bitmap_entries(img: Path) -> list[int]:
    """The file offsets of the bitmap directory's entries."""
    nb, size, offset = bitmaps_ext_fields(img)
    raw = img.read_bytes()[offset : offset + size]
    starts, pos = [], 0
    while pos < size:
        starts.append(offset + pos)
        fields = BITMAP_ENTRY.unpack_from(raw, pos)
        pos += (BITMAP_ENTRY.size + fields[5] + fields[6] + 7) & ~7
    return starts


def edit_bitmap_entry(img: Path, index: int, **changes: int) -> None:
    """Change fields of a directory entry (table_offset, table_size, flags, type,
    granularity_bits, name_size, extra_size)."""
    names = ["table_offset", "table_size", "flags", "type", "granularity_bits", "name_size",
             "extra_size"]  # fmt: skip
    at = bitmap_entries(img)[index]
    with open(img, "rb") as f:
        f.seek(at)
        fields = dict(zip(names, BITMAP_ENTRY.unpack(f.read(BITMAP_ENTRY.size)), strict=True))
    fields.update(changes)
    poke(img, at, BITMAP_ENTRY.pack(*(fields[n] for n in names)))


@damage("open")
def bitmaps_two(d: Path) -> Path:
    """Two valid bitmaps (no damage): QEMU opens the image and loads them."""
    return with_bitmaps(d)


@damage("open")
def bitmap_in_use(d: Path) -> Path:
    """bm0 marked in use (not saved cleanly) over a table entry with reserved bits: QEMU
    does not read the table of an inconsistent bitmap."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, flags=3)
    table = peek_u64(img, bitmap_entries(img)[0])
    poke_u64(img, table, peek_u64(img, table) | 2)
    return img


@damage("open")
def bitmap_dir_size_zero(d: Path) -> Path:
    """A bitmaps extension with a directory of 0 bytes."""
    img = with_bitmaps(d)
    nb, _, offset = bitmaps_ext_fields(img)
    set_bitmaps_ext(img, nb, 0, offset)
    return img


@damage("open")
def bitmap_dir_entry_cut(d: Path) -> Path:
    """A directory of 16 bytes: shorter than one entry."""
    img = with_bitmaps(d)
    nb, _, offset = bitmaps_ext_fields(img)
    set_bitmaps_ext(img, nb, 16, offset)
    return img


@damage("open")
def bitmap_name_past_directory(d: Path) -> Path:
    """The first entry's name size reaches past the directory."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, name_size=60000)
    return img


@damage("open")
def bitmap_more_than_counted(d: Path) -> Path:
    """Two entries, the extension counts one."""
    img = with_bitmaps(d)
    _, size, offset = bitmaps_ext_fields(img)
    set_bitmaps_ext(img, 1, size, offset)
    return img


@damage("open")
def bitmap_fewer_than_counted(d: Path) -> Path:
    """Two entries, the extension counts three."""
    img = with_bitmaps(d)
    _, size, offset = bitmaps_ext_fields(img)
    set_bitmaps_ext(img, 3, size, offset)
    return img


@damage("open")
def bitmap_extra_data(d: Path) -> Path:
    """The first entry claims 8 bytes of extra data (its name moves into them)."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, extra_size=8)
    return img


@damage("open")
def bitmap_reserved_flag(d: Path) -> Path:
    """bm1 with a reserved flag bit."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 1, flags=1 << 4)
    return img


@damage("open")
def bitmap_granularity_too_big(d: Path) -> Path:
    """bm0's granularity 2^32."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, granularity_bits=32)
    return img


@damage("open")
def bitmap_granularity_too_small(d: Path) -> Path:
    """bm1's granularity 256 bytes."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 1, granularity_bits=8)
    return img


@damage("open")
def bitmap_type_unknown(d: Path) -> Path:
    """bm0 of type 2 (only 1, dirty tracking, exists)."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, type=2)
    return img


@damage("open")
def bitmap_table_unaligned(d: Path) -> Path:
    """bm1's table offset not on a cluster boundary."""
    img = with_bitmaps(d)
    table = peek_u64(img, bitmap_entries(img)[1])
    edit_bitmap_entry(img, 1, table_offset=table + 512)
    return img


@damage("open")
def bitmap_table_size_zero(d: Path) -> Path:
    """bm0 with a table of no entries."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, table_size=0)
    return img


@damage("open")
def bitmap_table_too_large(d: Path) -> Path:
    """bm1's table counting 2^27 + 1 entries (QEMU's maximum is 2^27)."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 1, table_size=(1 << 27) + 1)
    return img


@damage("open")
def bitmap_table_covers_too_little(d: Path) -> Path:
    """bm0 at 512-byte granularity: its one-cluster table covers 256 MiB, the image is larger
    (the virtual size grown in the header; the L1 table still suffices)."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, granularity_bits=9)
    put(img, "size", 512 << 20)
    return img


@damage("open")
def bitmap_table_longer_than_needed(d: Path) -> Path:
    """bm0's table counting 2 entries where the image needs 1."""
    img = with_bitmaps(d)
    edit_bitmap_entry(img, 0, table_size=2)
    return img


@damage("open")
def bitmap_table_entry_reserved(d: Path) -> Path:
    """bm0's table entry with a reserved bit set."""
    img = with_bitmaps(d)
    table = peek_u64(img, bitmap_entries(img)[0])
    poke_u64(img, table, peek_u64(img, table) | 2)
    return img


@damage("open")
def bitmap_table_entry_unaligned(d: Path) -> Path:
    """bm0's table entry pointing into the middle of a cluster."""
    img = with_bitmaps(d)
    table = peek_u64(img, bitmap_entries(img)[0])
    poke_u64(img, table, peek_u64(img, table) + 512)
    return img


@damage("open")
def bitmap_table_entry_all_ones_with_offset(d: Path) -> Path:
    """bm0's table entry with both a cluster and the all-ones flag."""
    img = with_bitmaps(d)
    table = peek_u64(img, bitmap_entries(img)[0])
    poke_u64(img, table, peek_u64(img, table) | 1)
    return img


@damage("open")
def bitmap_same_name_twice(d: Path) -> Path:
    """Two bitmaps named bm0."""
    img = with_bitmaps(d)
    poke(img, bitmap_entries(img)[1] + BITMAP_ENTRY.size, b"bm0")
    return img
