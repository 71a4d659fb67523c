"""QMP commands for snapshots: external (blockdev-snapshot, blockdev-snapshot-sync)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block import external_snapshot
from qsd_py.commands import qmp_command

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


@qmp_command("blockdev-snapshot")
async def blockdev_snapshot(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await external_snapshot.snapshot(daemon.graph, args["node"], args["overlay"])
    return {}


@qmp_command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await external_snapshot.snapshot_sync(daemon.graph, args)
    return {}
