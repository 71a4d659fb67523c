"""The qcow2 header cluster: parsed with QEMU 11.1's open-time checks, written as QEMU writes it.

``parse_header`` takes the image's first cluster (fewer bytes when the file is shorter: QEMU reads
past the end of a file as zeroes) and runs every check QEMU's qcow2 open makes on what is in that
cluster, in QEMU's order and with QEMU's error texts, so a damaged image is refused with the same
message by both daemons. Checks that need more of the file (the snapshot table, refcounts) live
with those structures (``snapshots.py``) or in the driver.

``serialize_header`` produces the cluster QEMU writes when it rewrites the header (marking the
image corrupt, clearing autoclear bits, changing the backing file): the fixed fields, the unknown
header fields kept as they were, the extensions in QEMU's order, then the backing file name.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

MAGIC = 0x514649FB  # "QFI\xfb"
V2_HEADER_SIZE = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_SIZE = 112  # what QEMU reads and writes: the compression type byte and 7 padding bytes
COMPRESSION_TYPE_OFFSET = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

FEATURE_INCOMPATIBLE = 0
FEATURE_COMPATIBLE = 1
FEATURE_AUTOCLEAR = 2
FEATURE_ENTRY_SIZE = 48  # type (1), bit (1), name (46, NUL-padded)
FEATURE_NAME_SIZE = 46

# The feature name table QEMU writes into every v3 image with clusters larger than 4 KiB.
QEMU_FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (FEATURE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)

# QEMU's limits on what it opens.
MAX_BACKING_FILE_NAME = 1023
BACKING_FORMAT_BUFFER = 16  # QEMU keeps the format name in char[16]
MAX_REFTABLE_SIZE = 8 << 20
MAX_L1_SIZE = 32 << 20
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
CRYPTO_HEADER_EXT_SIZE = 16
BITMAPS_EXT_SIZE = 24
EXTL2_SUBCLUSTERS = 32
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

# The key-secret text: QEMU refuses an encrypted image opened without a key with it (qsd-py
# opens LUKS images, not the old AES ones).
NO_KEY_TEXT = "Parameter 'encrypt.key-secret' is required for cipher"

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQIIB7x")
_EXT = struct.Struct(">II")
_BITMAPS = struct.Struct(">IIQQ")
_CRYPTO = struct.Struct(">QQ")


class Qcow2Error(Exception):
    """A qcow2 image QEMU would refuse; ``str()`` is QEMU's error text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Qcow2Header:
    """Every field of the header and its extensions, as numbers and strings."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_SIZE
    compression_type: int = COMPRESSION_ZLIB
    # Header bytes past QEMU's 112-byte struct (header_length > 112), kept on rewrite.
    unknown_header_fields: bytes = b""
    # None: no name in the image. Names are C strings (cut at a NUL) decoded like file names.
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    # (type, bit, name) of the image's feature name table, in table order.
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    # The 24 bytes of a bitmaps extension QEMU accepted (None: none, or ignored).
    bitmaps_ext: bytes | None = None
    # (offset, length) of the LUKS header, from the full disk encryption extension.
    crypto_header: tuple[int, int] | None = None
    # Extensions QEMU does not know, as (type, data) in file order.
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    # What QEMU prints as warnings on open (each after "<program>: warning: ", its advice
    # on a second line included), and whether it rewrites the header on a read-write open
    # (unknown autoclear bits, a bitmaps extension left by a program without bitmap
    # support); parse_header already applied the change in memory.
    warnings: list[str] = field(default_factory=list)
    needs_rewrite: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def backing_name(self) -> str | None:
        """The backing file the image names. An empty name (offset set, or a name of NUL
        bytes) names none: QEMU opens no backing file for it and shows no backing names, yet
        keeps the name as it is when it rewrites the header."""
        return self.backing_file or None

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def subclusters_per_cluster(self) -> int:
        return EXTL2_SUBCLUSTERS if self.extended_l2 else 1

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def l2_bits(self) -> int:
        """log2 of the entries in one L2 table (8-byte entries, 16 with extended L2)."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l1_vm_state_index(self) -> int:
        """L1 entries the virtual size needs (QEMU's size_to_l1, with its 64-bit wrap)."""
        shift = self.cluster_bits + self.l2_bits
        return ((self.size + (1 << shift) - 1) & 0xFFFF_FFFF_FFFF_FFFF) >> shift


