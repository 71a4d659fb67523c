"""The block graph: every node by name, how nodes are created, looked up and deleted.

Nodes are kept in creation order; ``query-named-block-nodes`` lists them newest first, as
QEMU does. An inline child (raw's ``file`` given as a dict) becomes an implicit node with a
generated ``#blockNNN`` name, owned by its parent and deleted with it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd_py.block.drivers import driver_class
from qsd_py.block.node import BlockNode
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.objects.registry import ObjectRegistry

log = logging.getLogger(__name__)

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'; names are < 32 bytes.
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
NODE_NAME_MAX = 31

# Options an inline child takes from its parent unless it sets them itself (QEMU's rules).
_INHERITED = ("read-only", "auto-read-only", "discard", "force-share")
_INHERITED_CACHE = ("direct", "no-flush")


def id_wellformed(name: str) -> bool:
    """QEMU's rule for user-given ids (node names, job ids)."""
    return _NODE_NAME.match(name) is not None


def check_node_name(name: str) -> None:
    """Raise QEMU's error for a malformed name (the duplicate check is the graph's)."""
    if not id_wellformed(name):
        raise QMPError(f"Invalid node-name: '{name}'")


def check_base_options(opts: dict[str, Any]) -> None:
    """Options every driver shares, refused as QEMU refuses them (or, for detect-zeroes,
    which qsd-py does not implement, refused rather than silently ignored)."""
    if opts.get("force-share") and not opts.get("read-only"):
        raise QMPError("force-share=on can only be used with read-only images")
    detect = opts.get("detect-zeroes", "off")
    if detect == "unmap" and opts.get("discard") != "unmap":
        raise QMPError(
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"
        )
    if detect != "off":
        raise QMPError(f"detect-zeroes={detect} is not supported by qsd-py")


