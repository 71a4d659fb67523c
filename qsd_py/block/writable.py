"""Switching an open node between read-only and read-write in place, as QEMU's
bdrv_reopen_set_read_only does for a commit into a read-only base (libvirt opens backing
images read-only) and for change-backing-file on a read-only image.

A ``file`` node gets a new open file description behind the same descriptor (``dup2``), so
that whatever holds the number (the exports' fast plans, worker processes' copies of it)
keeps working; its lock bytes are taken again on the new description. A format node on top
(qcow2) writes back its caches before it turns read-only and prepares for writes (dirty
bitmaps marked in use, a dirty image repaired) when it turns writable. The implicit
children the node opened itself follow, as QEMU's reopen passes inherited options down.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode


async def set_read_only(node: BlockNode, read_only: bool) -> None:
    """Make ``node`` (and its implicit children) read-only or writable; QMPError when the
    file cannot be opened for writing (nothing changed then for that file)."""
    if node.read_only == read_only:
        return
    if read_only:
        await node.prepare_close()  # caches written back, the image marked clean
        table = getattr(node, "table", None)
        if table is not None:  # no fast-path writer may keep a writable entry
            table.clear_all()
            await table.barrier()
        _flag(node, True)
        node.refresh_perms()  # children lose the write permission first
        for child in list(node.children.values()):
            if child.node.implicit and child.role != "backing":
                await set_read_only(child.node, True)
        _reopen_file(node, True)
        return
    for child in list(node.children.values()):
        if child.node.implicit and child.role != "backing":
            await set_read_only(child.node, False)
    _reopen_file(node, False)
    _flag(node, False)
    node.refresh_perms()
    prepare = getattr(node, "_open_for_writing", None)
    header = getattr(node, "header", None)
    if prepare is not None and header is not None:
        await prepare(header)


def _flag(node: BlockNode, read_only: bool) -> None:
    node.read_only = read_only
    node.opts = {**node.opts, "read-only": read_only}


def _reopen_file(node: BlockNode, read_only: bool) -> None:
    """A file node's descriptor now refers to a description opened for ``read_only``."""
    fd = getattr(node, "fd", -1)
    path = getattr(node, "path", None)
    if fd < 0 or path is None:
        return
    flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
    flags |= os.O_DIRECT if getattr(node, "direct", False) else 0
    try:
        new = os.open(path, flags)
    except OSError as e:
        raise QMPError(f"Could not reopen file: {os.strerror(e.errno)}") from None
    try:
        os.dup2(new, fd, inheritable=False)  # the old description's locks go with it
    finally:
        os.close(new)
    locked = getattr(node, "_locked", None)
    if locked is not None:
        locked.clear()
    node.read_only = read_only
    node.refresh_perms()  # the lock bytes, taken again on the new description