# --- parsing ------------------------------------------------------------------------------------


def parse_header(
    data: bytes | bytearray | memoryview,
    *,
    read_only: bool = False,
    data_file_given: bool = False,
) -> Qcow2Header:
    """Parse the first cluster of an image, or raise Qcow2Error with QEMU's text.

    ``read_only`` is the node's read-only option (a corrupt image opens only read-only; only a
    read-write open rewrites the header). ``data_file_given`` says whether the user passed a
    ``data-file`` option; without it an image with an external data file must name one.
    """
    buf = _zero_padded(data, V3_HEADER_SIZE)
    h = _fixed_fields(buf)
    buf = _zero_padded(buf, h.cluster_size + _EXT.size)
    if h.header_length > V3_HEADER_SIZE:
        h.unknown_header_fields = bytes(buf[V3_HEADER_SIZE : h.header_length])
    if h.backing_file_offset > h.cluster_size:
        raise Qcow2Error("Invalid backing file offset")
    ext_end = h.backing_file_offset or h.cluster_size

    if h.header_length > COMPRESSION_TYPE_OFFSET:
        h.compression_type = buf[COMPRESSION_TYPE_OFFSET]
    check_compression_type(h.compression_type, h.incompatible_features)
    unknown = h.incompatible_features & ~INCOMPAT_MASK
    if unknown:
        raise Qcow2Error(_unsupported_features_text(buf, h, ext_end, unknown))
    if h.corrupt and not read_only:
        raise Qcow2Error("qcow2: Image is corrupt; cannot be opened read/write")
    if h.extended_l2 and h.cluster_bits - 5 < MIN_CLUSTER_BITS:
        raise Qcow2Error(f"Unsupported subcluster size: {h.cluster_size // EXTL2_SUBCLUSTERS}")
    if h.refcount_order > 6:
        raise Qcow2Error("Reference count entry width too large; may not exceed 64 bits")
    _check_tables(h)
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
        raise Qcow2Error(f"Unsupported encryption method {h.crypt_method}")

    _read_extensions(buf, h, ext_end)
    _check_data_file(h, data_file_given)
    if h.crypt_method == CRYPT_AES:
        raise Qcow2Error(NO_KEY_TEXT)
    if h.crypt_method == CRYPT_LUKS and h.crypto_header is None:
        raise Qcow2Error(f"Missing CRYPTO header for crypt method {h.crypt_method}")
    if h.backing_file_offset:
        h.backing_file = _backing_file_name(buf, h)
    _rewrite_on_open(h, read_only)
    return h


def check_compression_type(compression_type: int, incompatible_features: int) -> None:
    """QEMU's rule: zlib without the compression type bit, zstd with it, nothing else."""
    if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise Qcow2Error(f"qcow2: unknown compression type: {compression_type}")
    has_bit = bool(incompatible_features & INCOMPAT_COMPRESSION)
    if compression_type == COMPRESSION_ZLIB and has_bit:
        raise Qcow2Error("qcow2: Compression type incompatible feature bit must not be set")
    if compression_type != COMPRESSION_ZLIB and not has_bit:
        raise Qcow2Error("qcow2: Compression type incompatible feature bit must be set")


def validate_table(
    offset: int, entries: int, entry_size: int, max_bytes: int, name: str, cluster_size: int
) -> None:
    """QEMU's qcow2_validate_table: a table not too large, cluster-aligned, within int64."""
    if entries > max_bytes // entry_size:
        raise Qcow2Error(f"{name} too large")
    if INT64_MAX - entries * entry_size < offset or offset & (cluster_size - 1):
        raise Qcow2Error(f"{name} offset invalid")


def _zero_padded(data: bytes | bytearray | memoryview, size: int) -> bytes:
    """The bytes, with zeroes appended up to ``size`` (what QEMU reads past the end of a file)."""
    raw = bytes(data)
    return raw if len(raw) >= size else raw + bytes(size - len(raw))


