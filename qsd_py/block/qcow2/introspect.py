"""What a qcow2 node tells about itself: its name (a ``json:`` one where QEMU gives that),
its full options, its limits, and the image information of ``query-named-block-nodes`` with
QEMU's format-specific part.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2.snapshots import NO_ICOUNT
from qsd_py.block.qcow2.zeroing import grain

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node


def filename(node: Qcow2Node) -> str:
    """The image file's name, or QEMU's ``json:`` description once the backing node is
    not the one the header names (given by reference, or null over a named one)."""
    assert node.header is not None
    overridden = "backing" in node.opts
    if overridden and "backing" not in full_options(node):
        overridden = False  # given, but the very one the header names (an overlay's)
    if not overridden or (node.backing is None and node.header.backing_name is None):
        name = node.file.filename()
        if not name.startswith("json:"):
            return name
        # a file known only by its options (rbd): QEMU describes the image with them
        return "json:" + json.dumps({"driver": "qcow2", "file": node.file.full_options()})
    return "json:" + json.dumps(full_options(node), sort_keys=True)


def full_options(node: Qcow2Node) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": "qcow2"}
    backing = node.backing
    h = node.header
    if backing is not None:
        # QEMU's bdrv_backing_overridden: a backing opened from the header's name (its
        # auto_backing_file is then the node's filename) or given with that very name
        # is left out.
        implicit = "backing" not in node.opts
        named = h is not None and h.backing_name == backing.filename()
        if not (implicit or named):
            opts["backing"] = backing.full_options()
    elif "backing" in node.opts and node.header and node.header.backing_name is not None:
        opts["backing"] = None  # null over the one the header names
    opts["file"] = node.file.full_options()
    return opts


def limits(node: Qcow2Node) -> dict[str, int]:
    """The file's alignment, and discards and zeroes in whole (sub)clusters."""
    found = node.file.limits()
    found["discard-alignment"] = node.cluster_size
    found["write-zeroes-alignment"] = grain(node)
    return found


def image_extra(node: Qcow2Node) -> dict[str, Any]:
    assert node.header is not None
    h = node.header
    extra: dict[str, Any] = {"dirty-flag": h.dirty, "cluster-size": node.cluster_size}
    if h.backing_name is not None:
        extra["backing-filename"] = h.backing_name
        extra["full-backing-filename"] = node.relative(h.backing_name)
        if h.backing_format is not None:
            extra["backing-filename-format"] = h.backing_format
    if node.snapshots:
        extra["snapshots"] = [snapshot_info(sn) for sn in node.snapshots]
    extra["format-specific"] = {"type": "qcow2", "data": _format_specific(node)}
    return extra


def _format_specific(node: Qcow2Node) -> dict[str, Any]:
    """ImageInfoSpecificQCow2, members in the schema's order."""
    assert node.header is not None
    h = node.header
    ctype = "zstd" if h.compression_type == hdr.COMPRESSION_ZSTD else "zlib"
    if h.version < 3:
        return {"compat": "0.10", "refcount-bits": h.refcount_bits, "compression-type": ctype}
    data: dict[str, Any] = {"compat": "1.1"}
    if h.has_data_file:
        data["data-file"] = node.children["data-file"].node.filename()
        data["data-file-raw"] = h.data_file_raw
    data["extended-l2"] = h.extended_l2
    data["lazy-refcounts"] = node.lazy_refcounts()
    data["corrupt"] = h.corrupt
    data["refcount-bits"] = h.refcount_bits
    if node.metadata is not None and node.metadata.bitmaps:
        data["bitmaps"] = [bitmap.info() for bitmap in node.metadata.bitmaps]
    data["compression-type"] = ctype
    return data


def snapshot_info(sn: Any) -> dict[str, Any]:
    """SnapshotInfo of one internal snapshot (also blockdev-snapshot-delete-internal-sync's
    reply)."""
    info = {
        "id": sn.id,
        "name": sn.name,
        "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    }
    if sn.icount != NO_ICOUNT:
        info["icount"] = sn.icount
    return info
