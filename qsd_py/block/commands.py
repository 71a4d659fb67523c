"""QMP commands of the block layer: blockdev-add/-del, query-named-block-nodes, block_resize."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon

_resize_ids = itertools.count()


@qmp_command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.add(args)
    return {}


@qmp_command("blockdev-del")
async def blockdev_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.graph.delete(args["node-name"])
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
    return {}
