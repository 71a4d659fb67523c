"""blockdev-create for qcow2: QEMU 11.1's checks and texts, and QEMU's bytes.

The image is made as QEMU makes it, so that the file is the same byte for byte: a first
cluster with the header, a refcount table (cluster 1) pointing at one empty refcount block
(cluster 2); then the image is opened as a qcow2 node (with qsd-py's own driver: its
allocator, header writer and resize are QEMU's, see docs/design.rst), its first three
clusters are counted, the full header written (feature table, data file name), the node
resized to the virtual size with the preallocation asked for, and the backing file recorded.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsd_py.block.create import as_int64
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.block.qcow2 import header as hdr
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode

DEFAULT_CLUSTER_SIZE = 1 << 16
EXTL2_MIN_CLUSTER_SIZE = (1 << hdr.MIN_CLUSTER_BITS) * hdr.EXTL2_SUBCLUSTERS
_V3_ONLY = "only supported with compatibility level 1.1 and above (use version=v3 or greater)"


@dataclass
class Plan:
    """The validated options: what the new header says."""

    version: int
    cluster_size: int
    refcount_order: int
    prealloc: str
    compression_type: int


def _plan(opts: dict[str, Any]) -> Plan:
    """QEMU's checks before anything is written, in QEMU's order (the data file's and the
    compression type's come later: see :func:`create`)."""
    if opts["size"] % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    version = 2 if opts.get("version") == "v2" else 3
    cluster_size = opts.get("cluster-size", DEFAULT_CLUSTER_SIZE)
    extended_l2 = opts.get("extended-l2", False)
    if extended_l2 and version < 3:
        raise QMPError(f"Extended L2 entries are {_V3_ONLY}")
    _check_cluster_size(cluster_size, extended_l2)
    prealloc = opts.get("preallocation", "off")
    backing = opts.get("backing-file")
    if backing is not None and prealloc != "off" and not extended_l2:
        raise QMPError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if "backing-fmt" in opts and backing is None:
        raise QMPError("Backing format cannot be used without backing file")
    if version < 3 and opts.get("lazy-refcounts", False):
        raise QMPError(f"Lazy refcounts {_V3_ONLY}")
    bits = opts.get("refcount-bits", 16)
    if bits > 64 or bits <= 0 or bits & (bits - 1):
        raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise QMPError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)"
        )
    raw = opts.get("data-file-raw", False)
    if raw and "data-file" not in opts:
        raise QMPError("data-file-raw requires data-file")
    if raw and backing is not None:
        raise QMPError("Backing file and data-file-raw cannot be used at the same time")
    if raw and prealloc == "off":
        prealloc = "metadata"  # a raw data file needs the 1:1 mapping in the tables too
    compression = hdr.COMPRESSION_ZSTD if opts.get("compression-type") == "zstd" else 0
    return Plan(version, cluster_size, bits.bit_length() - 1, prealloc, compression)


def _check_cluster_size(cluster_size: int, extended_l2: bool) -> None:
    bits = cluster_size.bit_length() - 1
    if (
        cluster_size <= 0
        or cluster_size & (cluster_size - 1)
        or not hdr.MIN_CLUSTER_BITS <= bits <= hdr.MAX_CLUSTER_BITS
    ):
        raise QMPError(
            f"Cluster size must be a power of two between {1 << hdr.MIN_CLUSTER_BITS} and "
            f"{1 << (hdr.MAX_CLUSTER_BITS - 10)}k"
        )
    if extended_l2 and cluster_size < EXTL2_MIN_CLUSTER_SIZE:
        raise QMPError(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"{EXTL2_MIN_CLUSTER_SIZE} bytes"
        )


def _first_header(plan: Plan, opts: dict[str, Any]) -> hdr.Qcow2Header:
    """The header QEMU writes first: no size, no L1 table, one refcount table cluster."""
    h = hdr.Qcow2Header(
        version=plan.version,
        cluster_bits=plan.cluster_size.bit_length() - 1,
        refcount_table_offset=plan.cluster_size,
        refcount_table_clusters=1,
        refcount_order=plan.refcount_order,
        compression_type=plan.compression_type,
    )
    if opts.get("lazy-refcounts", False):
        h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    if "data-file" in opts:
        h.incompatible_features |= hdr.INCOMPAT_DATA_FILE
    if opts.get("data-file-raw", False):
        h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
    if plan.compression_type != hdr.COMPRESSION_ZLIB:
        h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
    if opts.get("extended-l2", False):
        h.incompatible_features |= hdr.INCOMPAT_EXTL2
    return h


