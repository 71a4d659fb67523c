"""qcow2 table entries as plain integers: L1 and L2 entries, extended L2 bitmaps, compressed
cluster descriptors, refcount table entries and refcount block cells.

These sit on the driver's lookup path, so they are small functions on ints and bytes, with no
object per entry. Types are QEMU's ``QCow2ClusterType`` and ``QCow2SubclusterType`` values as int
constants. The corruption texts are QEMU's (``qcow2: Marking image as corrupt: <text>; further
corruption events will be suppressed``), with C's ``%#x`` (0 prints as ``0``).
"""

from __future__ import annotations

import struct

SECTOR_SIZE = 512  # compressed cluster sizes count 512-byte sectors

# Entry flags and masks.
OFLAG_COPIED = 1 << 63  # refcount exactly 1: writable in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard L2 entries (v3): reads as zeroes
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
REFT_RESERVED_MASK = 0x1FF

# Extended L2: 32 subclusters; bitmap bits 0-31 "allocated", 32-63 "reads as zeroes".
SUBCLUSTERS = 32
BITMAP_ALL_ALLOC = 0xFFFF_FFFF
BITMAP_ALL_ZEROES = 0xFFFF_FFFF << 32

# QCow2ClusterType
CLUSTER_UNALLOCATED = 0
CLUSTER_ZERO_PLAIN = 1
CLUSTER_ZERO_ALLOC = 2
CLUSTER_NORMAL = 3
CLUSTER_COMPRESSED = 4

# QCow2SubclusterType
SUBCLUSTER_UNALLOCATED_PLAIN = 0
SUBCLUSTER_UNALLOCATED_ALLOC = 1
SUBCLUSTER_ZERO_PLAIN = 2
SUBCLUSTER_ZERO_ALLOC = 3
SUBCLUSTER_NORMAL = 4
SUBCLUSTER_COMPRESSED = 5
SUBCLUSTER_INVALID = 6

_U64 = struct.Struct(">Q")


# --- geometry -----------------------------------------------------------------------------------


def l2_entry_size(extended: bool) -> int:
    """Bytes per L2 entry: 8, or 16 with extended L2 (entry, then subcluster bitmap)."""
    return 16 if extended else 8


def l2_bits(cluster_bits: int, extended: bool) -> int:
    """log2 of the entries of one L2 table (a table is one cluster)."""
    return cluster_bits - (4 if extended else 3)


def l2_entries_per_cluster(cluster_bits: int, extended: bool) -> int:
    return 1 << l2_bits(cluster_bits, extended)


def l1_entries_for(size: int, cluster_bits: int, extended: bool) -> int:
    """L1 entries needed to map ``size`` guest bytes (QEMU's size_to_l1)."""
    shift = cluster_bits + l2_bits(cluster_bits, extended)
    return (size + (1 << shift) - 1) >> shift


def l1_index(guest_offset: int, cluster_bits: int, extended: bool) -> int:
    return guest_offset >> (cluster_bits + l2_bits(cluster_bits, extended))


def l2_index(guest_offset: int, cluster_bits: int, extended: bool) -> int:
    return (guest_offset >> cluster_bits) & ((1 << l2_bits(cluster_bits, extended)) - 1)


def subcluster_index(guest_offset: int, cluster_bits: int) -> int:
    """The subcluster (0..31) of an extended-L2 image a guest offset falls in."""
    return (guest_offset >> (cluster_bits - 5)) & (SUBCLUSTERS - 1)


# --- L1 and L2 entries --------------------------------------------------------------------------


def l1_l2_offset(l1_entry: int) -> int:
    """Host offset of the L2 table an L1 entry points at (0: none)."""
    return l1_entry & L1E_OFFSET_MASK


def l2_host_offset(l2_entry: int) -> int:
    """Host cluster offset of a normal or preallocated-zero L2 entry."""
    return l2_entry & L2E_OFFSET_MASK


def read_l2_entry(table: bytes | bytearray | memoryview, index: int, extended: bool) -> int:
    """The 64-bit entry at ``index`` of an L2 table (or slice) as stored big-endian."""
    return _U64.unpack_from(table, index << (4 if extended else 3))[0]


def read_l2_bitmap(table: bytes | bytearray | memoryview, index: int) -> int:
    """The subcluster bitmap of entry ``index`` of an extended L2 table."""
    return _U64.unpack_from(table, (index << 4) + 8)[0]


