"""External snapshots (blockdev-snapshot, blockdev-snapshot-sync), as QEMU 11.1 takes them.

An overlay without a backing node takes an image's place: every parent node and every
export of the image now uses the overlay, whose ``backing`` child is the image (QEMU's
bdrv_append). The swap happens under a drain with no await between the checks and the move,
so no request sees half of it. The image is then made read-only (QEMU reopens it so).

What QEMU does and qsd-py follows: blockdev-snapshot leaves the overlay's header as it is
(the backing link is the graph's, not the file's: its ``json:`` name says so until something
writes the header); blockdev-snapshot-sync creates the overlay (unless ``mode`` is existing)
with the old image's file name and format as its backing file, and opens it without a backing
node; an overlay that ends up with no user (the image had neither parent nor export) is
closed again at once. The checks and their texts are QEMU's, in QEMU's order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.drivers import driver_class
from qsd_py.block.reopen import make_read_only
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode


async def snapshot(graph: BlockGraph, node_name: str, overlay_name: str) -> None:
    """blockdev-snapshot: the existing node ``overlay_name`` over ``node_name``."""
    await graph.drain_all()  # QEMU runs the command as a transaction, which drains first
    old = _find(graph, node_name)
    _check_old(old)
    await _flush(old)
    new = _find(graph, overlay_name)
    await append(old, new)


async def snapshot_sync(graph: BlockGraph, args: dict[str, Any]) -> None:
    """blockdev-snapshot-sync: create (or open) the overlay file, then append it."""
    await graph.drain_all()  # QEMU runs the command as a transaction, which drains first
    old, new = await open_sync_overlay(graph, args)
    try:
        await append(old, new)
    finally:
        await drop_overlay(graph, new)


async def drop_overlay(graph: BlockGraph, new: BlockNode) -> None:
    """Close the overlay blockdev-snapshot-sync made if nobody uses it (QEMU frees it), a
    drained section of all nodes as QEMU's closing goes through."""
    await graph.drop_orphan(new)
    if graph.find(new.node_name) is not new:
        await graph.drain_all()


async def open_sync_overlay(graph: BlockGraph, args: dict[str, Any]) -> tuple:
    """blockdev-snapshot-sync's checks, its overlay created and opened: ``(old, new)``."""
    old = graph.lookup_device_or_node(args.get("device"), args.get("node-name"))
    _check_old(old)
    await _flush(old)
    new_name = args.get("snapshot-node-name")
    if "node-name" in args and new_name is None:
        raise QMPError("New overlay node-name missing")
    if new_name is not None and graph.find(new_name) is not None:
        raise QMPError("New overlay node-name already in use")
    fmt = args.get("format", "qcow2")
    path = args["snapshot-file"]
    if args.get("mode", "absolute-paths") != "existing":
        await _create_overlay(graph, old, path, fmt)
    opts: dict[str, Any] = {
        "driver": fmt,
        "read-only": old.read_only,
        "file": {"driver": "file", "filename": path},
    }
    # QEMU opens the overlay with the old node's flags: its cache mode and discard policy.
    for key in ("cache", "discard"):
        if key in old.opts:
            opts[key] = old.opts[key]
    if driver_class(fmt).supports_backing:
        opts["backing"] = None  # QEMU's BDRV_O_NO_BACKING: the old node is the backing
    if new_name is not None:
        opts["node-name"] = new_name
        new = await graph.add(opts)
        new.implicit = True  # not the monitor's: QEMU frees it once nobody uses it
    else:
        new = await graph.add_implicit(opts)
    await graph.drain_all(16)  # QEMU 11.1's image creation and opening, measured
    return old, new


async def append(old: BlockNode, new: BlockNode) -> None:
    """Put ``new`` in ``old``'s place with ``old`` as its backing node (QEMU's checks of the
    overlay, then bdrv_append); then make ``old`` read-only."""
    await attach(old, new)
    await make_read_only(old)


