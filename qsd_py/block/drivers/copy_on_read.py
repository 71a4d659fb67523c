"""The ``copy-on-read`` filter: what a read finds in the backing chain of the filter's
``file`` node is written into that node as it is read, as QEMU's COR filter does.

A read is split into runs by the top node's own allocation. A run the top node holds is
read from it; a run it does not hold is read through it (the backing chain answers), and,
if a layer between the top's backing node and ``bottom`` (the whole chain without
``bottom``) holds the data, the run widened to the top's clusters is written back
unchanged into the top node. Runs only the layers under ``bottom`` hold, or none, are read
without a copy, so a chain below ``bottom`` stays where it is.

Copies and writes through the filter to overlapping ranges wait for each other (QEMU
serialises them too): a guest write must not be overwritten by the older data a copy read
before it. The filter never offers the exports' fast path: every read has to pass here.
"""

from __future__ import annotations

import asyncio
import errno
import json
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import (
    STATUS_ALLOCATED,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
    Buffer,
)
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.fast_map import FastTarget
    from qsd_py.block.graph import BlockGraph

PERM_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE


class CopyOnReadNode(BlockNode):
    driver = "copy-on-read"
    format_name = "copy-on-read"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.bottom_name: str | None = opts.get("bottom")
        # A stream job's filter (jobs/stream.py): the job copies the whole range itself,
        # so the exports' fast path may read the file around the filter's copy-up
        # (fast_target is the file's), and QEMU names it as its file when unnamed.
        self.job_owned = False
        self.named = True
        self.bottom: BlockNode | None = None
        self._busy: list[tuple[int, int]] = []  # ranges being copied or written

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        child = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", child, *self._child_perms(Perm(0), PERM_ALL))
        if self.bottom_name is not None:
            self.bottom = self.graph.find(self.bottom_name)
            if self.bottom is None:
                raise QMPError(f"Bottom node '{self.bottom_name}' not found")
            if not _chain_contains(child, self.bottom):
                raise QMPError(
                    f"Bottom node '{self.bottom_name}' is not a member of the backing chain"
                )

    # --- permissions ----------------------------------------------------------------------
    def _child_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """QEMU's: the users' read/write/resize pass through, and the filter itself always
        writes unchanged data (the copies); others may always do the same."""
        keep = PERM_ALL & ~PERM_PASSTHROUGH
        return (perm & PERM_PASSTHROUGH) | Perm.WRITE_UNCHANGED, (shared & PERM_PASSTHROUGH) | keep

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "file" in self.children:
            self.attach_child("file", self.file, *self._child_perms(perm, shared))

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return self.file.length()

    async def do_truncate(self, length: int, prealloc: str) -> None:
        await self.file.truncate(length, prealloc)

    async def do_allocated_size(self) -> int:
        return await self.file.allocated_size()

    def allocated_size_now(self) -> int | None:
        return self.file.allocated_size_now()

    # --- serialisation --------------------------------------------------------------------
    async def _claim(self, start: int, end: int) -> tuple[int, int]:
        """Wait until no copy or write overlaps ``[start, end)``, then hold it. The wait
        polls: a request may come from any loop, so no loop-bound primitive fits."""
        while any(s < end and start < e for s, e in self._busy):
            await asyncio.sleep(0.001)
        claim = (start, end)
        self._busy.append(claim)
        return claim

    # --- I/O ------------------------------------------------------------------------------
    async def do_read(self, offset: int, buf: memoryview) -> None:
        top = self.file
        backing = top.child_node("backing") if top.supports_backing else None
        if backing is None or top.read_only:
            await top.read(offset, buf)
            return
        pos, end = offset, offset + len(buf)
        while pos < end:
            st = await top.block_status(pos, end - pos)
            n = max(1, min(st.length, end - pos))
            part = buf[pos - offset : pos - offset + n]
            if st.flags & STATUS_ALLOCATED or not await self._below_holds(backing, pos, n):
                await top.read(pos, part)
            else:
                await self._copy_up(pos, part)
            pos += n

    async def _below_holds(self, backing: BlockNode, offset: int, length: int) -> bool:
        """Whether a layer from ``backing`` down to ``bottom`` holds data at ``offset``
        (the first byte decides: the top's run has one answer from the chain's first
        holder, and a copy of zeroes read from nowhere would allocate for nothing)."""
        node: BlockNode | None = backing
        while node is not None and offset < node.length():
            st = await node.block_status(offset, 1)
            if st.flags & STATUS_ALLOCATED:
                return True
            if node is self.bottom:
                return False
            node = node.child_node("backing") if node.supports_backing else None
        return False

    async def _copy_up(self, offset: int, part: memoryview) -> None:
        """Read the clusters around ``part`` through the top node and write them back
        into it, then hand the caller its bytes."""
        top = self.file
        cluster = max(1, int(top.image_extra().get("cluster-size", 512)))
        start = offset // cluster * cluster
        end = min(-(-(offset + len(part)) // cluster) * cluster, top.length())
        claim = await self._claim(start, end)
        try:
            bounce = memoryview(bytearray(end - start))
            await top.read(start, bounce)
            st = await top.block_status(start, end - start)
            if not st.flags & STATUS_ALLOCATED:  # no write came in between
                await top.write(start, bounce)
            part[:] = bounce[offset - start : offset - start + len(part)]
        finally:
            self._busy.remove(claim)

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        claim = await self._claim(offset, offset + len(data))
        try:
            await self.file.write(offset, data)
        finally:
            self._busy.remove(claim)

    async def do_flush(self) -> None:
        await self.file.flush()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        claim = await self._claim(offset, offset + length)
        try:
            await self.file.write_zeroes(offset, length, unmap, no_fallback)
        finally:
            self._busy.remove(claim)

    async def do_discard(self, offset: int, length: int) -> None:
        claim = await self._claim(offset, offset + length)
        try:
            await self.file.discard(offset, length)
        finally:
            self._busy.remove(claim)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """A filter's: the file's answer (its chain's, as QEMU's filters report it)."""
        st = await self.file.block_status_above(offset, length)
        if st.depth == 0 and not st.flags & STATUS_ZERO:
            return st._replace(flags=st.flags | STATUS_ZERO)
        return st

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        if not self.named:
            return self.file.filename()
        return "json:" + json.dumps(self.full_options())

    def backing_depth(self) -> int:
        """QEMU counts a filter's child as its backing image (query-named-block-nodes)."""
        return 1 + self.file.backing_depth()

    def image_info(self, flat: bool = False) -> dict[str, Any]:
        image = super().image_info(flat)
        if not flat:
            image["backing-image"] = self.file.image_info()
        return image

    def fast_target(self) -> FastTarget | None:
        """None (every read passes the copy-up), but for a stream's filter: the file's."""
        if not self.job_owned:
            return None
        return self.file.fast_target()

    async def prepare_fast_write(self, offset: int, length: int) -> bool:
        if not self.job_owned:
            return False
        return await self.file.prepare_fast_write(offset, length)

    def full_options(self) -> dict[str, Any]:
        desc: dict[str, Any] = {"driver": self.driver, "file": self.file.full_options()}
        if self.bottom_name is not None:
            desc["bottom"] = self.bottom_name
        return desc

    def image_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"dirty-flag": False}
        cluster = self.file.image_extra().get("cluster-size")
        if cluster:
            extra["cluster-size"] = cluster
        return extra

    def limits(self) -> dict[str, int]:
        own = super().limits()
        child = self.file.limits()
        if "discard-alignment" in child:
            own["discard-alignment"] = child["discard-alignment"]
        return own


def _chain_contains(top: BlockNode, node: BlockNode) -> bool:
    """Whether ``node`` is ``top`` or one of the nodes below it by backing links."""
    cur: BlockNode | None = top
    while cur is not None:
        if cur is node:
            return True
        cur = cur.child_node("backing") if cur.supports_backing else None
    return False


NODE = CopyOnReadNode
