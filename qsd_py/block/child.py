"""A parent node's link to a child node, in the spirit of QEMU's BdrvChild.

A format node reaches the nodes below it only through its children: ``file`` (the image's
own bytes), ``backing`` (what unallocated ranges read through to) and ``data-file`` (qcow2's
external data). The link carries the permissions the parent holds on the child, as a
:class:`~qsd_py.block.perm.NodeUser` of the child, so permission conflicts and image locks see
every parent. Block jobs swap what a link points at (:meth:`Child.replace`) while the graph
is drained; nothing else holds on to a child node directly, so a swap is seen everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd_py.block.perm import NodeUser, Perm

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode


class Child:
    """``parent`` uses ``node`` in ``role`` with permissions ``perm``, sharing ``shared``."""

    __slots__ = ("parent", "role", "node", "perm", "shared")

    def __init__(self, parent: BlockNode, role: str, node: BlockNode) -> None:
        self.parent = parent
        self.role = role
        self.node = node
        self.perm = Perm(0)
        self.shared = Perm(0)

    @property
    def key(self) -> str:
        """The key of this link among the child's users (one per parent and role)."""
        return f"node:{self.parent.node_name}:{self.role}"

    def _user(self, node: BlockNode) -> NodeUser:
        desc = (
            f"node '{self.parent.node_name}' (uses node '{node.node_name}' as '{self.role}' child)"
        )
        return NodeUser(self.key, self.perm, self.shared, desc, is_parent=True)

    def set_perms(self, perm: Perm, shared: Perm) -> None:
        """Hold ``perm`` on the child and share ``shared``; on a conflict the child refuses
        with QEMU's text and the link keeps its old permissions."""
        old = self.perm, self.shared
        self.perm, self.shared = perm, shared
        try:
            self.node.set_user(self._user(self.node))
        except BaseException:
            self.perm, self.shared = old
            raise

    def replace(self, new: BlockNode) -> BlockNode:
        """Point this link at ``new`` (a pivot), carrying the permissions over: ``new`` must
        grant them first, so a refusal leaves the link as it was. Returns the old node.
        The caller drains both nodes around the swap."""
        new.set_user(self._user(new))
        old, self.node = self.node, new
        old.remove_user(self.key)
        self.parent.fast_plans_changed()  # exports' plans through this link are stale
        return old

    def detach(self) -> None:
        """Drop the link's permissions on the child."""
        self.node.remove_user(self.key)


def replace_node(old: BlockNode, new: BlockNode, skip: BlockNode | None = None) -> None:
    """Every parent of ``old`` (but ``skip``) and every user of it that can follow
    (``NodeUser.repoint``: exports) now uses ``new``, as QEMU's bdrv_replace_node: a mirror's
    pivot, a filter put above a node or taken away again. No await: no request reaches ``old``
    through its users once this returns."""
    for parent in old.parents():
        if parent is skip:
            continue
        for child in list(parent.children.values()):
            if child.node is old:
                child.replace(new)
    for user in list(old.users.values()):
        if user.repoint is None or user.is_parent:
            continue
        new.set_user(user)
        old.remove_user(user.key)
        user.repoint(new)
