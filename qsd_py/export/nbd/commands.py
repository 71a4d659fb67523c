"""QMP commands of the NBD server: start, stop, and the deprecated add/remove."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py import sockets
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError
from qsd_py.export.nbd.server import start_server, stop_server

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


@qmp_command("nbd-server-start")
async def nbd_server_start(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await start_server(daemon, {**args, "addr": sockets.flatten(args["addr"])}, from_monitor=True)
    return {}


@qmp_command("nbd-server-stop")
async def nbd_server_stop(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await stop_server(daemon)
    return {}


@qmp_command("nbd-server-add")
async def nbd_server_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Deprecated: ``block-export-add type=nbd`` with the export id = the export name (the
    device name by default), and a read-only node exported read-only instead of refused."""
    device = args["device"]
    node = daemon.graph.lookup_device_or_node(device, device)
    name = args.get("name", device)
    opts: dict[str, Any] = {
        "type": "nbd",
        "id": name,
        "node-name": node.node_name,
        "name": name,
        "writable": bool(args.get("writable", False)) and not node.read_only,
    }
    if "description" in args:
        opts["description"] = args["description"]
    if "bitmap" in args:
        opts["bitmaps"] = [args["bitmap"]]
    await daemon.exports.add(opts)
    return {}


@qmp_command("nbd-server-remove")
async def nbd_server_remove(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Deprecated: ``block-export-del`` of an NBD export."""
    name = args["name"]
    for export in daemon.exports:
        if export.id == name and export.type != "nbd":
            raise QMPError(f"Block export '{name}' is not an NBD export")
    await daemon.exports.delete(name, args.get("mode", "safe"))
    return {}
