"""A block node over a bytearray, for engine tests until/besides the file driver.

It implements the BlockNode contract faithfully (allocation in 4 KiB clusters, discard only
with discard=unmap) so that the FUSE semantics can be checked against a backing store the
test can inspect directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import STATUS_DATA, STATUS_ZERO, BlockNode, BlockStatus
from qsd_py.errors import QMPError

CLUSTER = 4096


class MemNode(BlockNode):
    driver = "test-mem"

    def __init__(
        self, size: int, *, read_only: bool = False, discard: str = "ignore", delay: float = 0.0
    ) -> None:
        # A graph of its own: the node is not in it, but nodes read graph-wide state.
        opts = {"node-name": "mem0", "read-only": read_only, "discard": discard}
        super().__init__(BlockGraph(), opts)
        self.data = bytearray(size)
        self.allocated: set[int] = set()
        self.users: dict[str, bool] = {}
        self.flushes = 0
        self.delay = delay  # seconds each read/write waits: keeps requests in flight

    def add_user(self, user: str, write: bool, resize: bool | None = None, **_: Any) -> None:
        if write and self.read_only:
            raise QMPError("Block node is read-only")
        self.users[user] = write

    def remove_user(self, user: str) -> None:
        del self.users[user]

    def length(self) -> int:
        return len(self.data)

    async def do_truncate(self, length: int, prealloc: str) -> None:
        if length < len(self.data):
            del self.data[length:]
            self.allocated = {c for c in self.allocated if c * CLUSTER < length}
        else:
            self.data.extend(bytes(length - len(self.data)))

    async def do_allocated_size(self) -> int:
        return len(self.allocated) * CLUSTER

    def _check(self, offset: int, n: int) -> None:
        if offset < 0 or offset + n > len(self.data):
            raise OSError(22, "out of range")

    async def do_read(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        if self.delay:
            await asyncio.sleep(self.delay)
        buf[:] = self.data[offset : offset + len(buf)]

    async def do_write(self, offset: int, data: Any) -> None:
        self._check(offset, len(data))
        if self.delay:
            await asyncio.sleep(self.delay)
        self.data[offset : offset + len(data)] = data
        self.allocated.update(range(offset // CLUSTER, (offset + len(data) - 1) // CLUSTER + 1))

    async def do_flush(self) -> None:
        self.flushes += 1

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)
        first, last = offset // CLUSTER, (offset + length - 1) // CLUSTER
        if unmap and self.discard_unmap:
            for c in range(first, last + 1):
                if c * CLUSTER >= offset and (c + 1) * CLUSTER <= offset + length:
                    self.allocated.discard(c)
        else:
            self.allocated.update(range(first, last + 1))

    async def do_discard(self, offset: int, length: int) -> None:
        if self.discard_unmap:
            await self.do_write_zeroes(offset, length, unmap=True)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        c = offset // CLUSTER
        is_data = c in self.allocated
        end = offset + length
        pos = (c + 1) * CLUSTER
        while pos < end and ((pos // CLUSTER) in self.allocated) == is_data:
            pos += CLUSTER
        return BlockStatus(STATUS_DATA if is_data else STATUS_ZERO, min(pos, end) - offset)

    def info(self, flat: bool = False) -> dict[str, Any]:
        return {"node-name": self.node_name}