def inherit_options(child: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """The options of an inline child: its own, plus what it inherits from ``parent``."""
    opts = dict(child)
    for key in _INHERITED:
        if key not in opts and key in parent:
            opts[key] = parent[key]
    # Lower layers unmap by default: the parent's own discard setting filters requests.
    opts.setdefault("discard", "unmap")
    cache = dict(opts.get("cache", {}))
    for key in _INHERITED_CACHE:
        if key not in cache and key in parent.get("cache", {}):
            cache[key] = parent["cache"][key]
    if cache:
        opts["cache"] = cache
    return opts


class BlockGraph:
    """All block nodes of a daemon."""

    def __init__(self) -> None:
        self._nodes: dict[str, BlockNode] = {}
        self._next_id = 0
        # How nodes send QMP events (BLOCK_IMAGE_CORRUPTED); the daemon sets its emitter.
        self.emit_event: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        # The daemon's objects (an nbd node's tls-creds), set by the daemon.
        self.objects: ObjectRegistry | None = None
        # How many blkdebug nodes are open: the drivers' debug-event hooks
        # (BlockNode.debug_event) cost one test of this while it is 0.
        self.debug_nodes = 0
        # Who takes part in a drained section of every node (QEMU's bdrv_drain_all_begin):
        # each hook, given the nodes in creation order (and whether they are all nodes, or
        # a drained node and those above it), begins its part and returns the coroutine
        # function that ends it. The
        # daemon adds its block jobs' (they pause there, with events).
        self.drain_all_hooks: list[
            Callable[[list[BlockNode], bool], Awaitable[Callable[[], Awaitable[None]]]]
        ] = []

    def __iter__(self):
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    # --- drain ----------------------------------------------------------------------------
    async def drain_all(self, times: int = 1, above: BlockNode | None = None) -> None:
        """``times`` drained sections of every node, one after the other, as QEMU 11.1's
        commands go through them (each graph change under its graph lock drains all nodes,
        some commands drain all explicitly). What users see of them: each running block job
        pauses and resumes once per section (``JOB_STATUS_CHANGE`` ``paused``/``running``,
        ``standby``/``ready``); the counts per command are measured on QEMU 11.1.
        ``above``: drained sections of that node only, which reach the users of it and of
        the nodes above it (QEMU's bdrv_drained_begin; only the jobs take part here)."""
        for _ in range(times if self.drain_all_hooks else 0):
            async with self.drained_all(above):
                pass

    @contextlib.asynccontextmanager
    async def drained_all(self, above: BlockNode | None = None) -> AsyncIterator[None]:
        """One drained section of every node (``above``: of that node), held while the
        body runs: what QEMU does in the section (nested drains among it) happens with the
        jobs paused once."""
        nodes = list(self._nodes.values()) if above is None else above.nodes_above()
        ends = [await hook(nodes, above is None) for hook in list(self.drain_all_hooks)]
        try:
            yield
        finally:
            for end in reversed(ends):
                await end()

    # --- creation -------------------------------------------------------------------------
    async def add(self, opts: dict[str, Any]) -> BlockNode:
        """Create, open and register a node from validated ``BlockdevOptions``
        (blockdev-add, --blockdev). Its inline children are created first."""
        if "node-name" not in opts:
            raise QMPError("'node-name' must be specified for the root node")
        return await self._create(opts, implicit=False)

    async def open_child(self, parent: BlockNode, ref: str | dict[str, Any]) -> BlockNode:
        """Resolve a ``BlockdevRef``: an existing node's name, or an inline dict that
        becomes an implicit node. The parent attaches itself to the result."""
        if isinstance(ref, str):
            node = self._nodes.get(ref)
            if node is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        return await self._create(inherit_options(ref, parent.opts), implicit=True)

    async def open_ref(self, ref: str | dict[str, Any]) -> BlockNode:
        """A ``BlockdevRef`` of a command (blockdev-create): an existing node's name, or an
        inline dict that becomes an implicit node; :meth:`drop_orphan` closes the latter once
        the command lets go of it."""
        if isinstance(ref, str):
            node = self._nodes.get(ref)
            if node is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        return await self._create(inherit_options(ref, {}), implicit=True)

    async def add_implicit(self, opts: dict[str, Any]) -> BlockNode:
        """A node with a generated name for a command's own use (blockdev-create opens the
        new image); :meth:`drop_orphan` closes it."""
        return await self._create(opts, implicit=True)

    async def _create(self, opts: dict[str, Any], implicit: bool) -> BlockNode:
        name = opts.get("node-name")
        if name is None:
            name = self._generate_name()
        else:
            self.check_new_name(name)
        check_base_options(opts)
        node = driver_class(opts["driver"])(self, {**opts, "node-name": name})
        node.implicit = implicit
        try:
            await node.open()
            self.register(node)
        except BaseException:
            if self._nodes.get(name) is node:
                del self._nodes[name]
            await self._dispose(node)
            raise
        return node

    def register(self, node: BlockNode) -> None:
        """List ``node`` among the graph's nodes. A node is listed once open, or earlier if
        its driver says so: QEMU names a format node after its file child and before its
        backing chain, and ``query-named-block-nodes`` shows that order."""
        other = self._nodes.get(node.node_name)
        if other is node:
            return
        if other is not None:  # a child may have taken the name meanwhile
            raise QMPError(f"Duplicate nodes with node-name='{node.node_name}'")
        self._nodes[node.node_name] = node

    def unregister(self, node: BlockNode) -> None:
        """Take ``node`` off the list (a job's filter that caches nothing and has let go
        of its children)."""
        if self._nodes.get(node.node_name) is node:
            del self._nodes[node.node_name]

    def check_new_name(self, name: str) -> None:
        """Refuse a name a new node cannot take, with QEMU's texts."""
        check_node_name(name)
        if name in self._nodes:
            raise QMPError(f"Duplicate nodes with node-name='{name}'")
        if len(name.encode()) > NODE_NAME_MAX:
            raise QMPError("Node name too long")

    def generate_name(self) -> str:
        """A fresh generated name (``#blockNNN``), as QEMU gives implicit nodes."""
        return self._generate_name()

    def _generate_name(self) -> str:
        """QEMU's generated names: ``#block`` and a counter (never a valid user name)."""
        while True:
            name = f"#block{self._next_id:03d}"
            self._next_id += 1
            if name not in self._nodes:
                return name

    # --- lookup ---------------------------------------------------------------------------
    def find(self, name: str) -> BlockNode | None:
        return self._nodes.get(name)

    def lookup(self, name: str) -> BlockNode:
        """The node called ``name`` (exports, commands), or QEMU's error."""
        node = self._nodes.get(name)
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{name}'")
        return node

    def lookup_device(self, name: str) -> BlockNode:
        """The node ``name`` where QEMU takes a device or a node name in one argument (its
        error names both), or QEMU's error."""
        node = self._nodes.get(name)
        if node is None:
            raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def lookup_device_or_node(self, device: str | None, node_name: str | None) -> BlockNode:
        """QEMU's lookup by ``device`` (qsd has no devices) or ``node-name``."""
        node = self._nodes.get(node_name) if node_name is not None else None
        if node is None:
            raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
        return node

    # --- deletion -------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        """blockdev-del: refuse nodes in use, else close the node and its implicit children."""
        node = self._nodes.get(name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{name}'")
        err = node.in_use_error()
        if err is not None:
            raise QMPError(err)
        await self._remove(node)

    async def drop_orphan(self, node: BlockNode) -> None:
        """Close an implicit node once no parent uses it (after a child was replaced)."""
        if node.implicit and not node.users and node.node_name in self._nodes:
            await self._remove(node)

    async def _remove(self, node: BlockNode) -> None:
        self._nodes.pop(node.node_name, None)
        await self._dispose(node)

    async def _dispose(self, node: BlockNode) -> None:
        """Write back what ``node`` caches, close it, let go of its children and remove the
        implicit ones."""
        children = [child.node for child in node.children.values()]
        try:
            await node.prepare_close()
        except Exception:  # noqa: BLE001 - the node is closed all the same, as in QEMU
            log.exception("error while writing back node %s", node.node_name)
        try:
            node.close()
        finally:
            node.detach_children()
            for bitmap in node.dirty_bitmaps:
                bitmap.unshare()  # the user's bitmaps go with their node
        for child in children:
            await self.drop_orphan(child)

    async def close_all(self) -> None:
        """Shutdown: close every node, parents before their children."""
        for node in reversed(list(self._nodes.values())):
            if node.node_name not in self._nodes:
                continue
            try:
                await self._remove(node)
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("error while closing node %s", node.node_name)

    # --- introspection --------------------------------------------------------------------
    def query(self, flat: bool = False) -> list[dict[str, Any]]:
        """query-named-block-nodes: ``BlockDeviceInfo`` of every node, newest first."""
        return [node.info(flat) for node in reversed(list(self._nodes.values()))]
