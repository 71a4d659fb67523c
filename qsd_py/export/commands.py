"""QMP commands of the export layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


@qmp_command("block-export-add")
async def block_export_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.add(args)
    return {}


@qmp_command("block-export-del")
async def block_export_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.exports.delete(args["id"], args.get("mode", "safe"))
    return {}


@qmp_command("query-block-exports")
async def query_block_exports(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.exports.query()