def write_l2_entry(
    table: bytearray | memoryview, index: int, extended: bool, entry: int, bitmap: int | None = None
) -> None:
    """Store an entry (and, with extended L2, its bitmap when given) at ``index``."""
    if extended:
        _U64.pack_into(table, index << 4, entry)
        if bitmap is not None:
            _U64.pack_into(table, (index << 4) + 8, bitmap)
    else:
        _U64.pack_into(table, index << 3, entry)


def cluster_type(l2_entry: int, extended: bool, has_data_file: bool = False) -> int:
    """QEMU's qcow2_get_cluster_type: what a whole cluster is.

    With extended L2 the zero flag of the entry has no meaning (the bitmap says it). With an
    external data file offset 0 is a real place, told from "unallocated" by the copied flag.
    """
    if l2_entry & OFLAG_COMPRESSED:
        return CLUSTER_COMPRESSED
    if l2_entry & OFLAG_ZERO and not extended:
        return CLUSTER_ZERO_ALLOC if l2_entry & L2E_OFFSET_MASK else CLUSTER_ZERO_PLAIN
    if not l2_entry & L2E_OFFSET_MASK:
        if has_data_file and l2_entry & OFLAG_COPIED:
            return CLUSTER_NORMAL
        return CLUSTER_UNALLOCATED
    return CLUSTER_NORMAL


_PLAIN_SUBCLUSTER = {
    CLUSTER_UNALLOCATED: SUBCLUSTER_UNALLOCATED_PLAIN,
    CLUSTER_ZERO_PLAIN: SUBCLUSTER_ZERO_PLAIN,
    CLUSTER_ZERO_ALLOC: SUBCLUSTER_ZERO_ALLOC,
    CLUSTER_NORMAL: SUBCLUSTER_NORMAL,
    CLUSTER_COMPRESSED: SUBCLUSTER_COMPRESSED,
}


def subcluster_type(
    l2_entry: int, l2_bitmap: int, sc_index: int, extended: bool, has_data_file: bool = False
) -> int:
    """QEMU's qcow2_get_subcluster_type: what subcluster ``sc_index`` is.

    Without extended L2 the bitmap is ignored and ``sc_index`` is 0. SUBCLUSTER_INVALID flags an
    entry whose bitmap contradicts itself (allocated and zero, or allocated without a cluster).
    """
    ctype = cluster_type(l2_entry, extended, has_data_file)
    if not extended:
        return _PLAIN_SUBCLUSTER[ctype]
    if ctype == CLUSTER_COMPRESSED:
        return SUBCLUSTER_COMPRESSED
    if ctype == CLUSTER_NORMAL:
        if (l2_bitmap >> 32) & l2_bitmap:
            return SUBCLUSTER_INVALID
        if l2_bitmap & (1 << (sc_index + 32)):
            return SUBCLUSTER_ZERO_ALLOC
        if l2_bitmap & (1 << sc_index):
            return SUBCLUSTER_NORMAL
        return SUBCLUSTER_UNALLOCATED_ALLOC
    # CLUSTER_UNALLOCATED (no zero-flag types with extended L2)
    if l2_bitmap & BITMAP_ALL_ALLOC:
        return SUBCLUSTER_INVALID
    if l2_bitmap & (1 << (sc_index + 32)):
        return SUBCLUSTER_ZERO_PLAIN
    return SUBCLUSTER_UNALLOCATED_PLAIN


def subcluster_run(
    l2_entry: int, l2_bitmap: int, sc_from: int, extended: bool, has_data_file: bool = False
) -> tuple[int, int]:
    """(type, count): the type of subcluster ``sc_from`` and how many subclusters from there on
    have the same type (QEMU's qcow2_get_subcluster_range_type). Count is 0 for INVALID.

    Without extended L2, or for a compressed cluster, the run is the rest of the cluster.
    """
    stype = subcluster_type(l2_entry, l2_bitmap, sc_from, extended, has_data_file)
    if stype == SUBCLUSTER_INVALID:
        return stype, 0
    if not extended:
        return stype, 1 - sc_from
    if stype == SUBCLUSTER_COMPRESSED:
        return stype, SUBCLUSTERS - sc_from
    below = (1 << sc_from) - 1  # subclusters [0, sc_from) counted as matching
    if stype == SUBCLUSTER_NORMAL:
        return stype, _trailing_ones((l2_bitmap & BITMAP_ALL_ALLOC) | below) - sc_from
    if stype in (SUBCLUSTER_ZERO_PLAIN, SUBCLUSTER_ZERO_ALLOC):
        return stype, _trailing_ones((l2_bitmap >> 32) | below) - sc_from
    either = ((l2_bitmap >> 32) | l2_bitmap) & BITMAP_ALL_ALLOC & ~below
    return stype, _trailing_zeros32(either) - sc_from