async def create(graph: BlockGraph, opts: dict[str, Any]) -> None:
    """Create a qcow2 image in the node ``opts['file']`` names (or defines)."""
    file = await graph.open_ref(opts["file"])
    data: BlockNode | None = None
    try:
        plan = _plan(opts)
        if "data-file" in opts:
            if plan.version < 3:
                raise QMPError(f"External data files are {_V3_ONLY}")
            data = await graph.open_ref(opts["data-file"])
        if plan.compression_type != hdr.COMPRESSION_ZLIB and plan.version < 3:
            raise QMPError(f"Non-zlib compression type is {_V3_ONLY}")
        await _write_skeleton(file, _first_header(plan, opts), plan.cluster_size)
        await _finish(graph, file, data, plan, opts)
    finally:
        for node in (data, file):
            if node is not None:
                await graph.drop_orphan(node)


async def _write_skeleton(file: BlockNode, h: hdr.Qcow2Header, cluster_size: int) -> None:
    """The header cluster, then the refcount table and its one (empty) refcount block,
    written as a user holding write and resize (QEMU's BlockBackend of the creation)."""
    key = "qmp:blockdev-create"
    desc = f"an unnamed block device (uses node '{file.node_name}' as 'root' child)"
    file.set_user(NodeUser(key, Perm.WRITE | Perm.RESIZE, PERM_ALL, desc))
    try:
        try:
            await file.write(0, hdr.serialize_header(h))
        except OSError as e:
            raise QMPError(f"Could not write qcow2 header: {_strerror(e)}") from None
        tables = bytearray(2 * cluster_size)
        struct.pack_into(">Q", tables, 0, 2 * cluster_size)
        try:
            await file.write(cluster_size, tables)
        except OSError as e:
            raise QMPError(f"Could not write refcount table: {_strerror(e)}") from None
    finally:
        file.remove_user(key)
    file.refresh_length()


async def _finish(
    graph: BlockGraph, file: BlockNode, data: BlockNode | None, plan: Plan, opts: dict[str, Any]
) -> None:
    """Open the new image, count its first clusters, write the full header, resize it and
    record the backing file; closing the node writes everything back."""
    node_opts: dict[str, Any] = {"driver": "qcow2", "file": file.node_name, "backing": None}
    if data is not None:
        node_opts["data-file"] = data.node_name
    node = await graph.add_implicit(node_opts)
    try:
        await _fill(node, data, plan, opts)
    finally:
        await graph.drop_orphan(node)


async def _fill(node: Any, data: BlockNode | None, plan: Plan, opts: dict[str, Any]) -> None:
    assert node.refcounts is not None and node.header is not None
    await node.refcounts.allocate(3 * plan.cluster_size)
    if data is not None:
        node.header.data_file = data.filename()
    await node.write_header()
    size = as_int64(opts["size"])
    try:
        if size < 0:
            raise QMPError("Image size cannot be negative")
        await node.truncate(size, plan.prealloc)
    except QMPError as e:
        raise QMPError(f"Could not resize image: {e.desc}") from None
    except OSError as e:
        raise QMPError(f"Could not resize image: {_strerror(e)}") from None
    backing = opts.get("backing-file")
    if backing is not None:
        await _set_backing(node, backing, opts.get("backing-fmt"))
    encrypt = opts.get("encrypt")
    if encrypt is not None:
        await _set_up_encryption(node, encrypt)


async def _set_up_encryption(node: Any, encrypt: dict[str, Any]) -> None:
    """QEMU's last step: the LUKS header in new clusters (zeroed whole first, so the unused
    key slots' bytes are predictable), the encryption method and extension in the header."""
    from qsd_py.block.crypto.create import make_header

    if encrypt["format"] != "luks":
        raise QMPError("Could not create image: encryption format 'qcow' is not supported")
    header, length = await make_header(node.graph, encrypt, "encrypt.")
    offset = await node.refcounts.allocate(length)
    clusters = -(-length // node.cluster_size) * node.cluster_size
    await node.file.write_zeroes(offset, clusters, False)
    await node.file.write(offset, header)
    node.refcounts.note_end(offset + clusters)
    node.header.crypt_method = hdr.CRYPT_LUKS
    node.header.crypto_header = (offset, length)
    await node.write_header()


async def _set_backing(node: Any, name: str, fmt: str | None) -> None:
    """Record the backing file's name (and format) in the header, or QEMU's refusal."""
    try:
        if len(name.encode("utf-8", "surrogateescape")) > hdr.MAX_BACKING_FILE_NAME:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        node.header.backing_file = name
        node.header.backing_format = fmt
        await node.write_header()
    except OSError as e:
        raise QMPError(
            f"Could not assign backing file '{name}' with format '{fmt or '(null)'}': "
            f"{os.strerror(e.errno) if e.errno else e}"
        ) from None


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)
