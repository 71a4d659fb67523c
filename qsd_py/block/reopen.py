"""Changing open nodes in place: QEMU's reopen (blockdev-reopen, and the read-only reopen
after an external snapshot) and its activation state (blockdev-set-active).

Read-only: a node going read-only writes back what it caches and its lock no longer claims
writes; one going read-write gets a writable file descriptor and does what opening it for
writing does (qcow2: header fix-ups, the dirty bit's repair). The implicit children the node
opened itself (its ``file``) inherit the change, as QEMU's reopen passes inherited options
down; children given by reference keep their own state.

blockdev-reopen takes every option anew (an option left out takes its default). qsd-py
changes in place: ``read-only``, the ``backing`` child (a node, or null), the ``file`` child
(another node by name, as QEMU: the format keeps what it read from the old file), ``discard``
and the runtime options a driver re-reads; it refuses what QEMU refuses (``driver``,
``force-share``, a ``backing`` left out while the node has one, an inline ``file``, a file
node's ``filename``/``aio``/``locking`` changed, its ``drop-cache`` reset) with QEMU's texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.graph import check_base_options
from qsd_py.block.perm import Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode


def has_writer(node: BlockNode) -> bool:
    """Whether some user holds the write permission on ``node``."""
    return any(u.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) for u in node.users.values())


async def make_read_only(node: BlockNode) -> bool:
    """Write back what ``node`` caches and make it (and its implicit children) read-only;
    False, with nothing changed, where a user still writes it."""
    if node.read_only:
        return True
    if has_writer(node):
        return False
    await node.prepare_close()  # caches, the dirty bit, the file's length as QEMU leaves it
    table = getattr(node, "table", None)
    if table is not None:  # no fast-path writer may keep a writable entry of it
        table.clear_all()
        await table.barrier()
    node.read_only = True
    node.opts = {**node.opts, "read-only": True}
    node.refresh_perms()  # children lose the write permission first
    for child in list(node.children.values()):
        if child.node.implicit:
            await make_read_only(child.node)
    return True


async def make_writable(node: BlockNode) -> None:
    """Read-only to read-write: the implicit storage children first, then the node's own
    permissions (a read-only child refuses with QEMU's text) and its driver's steps."""
    if not node.read_only:
        return
    for role, child in list(node.children.items()):
        if role != "backing" and child.node.implicit:
            await make_writable(child.node)
    node.read_only = False
    try:
        node.refresh_perms()
        hook = getattr(node, "reopen_writable", None)
        if hook is not None:
            await hook()
    except BaseException:
        node.read_only = True
        node.refresh_perms()
        raise
    node.opts = {**node.opts, "read-only": False}


# --- blockdev-reopen ----------------------------------------------------------------------------
async def reopen(graph: BlockGraph, entries: list[dict[str, Any]]) -> None:
    """Check every entry (QEMU's texts), then apply them in order. A node named twice takes
    its entries merged, the later one's options winning (as QEMU's reopen queue does)."""
    merged: dict[Any, dict[str, Any]] = {}
    for opts in entries:
        key = opts.get("node-name", object())
        merged[key] = {**merged.get(key, {}), **opts}
    for opts in merged.values():  # QEMU looks up every node before it drains them all
        _find_node(graph, opts)
    await graph.drain_all()
    plans = [_plan(graph, opts) for opts in merged.values()]
    files = [_plan_file(graph, node, opts) for node, opts, _ in plans]
    for (node, opts, backing), file in zip(plans, files, strict=True):
        if file is not None:  # first: a refusal of the new file changes nothing
            async with node.drained():
                await node.replace_child("file", file)
        await _apply(graph, node, opts, backing)


_UNSET = object()


def _find_node(graph: BlockGraph, opts: dict[str, Any]) -> BlockNode:
    """The node an entry reopens, or QEMU's error."""
    name = opts.get("node-name")
    if name is None:
        raise QMPError("node-name not specified")
    node = graph.find(name)
    if node is None:
        raise QMPError(f"Failed to find node with node-name='{name}'")
    return node


def _plan(graph: BlockGraph, opts: dict[str, Any]) -> tuple[BlockNode, dict[str, Any], Any]:
    """The node, its new options, and its new backing node (None: none; _UNSET: keep)."""
    node = _find_node(graph, opts)
    name = node.node_name
    if opts["driver"] != node.driver:
        raise QMPError("Cannot change the option 'driver'")
    if bool(opts.get("force-share", False)) != node.force_share:
        raise QMPError("Cannot change the option 'force-share'")
    check_base_options(opts)
    backing: Any = _UNSET
    if node.supports_backing:
        if "backing" not in opts:
            named = getattr(getattr(node, "header", None), "backing_name", None)
            if node.child_node("backing") is not None or named:
                raise QMPError(f"backing is missing for '{name}'")
        elif opts["backing"] is None:
            backing = None
        else:
            backing = _lookup(graph, opts["backing"])
            if backing is node or node in backing.descendants():
                raise QMPError(
                    f"Making '{backing.node_name}' a backing child of '{name}' would create a cycle"
                )
    _check_fixed(node, opts)
    if "data-file" in opts and _changes(graph, node, "data-file", opts["data-file"]):
        raise QMPError("Cannot change the option 'data-file'")
    if opts.get("read-only", False) and not node.read_only and has_writer(node):
        raise QMPError(f"Read-only block node '{name}' cannot support read-write users")
    return node, opts, backing


# A file node's options QEMU 11.1 cannot change in a reopen (given, they must equal what the
# node was opened with), and those it keeps once set (left out later: refused).
_FIXED = {"file": ("filename", "aio", "locking", "aio-max-batch", "pr-manager")}
_NO_RESET = {"file": ("drop-cache", "x-check-cache-dropped")}


def qdict_order(keys: Any) -> list[str]:
    """``keys`` in the order QEMU's QDict lists them (its hash buckets, tdb_hash modulo
    512): QEMU checks reopen options in that order, so the first refused is named."""

    def bucket(key: str) -> int:
        value = 0x238F13AF * len(key) & 0xFFFFFFFF
        for i, byte in enumerate(key.encode()):
            value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512

    return sorted(keys, key=bucket)


def _check_fixed(node: BlockNode, opts: dict[str, Any]) -> None:
    """QEMU's checks of the options a driver does not change: one kept since it was set
    may not be left out (``drop-cache``), one fixed at open may not be given otherwise."""
    for key in qdict_order(_NO_RESET.get(node.driver, ())):
        if key in node.opts and key not in opts:
            raise QMPError(f"Option '{key}' cannot be reset to its default value")
    fixed = [k for k in _FIXED.get(node.driver, ()) if k in opts]
    for key in qdict_order(fixed):
        if opts[key] != node.opts.get(key):
            raise QMPError(f"Cannot change the option '{key}'")


def _plan_file(graph: BlockGraph, node: BlockNode, opts: dict[str, Any]) -> BlockNode | None:
    """The node a format node's ``file`` child is to become, or None to keep it. QEMU
    11.1 swaps it for any node by name (the format keeps what it read from the old one:
    the new file should hold the same image); an inline definition is refused."""
    if "file" not in opts or node.children.get("file") is None:
        return None
    value = opts["file"]
    name = node.node_name
    if isinstance(value, dict):
        first = qdict_order(f"file.{key}" for key in _flat_keys(value))[0]
        raise QMPError(f"Cannot change the option '{first}'")
    new = _lookup(graph, value)
    if new is node.child_node("file"):
        return None
    if new is node or node in new.descendants():
        raise QMPError(f"Making '{new.node_name}' a file child of '{name}' would create a cycle")
    if new.read_only and not opts.get("read-only", False):
        raise QMPError("Block node is read-only")
    return new


def _flat_keys(value: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            out.extend(_flat_keys(item, f"{prefix}{key}."))
        else:
            out.append(prefix + key)
    return out


def _changes(graph: BlockGraph, node: BlockNode, key: str, value: Any) -> bool:
    """Whether ``value`` names something else than what ``key`` is now."""
    if key == "filename":
        return value != node.opts.get("filename")
    child = node.child_node(key)
    if isinstance(value, str):
        return _lookup(graph, value) is not child
    return True  # an inline definition is a new node


def _lookup(graph: BlockGraph, name: str) -> BlockNode:
    node = graph.find(name)
    if node is None:
        raise QMPError(f"Cannot find device='' nor node-name='{name}'")
    return node


async def _apply(graph: BlockGraph, node: BlockNode, opts: dict[str, Any], backing: Any) -> None:
    """Backing child, then read-only state, then the options kept by the node."""
    if backing is not _UNSET and backing is not node.child_node("backing"):
        await _set_backing(graph, node, backing)
    if opts.get("read-only", False):
        if not await make_read_only(node):
            name = node.node_name
            raise QMPError(f"Read-only block node '{name}' cannot support read-write users")
    else:
        await make_writable(node)
    keep = {k: node.opts[k] for k in ("data-file",) if k in node.opts}
    if "file" in node.opts:  # by name now, as QEMU's options say after a swap
        keep["file"] = opts["file"] if isinstance(opts.get("file"), str) else node.opts["file"]
    node.opts = {**opts, **keep, "backing": _backing_opt(node)} if node.supports_backing else {
        **opts, **keep}  # fmt: skip
    node.discard_unmap = opts.get("discard", "ignore") == "unmap"
    hook = getattr(node, "reopen_options", None)
    if hook is not None:
        hook()


def _backing_opt(node: BlockNode) -> Any:
    child = node.child_node("backing")
    return None if child is None else child.node_name


async def _set_backing(graph: BlockGraph, node: BlockNode, new: BlockNode | None) -> None:
    """Point the ``backing`` child at ``new`` (None: detach), drained."""
    old = node.children.get("backing")
    old_node = None if old is None else old.node
    async with node.drained():
        if new is None:
            assert old is not None
            old.detach()
            del node.children["backing"]
        elif old is None:
            await node.attach_backing(new)  # type: ignore[attr-defined]
        else:
            old.replace(new)
    if old_node is not None:  # one the node opened itself goes with it, as in QEMU
        await graph.drop_orphan(old_node)


# --- blockdev-set-active ------------------------------------------------------------------------
async def set_active(graph: BlockGraph, node_name: str | None, active: bool) -> None:
    """Activate or inactivate one node and the nodes below it, or every node. Inactivating
    writes back what the nodes cache and lets go of their image locks (another process may
    take the image); a user that may write or resize (a writable export) refuses it, with
    QEMU's text."""
    if node_name is not None:
        top = graph.find(node_name)
        if top is None:
            raise QMPError(f"Failed to find node with node-name='{node_name}'")
        nodes = [top, *top.descendants()]
        what = "Failed to inactivate node"
    else:
        nodes = list(graph)
        what = "Failed to inactivate all nodes"
    if active:
        for node in reversed(nodes):
            await _activate(node)
        return
    for node in nodes:
        if any(not u.is_parent and u.perm & ~Perm.CONSISTENT_READ for u in node.users.values()):
            raise QMPError(f"{what}: Operation not permitted")
    for node in nodes:
        await _inactivate(node)


async def _inactivate(node: BlockNode) -> None:
    if not node.active:
        return
    await node.prepare_close()  # caches written back, a lazy dirty bit cleared
    table = getattr(node, "table", None)
    if table is not None:
        table.clear_all()
        await table.barrier()
    node.active = False
    node.refresh_perms()  # a file node lets go of its lock bytes


async def _activate(node: BlockNode) -> None:
    if node.active:
        return
    node.active = True
    try:
        node.refresh_perms()  # the lock bytes again (another holder refuses, QEMU's text)
    except BaseException:
        node.active = False
        node.refresh_perms()
        raise
    reload = getattr(node, "reactivate", None)
    if reload is not None:  # the image may have been changed meanwhile
        await reload()