async def attach(old: BlockNode, new: BlockNode) -> None:
    """:meth:`append` but the read-only step (a transaction's prepare; commit does that)."""
    if any(not u.is_parent for u in new.users.values()):
        raise QMPError("The overlay is already in use")
    if new.child_node("backing") is not None:
        raise QMPError("The overlay already has a backing image")
    if not new.supports_backing:
        raise QMPError("The overlay does not support backing images")
    if new is old or new in old.descendants():
        raise QMPError(
            f"Making '{old.node_name}' a backing child of '{new.node_name}' would create a cycle"
        )
    stuck = [u.key for u in old.users.values() if not u.is_parent and u.repoint is None]
    if stuck:  # QEMU moves every user; qsd-py refuses rather than leave one behind
        raise QMPError(f"Node '{old.node_name}' is used by '{stuck[0]}', which cannot follow")
    async with old.drained():
        await new.attach_backing(old)  # type: ignore[attr-defined]
        # No export may write around ``old`` (a queue worker's fast plan) while it moves.
        old.close_fast_writes(append)
        try:
            _move_users(old, new)
        except BaseException:
            new.children.pop("backing").detach()
            raise
        finally:
            old.open_fast_writes(append)
        new.opts = {**new.opts, "backing": old.node_name}
    await old.graph.drain_all(2)  # QEMU 11.1's bdrv_append (the new child, the move)


async def detach(old: BlockNode, new: BlockNode, opts: dict[str, Any]) -> None:
    """Undo :func:`attach` (a transaction's abort): the users go back to ``old``, ``new``
    loses its backing link and gets its options ``opts`` back."""
    async with new.drained():
        old.close_fast_writes(detach)
        try:
            _move_users(new, old)
        finally:
            old.open_fast_writes(detach)
        new.children.pop("backing").detach()
        new.opts = opts


def _move_users(old: BlockNode, new: BlockNode) -> None:
    """Every parent link and every user of ``old`` that can follow now uses ``new`` (no
    await); on a refusal (``new`` cannot grant a permission) the ones moved go back."""
    moved: list[Any] = []
    try:
        for parent in old.parents():
            if parent is new:
                continue
            for child in list(parent.children.values()):
                if child.node is old:
                    child.replace(new)
                    moved.append(child)
        for user in list(old.users.values()):
            if user.is_parent or user.repoint is None:
                continue
            new.set_user(user)
            old.remove_user(user.key)
            moved.append(user)
    except BaseException:
        for item in reversed(moved):
            if hasattr(item, "replace"):
                item.replace(old)
            else:
                old.set_user(item)
                new.remove_user(item.key)
        raise
    for item in moved:
        if not hasattr(item, "replace"):
            item.repoint(new)


def _find(graph: BlockGraph, name: str) -> BlockNode:
    node = graph.lookup_device(name)
    return node


def _check_old(old: BlockNode) -> None:
    """QEMU's op blockers of the snapshotted node: a job's, or another node's backing."""
    for reason in old.blockers.values():
        raise QMPError(f"Node '{old.node_name}' is busy: {reason}")
    blocker = old.backing_blocker()
    if blocker is not None:
        raise QMPError(blocker)


async def _flush(old: BlockNode) -> None:
    if old.read_only:
        return
    try:
        await old.flush()
    except OSError:
        raise QMPError("An IO error has occurred") from None


async def _create_overlay(graph: BlockGraph, old: BlockNode, path: str, fmt: str) -> None:
    """QEMU's bdrv_img_create for the overlay: its checks and texts, then the image, with
    the old node's file name and format as its backing file and the old node's size."""
    try:
        cls = driver_class(fmt)
    except QMPError:
        raise QMPError(f"Unknown file format '{fmt}'") from None
    if not cls.supports_backing:
        raise QMPError(f"Backing file not supported for file format '{fmt}'")
    backing = old.filename()
    if path == backing:
        raise QMPError(
            "Error: Trying to create an image with the same filename as the backing file"
        )
    from qsd_py.block.create import create_file, creator

    await create_file(graph, {"filename": path, "size": 0})
    create = creator(fmt)
    assert create is not None
    await create(
        graph,
        {
            "driver": fmt,
            "file": {"driver": "file", "filename": path},
            "size": old.length(),
            "backing-file": backing,
            "backing-fmt": old.format_name,
        },
    )
