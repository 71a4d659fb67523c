"""QMP commands for snapshots: external (blockdev-snapshot, blockdev-snapshot-sync) and
internal (blockdev-snapshot-internal-sync, blockdev-snapshot-delete-internal-sync)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from qsd_py.block import external_snapshot
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

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


# --- internal snapshots ---------------------------------------------------------------------
def _snapshot_node(daemon: Daemon, device: str) -> Any:
    """The node by name, refused with QEMU's texts while a job or an overlay blocks it."""
    node = daemon.graph.lookup_device(device)
    for reason in node.blockers.values():
        raise QMPError(f"Node '{device}' is busy: {reason}")
    blocker = node.backing_blocker()
    if blocker is not None:
        raise QMPError(blocker)
    return node


@qmp_command("blockdev-snapshot-internal-sync")
async def blockdev_snapshot_internal_sync(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await take_internal(daemon, args)
    return {}


async def take_internal(daemon: Daemon, args: dict[str, Any]) -> Any:
    """QEMU's internal_snapshot_action: checks in its order, then the driver's snapshot;
    the node (a transaction deletes the snapshot again on abort)."""
    from qsd_py.block.qcow2 import internal_snapshots as isn
    from qsd_py.block.qcow2.snapshots import Qcow2Snapshot

    device, name = args["device"], args["name"]
    node = _snapshot_node(daemon, device)
    if node.read_only:
        raise QMPError(f"Device '{device}' is read only")
    if not hasattr(node, "snapshots") or not node.active:
        raise QMPError(
            f"Block format '{node.format_name}' used by device '{device}' does not support "
            "internal snapshots"
        )
    if not name:
        raise QMPError("Name is empty")
    if isn.find(node.snapshots, None, name) >= 0:
        raise QMPError(f"Snapshot with name '{name}' already exists on device '{device}'")
    real_us = time.time_ns() // 1000  # QEMU's g_get_real_time(); its VM clock is the same
    sn = Qcow2Snapshot(l1_table_offset=0, l1_size=0, id="", name=name,
                       date_sec=real_us // 1_000_000, date_nsec=real_us % 1_000_000 * 1000,
                       vm_clock_nsec=time.time_ns() // 1000 * 1000)  # fmt: skip
    try:
        await isn.create(node, sn)
    except OSError as err:
        raise QMPError(
            f"Failed to create snapshot '{name}' on device '{device}': {_strerror(err)}"
        ) from None
    return node


@qmp_command("blockdev-snapshot-delete-internal-sync")
async def blockdev_snapshot_delete_internal_sync(
    daemon: Daemon, args: dict[str, Any]
) -> dict[str, Any]:
    """QEMU's checks in its order, then the driver's deletion; the deleted snapshot's
    SnapshotInfo."""
    from qsd_py.block.qcow2 import internal_snapshots as isn
    from qsd_py.block.qcow2.header import Qcow2Error
    from qsd_py.block.qcow2.introspect import snapshot_info

    device, sn_id, name = args["device"], args.get("id"), args.get("name")
    node = daemon.graph.lookup_device(device)
    if sn_id is None and name is None:
        raise QMPError("Name or id must be provided")
    _snapshot_node(daemon, device)
    if not hasattr(node, "snapshots"):
        raise QMPError("Failed to get a snapshot list: Operation not supported")
    index = isn.find(node.snapshots, sn_id, name)
    if index < 0:
        raise QMPError(
            f"Snapshot with id '{_or_null(sn_id)}' and name '{_or_null(name)}' does not exist "
            f"on device '{device}'"
        )
    info = snapshot_info(node.snapshots[index])
    if node.read_only:  # the table cannot be written; QEMU's list forgets it all the same
        isn.forget(node, index)
        raise QMPError("Failed to remove snapshot from snapshot list: Operation not permitted")
    try:
        await isn.delete(node, index)
    except Qcow2Error as err:
        raise QMPError(str(err)) from None
    except OSError as err:
        raise QMPError(err.strerror if err.errno is None else _text(err)) from None
    return info


def _or_null(value: str | None) -> str:
    return "null" if value is None else value


def _strerror(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


def _text(err: OSError) -> str:
    """A SnapshotError carries QEMU's whole text; anything else is an I/O error."""
    return err.strerror or _strerror(err)


# --- reopen and activation ----------------------------------------------------------------
@qmp_command("blockdev-reopen")
async def blockdev_reopen(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    from qsd_py.block.reopen import reopen

    await reopen(daemon.graph, args["options"])
    return {}


@qmp_command("blockdev-set-active")
async def blockdev_set_active(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    from qsd_py.block.reopen import set_active

    await set_active(daemon.graph, args.get("node-name"), args["active"])
    return {}