def _trailing_ones(value: int) -> int:
    return _trailing_zeros32(~value & BITMAP_ALL_ALLOC)


def _trailing_zeros32(value: int) -> int:
    """Trailing zero bits of a 32-bit value (32 for 0)."""
    return (value & -value).bit_length() - 1 if value else 32


def alloc_range(start: int, end: int) -> int:
    """Bitmap bits marking subclusters [start, end) allocated."""
    return (1 << end) - (1 << start)


def subcluster_mask(in_cluster: int, n: int, cluster_size: int) -> int:
    """The allocation bits of the subclusters that bytes ``[in_cluster, +n)`` of a cluster
    touch."""
    sc = cluster_size // SUBCLUSTERS
    return alloc_range(in_cluster // sc, (in_cluster + n - 1) // sc + 1)


def zero_range(start: int, end: int) -> int:
    """Bitmap bits marking subclusters [start, end) as reading zeroes."""
    return alloc_range(start, end) << 32


def bitmap_alloc_mask(l2_bitmap: int) -> int:
    """The 32 "allocated" bits of an extended L2 bitmap."""
    return l2_bitmap & BITMAP_ALL_ALLOC


def bitmap_zero_mask(l2_bitmap: int) -> int:
    """The 32 "reads as zeroes" bits of an extended L2 bitmap."""
    return l2_bitmap >> 32


# --- compressed cluster descriptors -------------------------------------------------------------


def compressed_shift(cluster_bits: int) -> int:
    """Bit where the sector count starts: the offset field is 62 - (cluster_bits - 8) bits."""
    return 62 - (cluster_bits - 8)


def compressed_range(l2_entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, bytes to read) of a compressed cluster (qcow2_parse_compressed_l2_entry).

    The descriptor counts whole 512-byte sectors from the one holding the first byte, so the
    read may include bytes past the compressed stream; decompression stops when the cluster is
    complete.
    """
    shift = compressed_shift(cluster_bits)
    offset = l2_entry & ((1 << shift) - 1)
    sectors = ((l2_entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * SECTOR_SIZE - (offset & (SECTOR_SIZE - 1))


def compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry for ``length`` compressed bytes at ``host_offset`` (as QEMU writes it)."""
    shift = compressed_shift(cluster_bits)
    if host_offset >> shift or length <= 0:
        raise ValueError(f"no descriptor for {length} compressed bytes at {host_offset:#x}")
    extra = (host_offset + length - 1) // SECTOR_SIZE - host_offset // SECTOR_SIZE
    if extra >> (cluster_bits - 8):
        raise ValueError(f"compressed cluster of {length} bytes too long")
    return OFLAG_COMPRESSED | extra << shift | host_offset


# --- refcounts ----------------------------------------------------------------------------------


def refcount_block_entries(cluster_bits: int, refcount_order: int) -> int:
    """Refcount cells in one refcount block (a cluster of 2^order-bit cells)."""
    return 1 << (cluster_bits + 3 - refcount_order)


def refcount_max(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1


def refcount_location(host_offset: int, cluster_bits: int, refcount_order: int) -> tuple[int, int]:
    """(refcount table index, cell index in that block) of the cluster holding ``host_offset``."""
    block_bits = cluster_bits + 3 - refcount_order
    cluster = host_offset >> cluster_bits
    return cluster >> block_bits, cluster & ((1 << block_bits) - 1)


def reftable_block_offset(reftable_entry: int) -> int:
    """Host offset of the refcount block a refcount table entry points at (0: none)."""
    return reftable_entry & REFT_OFFSET_MASK


def get_refcount(block: bytes | bytearray | memoryview, index: int, refcount_order: int) -> int:
    """Cell ``index`` of a refcount block.

    Cells of 8 bits and more are big-endian; narrower ones are packed from the low bits of each
    byte up (cell 0 is bit 0 of byte 0), as QEMU stores them.
    """
    if refcount_order == 4:
        return block[2 * index] << 8 | block[2 * index + 1]
    if refcount_order >= 3:
        width = 1 << (refcount_order - 3)
        return int.from_bytes(block[index * width : (index + 1) * width], "big")
    bits = 1 << refcount_order
    per_byte_bits = 3 - refcount_order
    shift = (index & ((1 << per_byte_bits) - 1)) * bits
    return (block[index >> per_byte_bits] >> shift) & ((1 << bits) - 1)


def set_refcount(
    block: bytearray | memoryview, index: int, refcount_order: int, value: int
) -> None:
    """Store ``value`` in cell ``index``; ValueError when it does not fit the cell width."""
    bits = 1 << refcount_order
    if not 0 <= value < 1 << bits:
        raise ValueError(f"refcount {value} does not fit in {bits} bits")
    if refcount_order >= 3:
        width = bits >> 3
        block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte_bits = 3 - refcount_order
    shift = (index & ((1 << per_byte_bits) - 1)) * bits
    pos = index >> per_byte_bits
    block[pos] = (block[pos] & ~(((1 << bits) - 1) << shift)) | (value << shift)


# --- QEMU's corruption texts --------------------------------------------------------------------


def c_hex(value: int) -> str:
    """C's ``%#x``: ``0x1f``, but ``0`` for zero."""
    return f"{value:#x}" if value else "0"


def l2_table_unaligned_text(l2_offset: int, l1_index: int) -> str:
    return f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(l1_index)})"


