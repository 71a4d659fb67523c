"""The ``throttle`` filter driver: reads and writes of its ``file`` child wait for the budget
of the throttle group it names (``qsd_py/objects/throttle_group.py``).

It offers no fast path (``fast_target`` stays None), so exports send every request through
it and the limits hold for all transports.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import BlockNode, BlockStatus, Buffer
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.objects.throttle_group import ThrottleGroup


class ThrottleNode(BlockNode):
    driver = "throttle"
    format_name = "throttle"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.group: ThrottleGroup | None = None

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    async def open(self) -> None:
        from qsd_py.objects.throttle_group import ThrottleGroup

        name = self.opts["throttle-group"]
        group = self.graph.objects.get(name) if self.graph.objects is not None else None
        if not isinstance(group, ThrottleGroup):
            raise QMPError(f"Throttle group '{name}' does not exist")
        child = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", child, Perm(0), PERM_ALL)
        self.group = group
        group.join(self)

    def close(self) -> None:
        if self.group is not None:
            self.group.leave(self)
            self.group = None
        super().close()

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "file" in self.children:
            self.attach_child("file", self.file, perm, shared)

    def length(self) -> int:
        return self.file.length()

    async def do_truncate(self, length: int, prealloc: str) -> None:
        await self.file.truncate(length, prealloc)

    async def do_allocated_size(self) -> int:
        return await self.file.allocated_size()

    async def _admit(self, is_write: bool, nbytes: int) -> None:
        if self.group is not None:
            await self.group.admit(self, is_write, nbytes)

    async def do_read(self, offset: int, buf: memoryview) -> None:
        await self._admit(False, len(buf))
        await self.file.read(offset, buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        await self._admit(True, len(data))
        await self.file.write(offset, data)

    async def do_flush(self) -> None:
        await self.file.flush()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        await self._admit(True, length)
        await self.file.write_zeroes(offset, length, unmap, no_fallback)

    async def do_discard(self, offset: int, length: int) -> None:
        await self._admit(True, length)
        await self.file.discard(offset, length)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.file.block_status(offset, length)

    def filename(self) -> str:
        desc = {"throttle-group": self.opts["throttle-group"], "driver": "throttle",
                "file": {"driver": self.file.driver}}  # fmt: skip
        return "json:" + json.dumps(desc)


NODE = ThrottleNode
