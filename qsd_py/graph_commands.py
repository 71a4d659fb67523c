"""QMP commands on the whole block graph with its users: x-debug-query-block-graph,
x-blockdev-change, x-blockdev-set-iothread.

They sit above the block layer because they see what uses the nodes: exports (QEMU: one
anonymous BlockBackend each, with a ``root`` edge) and block jobs (a ``block-job`` vertex with
an edge per node the job holds, named as the job names its use of it; what a job holds as
``root`` is its own BlockBackend, as a mirror's target).

x-debug-query-block-graph numbers the vertices as QEMU does (``id`` in order of first
mention: the BlockBackends and their root nodes, the jobs, then every node in creation order
with its children) and lists vertices and edges newest first, as QEMU builds its lists by
prepending. A job's users are its edges, those that stand for QEMU's parent-like links too
(a mirror's ``source``, which must look like a parent to blockdev-del).

x-blockdev-set-iothread: a qsd-py node serves requests from any loop (node.py's contract),
so "moving" a node records which iothread its connected nodes belong to, after QEMU's checks:
a node used by an export or job needs ``force``, and an export with ``fixed-iothread`` on
another thread refuses the move. As in QEMU, an export made later does not pick it up
unless given ``iothread`` (qsd-py serves on the loop the export names).
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any

from qsd_py.block.perm import PERM_NAMES, Perm
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon

# QEMU's BlockPermission names, by bit.
_QAPI_PERM = {bit: name.replace(" ", "-") for bit, name in PERM_NAMES}
_ROLE = re.compile(r"as '(.*)' child\)$")

#: The iothread each node was moved to (absent: the main loop).
NODE_IOTHREADS: weakref.WeakKeyDictionary[BlockNode, str] = weakref.WeakKeyDictionary()


def _perm_list(perm: Perm) -> list[str]:
    """QEMU's list: the bits from the highest down (it prepends in bit order)."""
    return [name for bit, name in reversed(list(_QAPI_PERM.items())) if perm & bit]


class _Graph:
    """QEMU's XDbgBlockGraphConstructor: ids in order of first mention."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []

    def num(self, obj: object) -> int:
        return self.ids.setdefault(id(obj), len(self.ids) + 1)

    def vertex(self, obj: object, kind: str, name: str) -> None:
        self.nodes.insert(0, {"id": self.num(obj), "type": kind, "name": name})

    def edge(self, parent: object, child: object, name: str, perm: Perm, shared: Perm) -> None:
        self.edges.insert(0, {
            "parent": self.num(parent), "child": self.num(child), "name": name,
            "perm": _perm_list(perm), "shared-perm": _perm_list(shared),
        })  # fmt: skip


@qmp_command("x-debug-query-block-graph")
async def x_debug_query_block_graph(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    g = _Graph()
    jobs: dict[str, list[tuple[BlockNode, Any, str]]] = {}
    backends: list[tuple[object, BlockNode, Any]] = []
    export_keys = {(e.node.node_name, e.id): e for e in daemon.exports}
    for export in daemon.exports:
        user = export.node.users.get(export.id)
        if user is not None:
            backends.append((export, export.node, user))
    held: dict[str, list[BlockNode]] = {}
    for job in _block_jobs(daemon):
        jobs[job.id] = []
        held[job.id] = job.nodes_used()
    for node in daemon.graph:
        for key, user in node.users.items():
            job_id = key.split(":")[1] if key.startswith("job:") else None
            if (user.is_parent and job_id is None) or (node.node_name, key) in export_keys:
                continue
            match = _ROLE.search(user.description)
            role = match.group(1) if match else ""
            if job_id is not None and role != "root":
                jobs.setdefault(job_id, []).append((node, user, role))
            else:  # a job's own BlockBackend (its "root"), or a command's temporary user
                backends.append((user, node, user))
    for owner, node, user in backends:
        g.vertex(owner, "block-backend", "")
        g.edge(owner, node, "root", user.perm, user.shared)
    for job_id, used in jobs.items():
        g.vertex(job_id, "block-job", job_id)
        order = held.get(job_id, [])
        # QEMU lists a job's edges in the order it took the nodes: emitted newest first
        used.sort(key=lambda e: -order.index(e[0]) if e[0] in order else 0)
        for node, user, role in used:
            g.edge(job_id, node, role, user.perm, user.shared)
    for node in daemon.graph:
        g.vertex(node, "block-driver", node.node_name)
        for role, child in reversed(node.children.items()):
            g.edge(node, child.node, role, child.perm, child.shared)
    return {"nodes": g.nodes, "edges": g.edges}


def _block_jobs(daemon: Daemon) -> list[Any]:
    """The block jobs (QEMU's block_job_next: not blockdev-create's job), oldest first."""
    from qsd_py.jobs.blockjob import BlockJob

    return [job for job in daemon.jobs if isinstance(job, BlockJob)]


@qmp_command("x-blockdev-change")
async def x_blockdev_change(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """QEMU changes children only of quorum nodes; qsd-py has no driver that can, so after
    QEMU's lookups every request is refused with QEMU's text."""
    name = args["parent"]
    parent = daemon.graph.lookup_device(name)
    child, node = args.get("child"), args.get("node")
    if (child is None) == (node is None):
        if child is not None:
            raise QMPError("The parameters child and node are in conflict")
        raise QMPError("Either child or node must be specified")
    if child is not None:
        if child not in parent.children:
            raise QMPError(f"Node '{name}' does not have child '{child}'")
        raise QMPError(f"The node {name} does not support removing a child")
    if daemon.graph.find(node) is None:
        raise QMPError(f"Node '{node}' not found")
    raise QMPError(f"The node {name} does not support adding a child")


def _component(node: BlockNode) -> list[BlockNode]:
    """Every node connected to ``node`` through parent/child links (one AioContext in
    QEMU: a move takes them all)."""
    seen: list[BlockNode] = []
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.append(n)
        todo.extend(c.node for c in n.children.values())
        todo.extend(n.parents())
    return seen


@qmp_command("x-blockdev-set-iothread")
async def x_blockdev_set_iothread(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    name = args["node-name"]
    node = daemon.graph.find(name)
    if node is None:
        raise QMPError(f"Failed to find node with node-name='{name}'")
    if not args.get("force", False) and any(not u.is_parent for u in node.users.values()):
        raise QMPError(
            f"Node {name} is associated with a BlockBackend and could be in use "
            "(use force=true to override this check)"
        )
    target = args["iothread"]
    if target is not None and not _is_iothread(daemon, target):
        raise QMPError(f"Cannot find iothread {target}")
    nodes = _component(node)
    if _current(daemon, nodes) == target:
        return {}  # already there: nothing to ask anyone
    for export in daemon.exports:
        if export.node in nodes and export.opts.get("fixed-iothread", False):
            raise QMPError("Cannot change iothread of active block backend")
    for n in nodes:
        if target is None:
            NODE_IOTHREADS.pop(n, None)
        else:
            NODE_IOTHREADS[n] = target
    return {}


def _current(daemon: Daemon, nodes: list[BlockNode]) -> str | None:
    """The iothread the nodes are in: an export's that serves one of them from its
    ``iothread`` (QEMU moves the nodes there), else where they were moved."""
    for export in daemon.exports:
        spec = export.opts.get("iothread")
        if export.node in nodes and isinstance(spec, str):
            return spec
    return NODE_IOTHREADS.get(nodes[0])


def _is_iothread(daemon: Daemon, name: str) -> bool:
    try:
        daemon.objects.iothread(name)
    except QMPError:
        return False
    return True