def cluster_unaligned_text(host_offset: int, l2_offset: int, l2_index: int) -> str:
    return (
        f"Cluster allocation offset {c_hex(host_offset)} unaligned "
        f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
    )


def zero_in_v2_text(l2_offset: int, l2_index: int) -> str:
    return (
        f"Zero cluster entry found in pre-v3 image "
        f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
    )


def compressed_with_data_file_text(l2_offset: int, l2_index: int) -> str:
    return (
        f"Compressed cluster entry found in image with external data file "
        f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
    )


def data_file_offset_mismatch_text(host_offset: int, guest_offset: int, l2_index: int) -> str:
    return (
        f"External data file host cluster offset {c_hex(host_offset)} does not match guest "
        f"cluster offset: {c_hex(guest_offset)}, L2 index: {c_hex(l2_index)})"
    )


def invalid_entry_text(l2_offset: int, l2_index: int) -> str:
    """QEMU's text has two spaces before the parenthesis."""
    return (
        f"Invalid cluster entry found  (L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
    )


# The texts of the write path (qcow2_alloc_host_offset and the allocator) differ from the read
# path's: guest offsets instead of L2 positions, and one space in "found (L2".


def data_cluster_unaligned_text(host_offset: int, guest_offset: int) -> str:
    return (
        f"Data cluster offset {c_hex(host_offset)} unaligned (guest offset: {c_hex(guest_offset)})"
    )


def zero_cluster_unaligned_text(host_offset: int, guest_offset: int) -> str:
    return (
        f"Preallocated zero cluster offset {c_hex(host_offset)} unaligned "
        f"(guest offset: {c_hex(guest_offset)})"
    )


def invalid_entry_on_write_text(l2_offset: int, l2_index: int) -> str:
    return (
        f"Invalid cluster entry found (L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
    )


def refblock_unaligned_text(refblock_offset: int, reftable_index: int) -> str:
    return (
        f"Refblock offset {c_hex(refblock_offset)} unaligned "
        f"(reftable index: {c_hex(reftable_index)})"
    )


# What QEMU's overlap check names the metadata a write would have hit.
OVERLAP_NAMES = (
    "qcow2_header",
    "active L1 table",
    "active L2 table",
    "refcount table",
    "refcount block",
    "snapshot table",
    "inactive L1 table",
    "inactive L2 table",
    "bitmap directory",
)


def overlap_text(metadata: str) -> str:
    """A write refused because it would overwrite metadata (one of OVERLAP_NAMES)."""
    return f"Preventing invalid write on metadata (overlaps with {metadata})"


def corruption_report(text: str, writable: bool) -> str:
    """The line QEMU prints on stderr (and the BLOCK_IMAGE_CORRUPTED event carries the text).

    On a writable node the corruption is fatal: QEMU sets the corrupt bit and the node fails
    all further I/O; read-only, it only reports.
    """
    if writable:
        return (
            f"qcow2: Marking image as corrupt: {text}; further corruption events will be suppressed"
        )
    return (
        f"qcow2: Image is corrupt: {text}; further non-fatal corruption events will be suppressed"
    )