def _fixed_fields(buf: bytes) -> Qcow2Header:
    """The v2 and v3 fields, with QEMU's checks of magic, version, cluster and header size."""
    (
        magic,
        version,
        backing_off,
        backing_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snapshots,
        snap_off,
    ) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise Qcow2Error("Image is not in qcow2 format")
    if version not in (2, 3):
        raise Qcow2Error(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"Unsupported cluster size: 2^{cluster_bits}")
    h = Qcow2Header(
        version=version,
        backing_file_offset=backing_off,
        backing_file_size=backing_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snap_off,
        header_length=V2_HEADER_SIZE,
    )
    if version == 3:
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
            _,
        ) = _V3.unpack_from(buf, V2_HEADER_SIZE)
        if h.header_length < V3_MIN_HEADER_LENGTH:
            raise Qcow2Error("qcow2 header too short")
    if h.header_length > h.cluster_size:
        raise Qcow2Error("qcow2 header exceeds cluster size")
    return h


def _check_tables(h: Qcow2Header) -> None:
    """The refcount table, snapshot table and L1 table pointers, and the L1 size."""
    if h.refcount_table_clusters == 0:
        raise Qcow2Error("Image does not contain a reference count table")
    cs = h.cluster_size
    validate_table(
        h.refcount_table_offset,
        h.refcount_table_clusters,
        cs,
        MAX_REFTABLE_SIZE,
        "Reference count table",
        cs,
    )
    validate_table(
        h.snapshots_offset,
        h.nb_snapshots,
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
        "Snapshot table",
        cs,
    )
    validate_table(h.l1_table_offset, h.l1_size, 8, MAX_L1_SIZE, "Active L1 table", cs)
    if h.l1_vm_state_index > INT_MAX:
        raise Qcow2Error("Image is too big")
    if h.l1_size < h.l1_vm_state_index:
        raise Qcow2Error("L1 table is too small")


