"""Changing an open node's read-only state in place (what QEMU does with a reopen).

After an external snapshot QEMU reopens the old image read-only: nothing writes it any more,
its metadata is written back and its lock no longer claims writes. The implicit children the
node opened itself (its ``file``) inherit the change, as QEMU's reopen passes inherited
options down; children given by reference keep their own state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd_py.block.perm import Perm

if TYPE_CHECKING:
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
