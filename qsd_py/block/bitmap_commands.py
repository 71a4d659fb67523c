"""QMP commands of the user's dirty bitmaps: block-dirty-bitmap-add/-remove/-clear/-enable/
-disable/-merge and x-debug-block-dirty-bitmap-sha256, with QEMU's checks in QEMU's order
(block/monitor/bitmap-qmp-cmds.c is the yardstick; the texts were taken from QEMU 11.1).

The bitmaps themselves are :class:`~qsd_py.block.dirty.DirtyBitmap` objects that the node
marks on every write; persistent ones are stored by the node's format on close (qcow2).
The functions below the handlers are what a ``transaction`` action would call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.dirty import DirtyBitmap
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon

MIN_GRANULARITY = 512
MAX_NAME_SIZE = 1023  # QEMU's BDRV_BITMAP_MAX_NAME_SIZE


def lookup(graph: BlockGraph, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """QEMU's block_dirty_bitmap_lookup: the node, then its bitmap."""
    node = graph.find(node_name)
    if node is None:
        raise QMPError(f"Node '{node_name}' not found")
    bitmap = node.dirty_bitmap(name)
    if bitmap is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


def default_granularity(node: BlockNode) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size within [4K, 64K]."""
    cluster = getattr(node, "cluster_size", 0)
    return min(65536, max(4096, cluster)) if cluster else 65536


def add(graph: BlockGraph, args: dict[str, Any]) -> DirtyBitmap:
    """block-dirty-bitmap-add."""
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    node = graph.lookup_device_or_node(args["node"], args["node"])
    if "granularity" in args:
        granularity = args["granularity"]
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node)
    persistent = bool(args.get("persistent", False))
    if persistent:
        if node.read_only:
            raise QMPError(
                f"Cannot add a persistent bitmap to read-only or inactive node '{node.node_name}'"
            )
        node.can_store_dirty_bitmap(name, granularity)
    if node.dirty_bitmap(name) is not None:
        raise QMPError(f"Bitmap already exists: {name}")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise QMPError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(node.length(), granularity, name)
    bitmap.persistent = persistent
    bitmap.enabled = not args.get("disabled", False)
    bitmap.share()  # the queue workers mark it themselves (shared_bits.py)
    node.add_dirty_bitmap(bitmap)
    return bitmap


async def remove(graph: BlockGraph, node_name: str, name: str) -> None:
    """block-dirty-bitmap-remove: a persistent bitmap leaves the image at once."""
    node, bitmap = lookup(graph, node_name, name)
    bitmap.check(only_busy=True)
    if bitmap.persistent:
        if node.read_only:
            raise QMPError(
                f"Cannot remove persistent bitmap '{name}': no write access to node "
                f"'{node.node_name}'"
            )
        await node.remove_persistent_bitmap(bitmap)
    node.remove_dirty_bitmap(bitmap)


def clear(graph: BlockGraph, node_name: str, name: str) -> None:
    """block-dirty-bitmap-clear."""
    _, bitmap = lookup(graph, node_name, name)
    bitmap.check()
    bitmap.clear(0, bitmap.length)


def enable(graph: BlockGraph, node_name: str, name: str, enabled: bool) -> None:
    """block-dirty-bitmap-enable/-disable (a read-only bitmap may be toggled)."""
    node, bitmap = lookup(graph, node_name, name)
    bitmap.check(allow_readonly=True)
    node.enable_dirty_bitmap(bitmap, enabled)


def merged(graph: BlockGraph, node_name: str, target: str, sources: list[Any]) -> tuple:
    """What block-dirty-bitmap-merge would make of ``target``: ``(bitmap, new bits)``, the
    checks in QEMU 11.1's order: for each source in turn its lookup, then the target's
    state, the source's state and their sizes."""
    node, dst = lookup(graph, node_name, target)
    scratch = DirtyBitmap(node.length(), dst.granularity)
    for spec in sources:
        if isinstance(spec, str):
            src = node.dirty_bitmap(spec)
            if src is None:
                raise QMPError(f"Dirty bitmap '{spec}' not found")
        else:
            src = lookup(graph, spec["node"], spec["name"])[1]
        dst.check()
        src.check(allow_readonly=True)
        if dst.length != src.length:
            raise QMPError(_size_error(dst, src))
        scratch.merge_from(src)
    return dst, scratch


def merge(graph: BlockGraph, node_name: str, target: str, sources: list[Any]) -> None:
    """block-dirty-bitmap-merge: the target changes only when every source merged."""
    dst, scratch = merged(graph, node_name, target, sources)
    dst.merge_from(scratch)


def _size_error(dst: DirtyBitmap, src: DirtyBitmap) -> str:
    return (
        f"Bitmaps are of different sizes (destination size is {dst.length}, source size is "
        f"{src.length}) and can't be merged"
    )


# --- the handlers ---------------------------------------------------------------------------


@qmp_command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    add(daemon.graph, args)
    return {}


@qmp_command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await remove(daemon.graph, args["node"], args["name"])
    return {}


@qmp_command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    clear(daemon.graph, args["node"], args["name"])
    return {}


@qmp_command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    enable(daemon.graph, args["node"], args["name"], True)
    return {}


@qmp_command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    enable(daemon.graph, args["node"], args["name"], False)
    return {}


@qmp_command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    merge(daemon.graph, args["node"], args["target"], args["bitmaps"])
    return {}


@qmp_command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    _, bitmap = lookup(daemon.graph, args["node"], args["name"])
    return {"sha256": bitmap.sha256()}
