"""QMP commands of the block layer: blockdev-add/-del, query-named-block-nodes, block_resize,
query-block, query-blockstats, block-set-write-threshold."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.block.stats import (
    FAILED_FLUSH,
    FAILED_RD,
    FAILED_UNMAP,
    FAILED_WR,
    FLUSH_OPS,
    LAST_IO,
    RD_BYTES,
    RD_OPS,
    UNMAP_BYTES,
    UNMAP_OPS,
    WR_BYTES,
    WR_OPS,
)
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon

_resize_ids = itertools.count()


@qmp_command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    before = set(daemon.graph)
    await daemon.graph.add(args)
    await daemon.graph.drain_all(_open_drains(set(daemon.graph) - before))
    return {}


def _open_drains(new: set[Any]) -> int:
    """How many drained sections of all nodes QEMU 11.1's blockdev-add goes through for
    these new nodes (measured: three per node opened over children, one more per backing
    child attached; none for a node without children)."""
    return sum(3 + (node.child_node("backing") is not None) for node in new if node.children)


@qmp_command("blockdev-del")
async def blockdev_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.delete(args["node-name"])
    await daemon.graph.drain_all()  # QEMU 11.1 closes a node in one drained section
    return {}


@qmp_command("query-named-block-nodes")
async def query_named_block_nodes(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.graph.query(bool(args.get("flat", False)))


@qmp_command("block_resize")
async def block_resize(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Resize like QEMU: find the node, take the resize permission as a temporary user
    (conflicts are refused with QEMU's text), then truncate."""
    node = daemon.graph.lookup_device_or_node(args.get("device"), args.get("node-name"))
    size = args["size"]
    if size < 0:
        raise QMPError("Parameter 'size' expects a >0 size")
    blocker = node.backing_blocker()  # before the driver could say it is read-only
    if blocker is not None:
        raise QMPError(blocker)
    # QEMU's temporary BlockBackend: attached and detached, a drained section each
    await daemon.graph.drain_all()
    try:
        await _resize(node, size)
    finally:
        await daemon.graph.drain_all()
    return {}


async def _resize(node: Any, size: int) -> None:
    if not node.active:
        raise QMPError("Permission 'resize' unavailable on inactive node")
    desc = f"an unnamed block device (uses node '{node.node_name}' as 'root' child)"
    key = f"qmp:block_resize:{next(_resize_ids)}"
    node.set_user(NodeUser(key, Perm.RESIZE, PERM_ALL, desc))
    try:
        await node.truncate(size)
    except OSError as e:
        raise QMPError(e.strerror or str(e)) from None
    finally:
        node.remove_user(key)


@qmp_command("query-block")
async def query_block(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """QEMU's daemon lists no block devices: exports' and jobs' BlockBackends are unnamed."""
    return []


# BlockDeviceStats' integers in QEMU's order (those qsd-py does not count stay 0).
_ZERO_STATS = (
    "rd_bytes wr_bytes zone_append_bytes unmap_bytes rd_operations wr_operations "
    "zone_append_operations flush_operations unmap_operations rd_total_time_ns "
    "wr_total_time_ns zone_append_total_time_ns flush_total_time_ns unmap_total_time_ns "
    "wr_highest_offset rd_merged wr_merged zone_append_merged unmap_merged "
    "failed_rd_operations failed_wr_operations failed_zone_append_operations "
    "failed_flush_operations failed_unmap_operations invalid_rd_operations "
    "invalid_wr_operations invalid_zone_append_operations invalid_flush_operations "
    "invalid_unmap_operations"
).split()


# The counters qsd-py keeps per node (stats.py), by their word in a row.
_COUNTED = {
    "rd_bytes": RD_BYTES, "wr_bytes": WR_BYTES, "unmap_bytes": UNMAP_BYTES,
    "rd_operations": RD_OPS, "wr_operations": WR_OPS, "flush_operations": FLUSH_OPS,
    "unmap_operations": UNMAP_OPS, "failed_rd_operations": FAILED_RD,
    "failed_wr_operations": FAILED_WR, "failed_flush_operations": FAILED_FLUSH,
    "failed_unmap_operations": FAILED_UNMAP,
}  # fmt: skip


def node_stats(node: BlockNode) -> dict[str, Any]:
    """One node's ``BlockStats`` (QEMU's bdrv_query_bds_stats at node level): its
    ``wr_highest_offset``, its driver's counters, the data child's entry as ``parent``."""
    totals = node.stats.totals()
    counted = {key: totals[word] for key, word in _COUNTED.items()}
    counted["wr_highest_offset"] = node.stats.highest()
    stats: dict[str, Any] = {}
    for key in _ZERO_STATS:  # QEMU's order, idle_time_ns (optional) after unmap_merged
        stats[key] = counted.get(key, 0)
        if key == "unmap_merged" and totals[LAST_IO]:  # as QEMU: once a request was seen
            stats["idle_time_ns"] = max(time.monotonic_ns() - totals[LAST_IO], 0)
    stats.update({"account_invalid": True, "account_failed": True, "timed_stats": []})
    entry: dict[str, Any] = {"node-name": node.node_name, "stats": stats}
    specific = node.specific_stats()
    if specific is not None:
        entry["driver-specific"] = specific
    parent = node.stats_parent()
    if parent is not None:
        entry["parent"] = node_stats(parent)
    return entry


@qmp_command("query-blockstats")
async def query_blockstats(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """With ``query-nodes`` every node in creation order; else the named BlockBackends,
    of which a storage daemon has none (QEMU's answer is empty too)."""
    if not args.get("query-nodes", False):
        return []
    return [node_stats(node) for node in daemon.graph]


@qmp_command("block-set-write-threshold")
async def block_set_write_threshold(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    name = args["node-name"]
    node = daemon.graph.find(name)
    if node is None:
        raise QMPError(f"Device '{name}' not found")
    node.stats.set_threshold(args["write-threshold"], daemon.emit_event, name)
    return {}
