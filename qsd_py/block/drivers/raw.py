"""The ``raw`` format driver: its ``file`` child as is, or a fixed window of it.

``offset``/``size`` select a window; a node with a window cannot be resized and denies
its child's other users the resize permission (QEMU's rule, so the window stays valid).
"""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import SECTOR_SIZE, BlockNode, BlockStatus, Buffer, round_to_sectors
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.fast_map import FastTarget
    from qsd_py.block.graph import BlockGraph


class RawNode(BlockNode):
    driver = "raw"
    format_name = "raw"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.offset: int = opts.get("offset", 0)
        self.size: int | None = opts.get("size")
        self.fixed = self.offset != 0 or self.size is not None

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        child = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", child, *self._child_perms(Perm(0), PERM_ALL))
        self._check_window(child.length())

    def _check_window(self, file_len: int) -> None:
        if self.offset > file_len:
            raise QMPError(
                f"Offset ({self.offset}) cannot be greater than size of the containing file "
                f"({file_len})"
            )
        if self.size is None:
            return
        if self.offset + self.size > file_len:
            raise QMPError(
                f"The sum of offset ({self.offset}) and size ({self.size}) has to be smaller "
                f"or equal to the  actual size of the containing file ({file_len})"
            )
        if self.size % SECTOR_SIZE:
            raise QMPError(f"Specified size is not multiple of {SECTOR_SIZE}")

    # --- permissions ----------------------------------------------------------------------
    def _child_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """Pass the users' permissions through; a window never shares resize."""
        return perm, (shared & ~Perm.RESIZE) if self.fixed else shared

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "file" in self.children:
            self.attach_child("file", self.file, *self._child_perms(perm, shared))

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        """The window, or the child past ``offset``; an unaligned offset leaves a partial
        last sector, which counts as a whole one (QEMU's rounding, reads beyond are zero)."""
        if self.size is not None:
            return self.size
        return round_to_sectors(max(0, self.file.length() - self.offset))

    async def do_truncate(self, length: int, prealloc: str) -> None:
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        if self.size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        await self.file.truncate(length + self.offset, prealloc)

    async def do_allocated_size(self) -> int:
        return await self.file.allocated_size()

    def allocated_size_now(self) -> int | None:
        return self.file.allocated_size_now()

    # --- I/O ------------------------------------------------------------------------------
    async def do_read(self, offset: int, buf: memoryview) -> None:
        if self.graph.debug_nodes:
            self.child_debug_event("file", "read_aio")
        await self.file.read(offset + self.offset, buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        if self.graph.debug_nodes:
            self.child_debug_event("file", "write_aio")
        await self.file.write(offset + self.offset, data)

    async def do_flush(self) -> None:
        await self.file.flush()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        unmap = unmap and self.discard_unmap
        await self.file.write_zeroes(offset + self.offset, length, unmap, no_fallback)

    async def do_discard(self, offset: int, length: int) -> None:
        if self.discard_unmap and not self.read_only:
            await self.file.discard(offset + self.offset, length)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """The file's status at the same place (QEMU's BDRV_BLOCK_RAW, resolved here)."""
        return await self.file.block_status(offset + self.offset, length)

    def fast_target(self) -> FastTarget | None:
        """The file's target shifted by the window (a window over a format's mapping would
        need the shift before the lookup: not offered)."""
        target = self.file.fast_target()
        if target is None or (target.table is not None and self.offset):
            return None
        writable = target.writable and not self.read_only
        return target._replace(base=target.base + self.offset, writable=writable)

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        """The child's name; a ``json:`` one when the window is fixed, or when the child's
        own name is ``json:`` (QEMU then describes this node with the child's options)."""
        if not self.fixed:
            name = self.file.filename()
            if not name.startswith("json:"):
                return name
            return "json:" + json.dumps({"driver": "raw", "file": self.file.full_options()})
        desc: dict[str, Any] = {}
        if self.offset:
            desc["offset"] = self.offset
        desc["driver"] = "raw"
        if self.size is not None:
            desc["size"] = self.size
        desc["file"] = {"driver": self.file.driver, "filename": self.file.filename()}
        return "json:" + json.dumps(desc)

    def image_extra(self) -> dict[str, Any]:
        """QEMU's raw asks its child for the image information and its snapshots: the
        child's cluster size (an RBD image's object size) and snapshots show through."""
        extra: dict[str, Any] = {"dirty-flag": False}
        child = self.file.image_extra()
        for key in ("cluster-size", "snapshots"):
            if child.get(key):
                extra[key] = child[key]
        return extra

    def limits(self) -> dict[str, int]:
        """Raw's own, merged with its child's as QEMU's block layer merges a data child's
        (memory alignments and preferred transfer the larger, maximum transfer and vector
        count the smaller; the request alignment stays raw's own)."""
        own = super().limits()
        child = self.file.limits()
        for key in ("min-mem-alignment", "opt-mem-alignment", "opt-transfer"):
            if key in child:
                own[key] = max(own.get(key, 0), child[key])
        for key in ("max-transfer", "max-iov"):
            if key in child:
                own[key] = min(own[key], child[key]) if key in own else child[key]
        return own


NODE = RawNode
