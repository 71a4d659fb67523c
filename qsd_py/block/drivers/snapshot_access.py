"""The ``snapshot-access`` driver: the point-in-time view a ``copy-before-write`` node keeps
(its ``file`` child), as QEMU's driver offers it for image fleecing: reads and block status
come from the snapshot, a discard tells the filter that the range is read and no longer
needs keeping; writes are refused.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import BlockNode, BlockStatus, Buffer
from qsd_py.block.perm import PERM_ALL, Perm

if TYPE_CHECKING:
    from qsd_py.block.drivers.copy_before_write import CopyBeforeWriteNode


class SnapshotAccessNode(BlockNode):
    driver = "snapshot-access"
    format_name = "snapshot-access"

    async def open(self) -> None:
        file = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", file, Perm(0), PERM_ALL)  # QEMU's: no permission taken

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    def _snapshot(self) -> CopyBeforeWriteNode:
        """The filter whose snapshot this is (a node of another driver has none: ENOTSUP)."""
        node = self.file
        if not hasattr(node, "snapshot_read"):
            raise OSError(errno.ENOTSUP, "not a copy-before-write node")
        return node  # type: ignore[return-value]

    def length(self) -> int:
        return self.file.length()

    async def do_truncate(self, length: int, prealloc: str) -> None:
        raise OSError(errno.ENOTSUP, "snapshot-access cannot be resized")

    async def do_allocated_size(self) -> int:
        return 0

    async def do_read(self, offset: int, buf: memoryview) -> None:
        await self._snapshot().snapshot_read(offset, buf)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._snapshot().snapshot_block_status(offset, length)

    async def do_discard(self, offset: int, length: int) -> None:
        await self._snapshot().snapshot_discard(offset, length)

    async def do_write(self, offset: int, data: Buffer) -> None:
        raise OSError(errno.ENOTSUP, "snapshot-access is read-only")

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        await self.do_discard(offset, length)  # QEMU's: zeroing the snapshot drops it

    async def do_flush(self) -> None:
        """Nothing is written here."""

    def filename(self) -> str:
        return self.file.filename()

    def full_options(self) -> dict[str, Any]:
        return {"driver": self.driver, "file": self.file.full_options()}


NODE = SnapshotAccessNode