def _extensions(buf: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Yield (type, data) of each extension between ``start`` and ``end`` until the end marker."""
    offset = start
    while offset < end:
        ext_type, length = _EXT.unpack_from(buf, offset)
        offset += _EXT.size
        if offset > end or length > end - offset:
            raise Qcow2Error("Header extension too large")
        if ext_type == EXT_END:
            return
        yield ext_type, buf[offset : offset + length]
        offset += (length + 7) & ~7


def _read_extensions(buf: bytes, h: Qcow2Header, end: int) -> None:
    """Fill in the extensions with QEMU's checks of each (qcow2_read_extensions)."""
    for ext_type, data in _extensions(buf, h.header_length, end):
        if ext_type == EXT_BACKING_FORMAT:
            if len(data) >= BACKING_FORMAT_BUFFER:
                raise Qcow2Error(
                    f"ERROR: ext_backing_format: len={len(data)} too large "
                    f"(>={BACKING_FORMAT_BUFFER})"
                )
            h.backing_format = _c_string(data)
        elif ext_type == EXT_FEATURE_TABLE:
            h.feature_table = _feature_table(data)
        elif ext_type == EXT_CRYPTO_HEADER:
            h.crypto_header = _crypto_header(data, h)
        elif ext_type == EXT_BITMAPS:
            _bitmaps_ext(data, h)
        elif ext_type == EXT_DATA_FILE:
            h.data_file = _c_string(data)
        else:
            h.unknown_extensions.append((ext_type, bytes(data)))


def _feature_table(data: bytes) -> list[tuple[int, int, str]]:
    """The table's entries up to the first with an empty name, as QEMU reads it."""
    padded = bytes(data) + bytes(2 * FEATURE_ENTRY_SIZE)  # QEMU's zeroed sentinel entries
    table = []
    for pos in range(0, len(data), FEATURE_ENTRY_SIZE):
        entry = padded[pos : pos + FEATURE_ENTRY_SIZE]
        if entry[2] == 0:
            break
        table.append((entry[0], entry[1], _c_string(entry[2:])))
    return table


def _unsupported_features_text(buf: bytes, h: Qcow2Header, end: int, unknown: int) -> str:
    """QEMU's text for unknown incompatible bits: names from the feature table, then the rest.

    QEMU reads the extensions a first time just for the table, stopping quietly at the first
    extension it refuses, so a table after that one is not used.
    """
    scratch = replace(h, feature_table=[], unknown_extensions=[], warnings=[])
    try:
        _read_extensions(buf, scratch, end)
    except Qcow2Error:
        pass
    names = []
    for ftype, bit, name in scratch.feature_table:
        if ftype == FEATURE_INCOMPATIBLE and bit < 64 and unknown & (1 << bit):
            names.append(name)
            unknown &= ~(1 << bit)
    if unknown:
        names.append(f"Unknown incompatible feature: {unknown:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def _crypto_header(data: bytes, h: Qcow2Header) -> tuple[int, int]:
    if h.crypt_method != CRYPT_LUKS:
        raise Qcow2Error("CRYPTO header extension only expected with LUKS encryption method")
    if len(data) != CRYPTO_HEADER_EXT_SIZE:
        raise Qcow2Error(
            f"CRYPTO header extension size {len(data)}, but expected size {CRYPTO_HEADER_EXT_SIZE}"
        )
    offset, length = _CRYPTO.unpack(data)
    if offset % h.cluster_size:
        raise Qcow2Error(
            f"Encryption header offset '{offset}' is not a multiple of cluster size "
            f"'{h.cluster_size}'"
        )
    return offset, length


# QEMU's advice after its warning about bitmaps a program without bitmap support may have
# changed: the bitmaps are dropped with the extension, their clusters stay allocated.
LEAKED_ADVICE = "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."


def _bitmaps_ext(data: bytes, h: Qcow2Header) -> None:
    if len(data) != BITMAPS_EXT_SIZE:
        raise Qcow2Error("bitmaps_ext: Invalid extension length")
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        if h.version < 3:
            h.warnings.append(
                "This qcow2 v2 image contains bitmaps, but they may have been modified by a "
                "program without persistent bitmap support; so now they must all be "
                "considered inconsistent"
            )
        else:
            h.warnings.append(
                "a program lacking bitmap support modified this file, so all bitmaps are now "
                "considered inconsistent"
            )
        h.warnings[-1] += "\n" + LEAKED_ADVICE
        h.needs_rewrite = True
        return
    nb_bitmaps, reserved, dir_size, dir_offset = _BITMAPS.unpack(data)
    if reserved:
        raise Qcow2Error("bitmaps_ext: Reserved field is not zero")
    if nb_bitmaps > MAX_BITMAPS:
        raise Qcow2Error(
            f"bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported "
            f"maximum of {MAX_BITMAPS}"
        )
    if nb_bitmaps == 0:
        raise Qcow2Error("found bitmaps extension with zero bitmaps")
    if dir_offset & (h.cluster_size - 1):
        raise Qcow2Error("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise Qcow2Error(
            f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported "
            f"size ({MAX_BITMAP_DIRECTORY_SIZE})"
        )
    h.bitmaps_ext = bytes(data)


def _check_data_file(h: Qcow2Header, data_file_given: bool) -> None:
    """The external data file bits against the data file name and the ``data-file`` option."""
    if h.has_data_file:
        if not data_file_given and h.data_file is None:
            raise Qcow2Error("'data-file' is required for this image")
        return
    if data_file_given:
        raise Qcow2Error("'data-file' can only be set for images with an external data file")
    if h.data_file_raw:
        raise Qcow2Error("data-file-raw requires a data file")


def _backing_file_name(buf: bytes, h: Qcow2Header) -> str:
    length = h.backing_file_size
    if length > min(MAX_BACKING_FILE_NAME, h.cluster_size - h.backing_file_offset):
        raise Qcow2Error("Backing file name too long")
    start = h.backing_file_offset
    return _c_string(buf[start : start + length])


def _rewrite_on_open(h: Qcow2Header, read_only: bool) -> None:
    """A read-write open rewrites the header to drop a stale bitmaps extension and clear the
    autoclear bits QEMU does not know; a read-only one leaves the file alone."""
    if read_only:
        h.needs_rewrite = False
        return
    if h.autoclear_features & ~AUTOCLEAR_MASK:
        h.needs_rewrite = True
    if h.needs_rewrite:
        h.autoclear_features &= AUTOCLEAR_MASK


def _c_string(data: bytes) -> str:
    """Bytes up to the first NUL, decoded as file names are (undecodable bytes round-trip)."""
    raw = bytes(data).split(b"\0", 1)[0]
    return raw.decode("utf-8", "surrogateescape")


# --- writing ------------------------------------------------------------------------------------


def serialize_header(h: Qcow2Header) -> bytes:
    """The header cluster as QEMU's qcow2_update_header writes it.

    The virtual size is written rounded down to 512 bytes, v3 headers are 112 bytes plus the
    unknown fields, extensions come in QEMU's order (backing format, data file, encryption
    header, QEMU's own feature table for v3 images with clusters over 4 KiB, bitmaps, then the
    unknown ones in reverse order, as QEMU keeps them), then the end marker and the backing file
    name. Raises OSError(ENOSPC) when it does not fit in one cluster.
    """
    body = bytearray(_fixed_header_bytes(h))
    if h.version >= 3:
        body += h.unknown_header_fields
    for ext_type, data in _extensions_to_write(h):
        body += _ext_bytes(ext_type, data)
    body += _ext_bytes(EXT_END, b"")
    if h.backing_file is not None:
        name = h.backing_file.encode("utf-8", "surrogateescape")
        struct.pack_into(">QI", body, 8, len(body), len(name))
        body += name
    if len(body) > h.cluster_size:
        raise OSError(errno.ENOSPC, "qcow2 header does not fit in one cluster")
    return bytes(body) + bytes(h.cluster_size - len(body))


def _fixed_header_bytes(h: Qcow2Header) -> bytes:
    v2 = _V2.pack(
        MAGIC,
        h.version,
        0,
        0,
        h.cluster_bits,
        h.size & ~511,
        h.crypt_method,
        h.l1_size,
        h.l1_table_offset,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.nb_snapshots,
        h.snapshots_offset,
    )
    if h.version < 3:
        return v2
    header_length = V3_HEADER_SIZE + len(h.unknown_header_fields)
    return v2 + _V3.pack(
        h.incompatible_features,
        h.compatible_features,
        h.autoclear_features,
        h.refcount_order,
        header_length,
        h.compression_type,
    )


def _extensions_to_write(h: Qcow2Header) -> list[tuple[int, bytes]]:
    exts: list[tuple[int, bytes]] = []
    if h.backing_format is not None:
        exts.append((EXT_BACKING_FORMAT, h.backing_format.encode("utf-8", "surrogateescape")))
    if h.has_data_file and h.data_file is not None:
        exts.append((EXT_DATA_FILE, h.data_file.encode("utf-8", "surrogateescape")))
    if h.crypto_header is not None and h.crypto_header[0] != 0:
        exts.append((EXT_CRYPTO_HEADER, _CRYPTO.pack(*h.crypto_header)))
    if h.version >= 3 and h.cluster_size > 4096:
        exts.append((EXT_FEATURE_TABLE, feature_table_bytes(QEMU_FEATURE_TABLE)))
    if h.bitmaps_ext is not None:
        exts.append((EXT_BITMAPS, h.bitmaps_ext))
    exts.extend(reversed(h.unknown_extensions))
    return exts


def feature_table_bytes(table: Iterable[tuple[int, int, str]]) -> bytes:
    """A feature name table extension's data: 48-byte (type, bit, name) entries."""
    out = bytearray()
    for ftype, bit, name in table:
        raw = name.encode()[:FEATURE_NAME_SIZE]
        out += bytes((ftype, bit)) + raw + bytes(FEATURE_NAME_SIZE - len(raw))
    return bytes(out)


def _ext_bytes(ext_type: int, data: bytes) -> bytes:
    return _EXT.pack(ext_type, len(data)) + data + bytes(-len(data) % 8)
