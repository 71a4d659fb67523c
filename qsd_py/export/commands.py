"""QMP commands of the export layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

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


@qmp_command("x-query-fuse-queues")
async def x_query_fuse_queues(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-queue counters of FUSE exports: the proof of which transport moved the bytes."""
    if "id" in args:
        export = daemon.exports.get(args["id"])
        if export.type != "fuse":
            raise QMPError(f"Export '{args['id']}' is not a FUSE export")
        exports = [export]
    else:
        exports = [e for e in reversed(list(daemon.exports)) if e.type == "fuse"]
    keys = ("id", "transport", "queues", "uring-queues")
    return [{k: v for k, v in e.stats().items() if k in keys} for e in exports]  # type: ignore[attr-defined]
