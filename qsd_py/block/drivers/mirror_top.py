"""The ``mirror_top`` filter: the node a mirror (blockdev-mirror, drive-mirror) puts above its
source while it runs, as QEMU's, so that clients see what QEMU shows: a node named by
``filter-node-name`` (else ``#blockNNN``) with the source as its ``backing`` child, the
exports of the source moved onto it, the job's dirty bitmap on it, and none of it left once
the job ended.

It is a real node: its parents' requests pass through its coroutines to the source, and the
exports' fast path reaches the source through :meth:`fast_target` (the source's own), so an
export keeps reading and writing around the coroutines; its fast writes mark the job's
bitmap, a shared one kept on this node (fast_io: the exported node's bitmaps are marked by
the fast path itself). The driver has no QAPI name: only a mirror job makes one
(:func:`insert`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from qsd_py.block.child import replace_node
from qsd_py.block.node import STATUS_ZERO, BlockNode, BlockStatus, Buffer
from qsd_py.block.perm import PERM_ALL, Perm

if TYPE_CHECKING:
    from qsd_py.block.dirty import DirtyBitmap
    from qsd_py.block.fast_map import FastTarget
    from qsd_py.block.graph import BlockGraph


class MirrorTopNode(BlockNode):
    driver = "mirror_top"
    format_name = "mirror_top"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.job_bitmap: DirtyBitmap | None = None  # shown as QEMU shows the job's bitmap
        self.passes_read = True  # False under an active commit, as QEMU's

    @property
    def backing(self) -> BlockNode:
        return self.children["backing"].node

    # --- permissions: the parents' pass through to the source -------------------------------
    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if not self.passes_read:
            perm &= ~Perm.CONSISTENT_READ
        if "backing" in self.children:
            self.attach_child("backing", self.backing, perm, shared)

    # --- I/O ------------------------------------------------------------------------------
    def length(self) -> int:
        return self.backing.length()

    async def do_truncate(self, length: int, prealloc: str) -> None:
        await self.backing.truncate(length, prealloc)

    async def do_allocated_size(self) -> int:
        return await self.backing.allocated_size()

    def allocated_size_now(self) -> int | None:
        return self.backing.allocated_size_now()

    async def do_read(self, offset: int, buf: memoryview) -> None:
        await self.backing.read(offset, buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        await self.backing.write(offset, data)

    async def do_flush(self) -> None:
        await self.backing.flush()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        await self.backing.write_zeroes(offset, length, unmap, no_fallback)

    async def do_discard(self, offset: int, length: int) -> None:
        await self.backing.discard(offset, length)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """The source's chain's answer, as QEMU's filters report it."""
        st = await self.backing.block_status_above(offset, length)
        if st.depth == 0 and not st.flags & STATUS_ZERO:
            return st._replace(flags=st.flags | STATUS_ZERO)
        return st

    # --- the exports' fast path: transparent ------------------------------------------------
    def fast_target(self) -> FastTarget | None:
        target = self.backing.fast_target()
        if target is None or not self.read_only:
            return target
        return target._replace(writable=False)

    async def prepare_fast_write(self, offset: int, length: int) -> bool:
        return await self.backing.prepare_fast_write(offset, length)

    # --- introspection (QEMU's answers for its mirror_top node) -----------------------------
    def filename(self) -> str:
        return self.backing.filename()

    def full_options(self) -> dict[str, Any]:
        return self.backing.full_options()

    def image_extra(self) -> dict[str, Any]:
        """QEMU's filters answer for their child's clusters."""
        extra: dict[str, Any] = {"dirty-flag": False}
        cluster = self.backing.image_extra().get("cluster-size")
        if cluster:
            extra["cluster-size"] = cluster
        return extra

    def limits(self) -> dict[str, int]:
        return {**super().limits(), "min-mem-alignment": 512}

    def info(self, flat: bool = False) -> dict[str, Any]:
        """QEMU lists no ``backing_file`` for the filter, though its child is ``backing``."""
        entry = super().info(flat)
        entry.pop("backing_file", None)
        return entry

    def dirty_bitmaps_info(self) -> list[dict[str, Any]]:
        """The job's bitmap as QEMU shows it: unnamed and not ``recording`` (QEMU's filter
        marks it by hand, not as a recording bitmap)."""
        own = super().dirty_bitmaps_info()
        bitmap = self.job_bitmap
        if bitmap is None:
            return own
        entry = {"count": bitmap.count, "granularity": bitmap.granularity, "recording": False,
                 "busy": False, "persistent": False}  # fmt: skip
        return [*own, entry]


class CommitTopNode(MirrorTopNode):
    """QEMU's ``commit_top``: what an intermediate commit puts between the top's overlay
    and the top. Read-only, it takes nothing of the node below and lets others do all
    (the job copies from the top itself); the overlay reads through it."""

    driver = "commit_top"
    format_name = "commit_top"

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "backing" in self.children:
            self.attach_child("backing", self.backing, Perm(0), PERM_ALL)

    def dirty_bitmaps_info(self) -> list[dict[str, Any]]:
        return []


def insert(
    graph: BlockGraph,
    source: BlockNode,
    name: str,
    passes_read: bool = True,
    cls: type[MirrorTopNode] = MirrorTopNode,
) -> MirrorTopNode:
    """A filter named ``name`` (checked by the caller: ``filter-node-name``, else a
    generated ``#blockNNN``) over ``source``, registered but not yet put above it
    (:func:`put_above`). ``passes_read`` False: its parents' consistent read stops here
    (an active commit's chain is not consistent while it runs)."""
    opts = {"driver": cls.driver, "node-name": name, "read-only": cls is CommitTopNode}
    node = cls(graph, opts)
    node.implicit = True
    node.passes_read = passes_read
    node.attach_child("backing", source, Perm(0), PERM_ALL)
    graph.register(node)
    return node


def put_above(node: MirrorTopNode) -> None:
    """The source's parents and exports now use the filter (QEMU's bdrv_append)."""
    replace_node(node.backing, node, skip=node)


def take_away(node: MirrorTopNode, successor: BlockNode) -> None:
    """The filter's users move to ``successor`` (the source again, or the target of a
    pivot); no await, as a pivot needs. The graph closes the filter once the job let go
    of it (``drop_orphan``)."""
    replace_node(node, successor)
    node.job_bitmap = None


def discard(node: MirrorTopNode) -> None:
    """The filter leaves the graph once nobody uses it (it caches nothing: no write-back)."""
    node.detach_children()
    node.graph.unregister(node)


NODE = MirrorTopNode
