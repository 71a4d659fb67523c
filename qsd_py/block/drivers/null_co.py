"""The ``null-co`` driver: a device of a given size that discards writes.

Reads leave the caller's buffer as it is unless ``read-zeroes`` (QEMU 11.1's default is
off); ``latency-ns`` delays every request, for benchmarks.
"""

from __future__ import annotations

import asyncio
import errno
import json
from typing import TYPE_CHECKING, Any

from qsd_py.block.fast_map import FastTarget
from qsd_py.block.node import (
    STATUS_OFFSET_VALID,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
    Buffer,
    fill_zeroes,
    round_to_sectors,
)

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

DEFAULT_SIZE = 1 << 30


class NullNode(BlockNode):
    driver = "null-co"
    format_name = "null-co"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        # An unaligned size= is rounded up to whole sectors, as QEMU does.
        self.size: int = round_to_sectors(opts.get("size", DEFAULT_SIZE))
        self.read_zeroes: bool = opts.get("read-zeroes", False)
        self.latency: float = opts.get("latency-ns", 0) / 1e9

    async def _delay(self) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)

    def length(self) -> int:
        return self.size

    async def do_truncate(self, length: int, prealloc: str) -> None:
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        raise OSError(errno.ENOTSUP, "Image format driver does not support resize")

    async def do_allocated_size(self) -> int:
        return 0

    async def do_read(self, offset: int, buf: memoryview) -> None:
        await self._delay()
        if self.read_zeroes:
            fill_zeroes(buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        await self._delay()

    async def do_flush(self) -> None:
        await self._delay()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        await self._delay()

    async def do_discard(self, offset: int, length: int) -> None:
        await self._delay()

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """Zeroes with ``read-zeroes``; otherwise neither data nor zero (QEMU's answer: the
        contents are unknown, which SEEK_DATA treats as data)."""
        flags = STATUS_OFFSET_VALID | (STATUS_ZERO if self.read_zeroes else 0)
        return BlockStatus(flags, length, self, offset)

    def fast_target(self) -> FastTarget | None:
        if self.latency:
            return None  # the delay is the node's to keep
        return FastTarget(null=True, read_zeroes=self.read_zeroes, writable=not self.read_only)

    def filename(self) -> str:
        desc = {k: self.opts[k] for k in ("read-zeroes",) if k in self.opts}
        desc["driver"] = "null-co"
        if "size" in self.opts:
            desc["size"] = self.opts["size"]
        return "json:" + json.dumps(desc) if len(desc) > 1 else "null-co://"


NODE = NullNode
