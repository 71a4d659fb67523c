"""Ranges a job copies into a node while the node is written (block-stream's copy-on-read).

A job that writes into a node what the node already shows (stream copies the backing chain's
bytes into the top layer) must not let a guest write of the same range land *before* its
own, or the guest's bytes would be overwritten with the old ones. A :class:`RangeGate`
attached to the node (``node.write_gates``) serialises the two: guest writes register while
they run and wait while the job holds an overlapping range; the job's :meth:`RangeGate.hold`
waits until no guest write overlaps, and keeps new ones out until it lets go. The job's own
writes, made while it holds the range, pass (:meth:`RangeGate.owned`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar

_OWNER: ContextVar[object | None] = ContextVar("rangegate_owner", default=None)


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


class RangeGate:
    """Guest writes against one holder's ranges (all on the main loop)."""

    def __init__(self) -> None:
        self._writes: dict[int, tuple[int, int]] = {}
        self._held: tuple[int, int] | None = None
        self._next = 0
        self._changed = asyncio.Event()

    async def enter(self, offset: int, length: int) -> int | None:
        """A guest write of ``[offset, +length)`` starts: wait while the holder has it; the
        token to :meth:`leave` with (None for the holder's own writes)."""
        if _OWNER.get() is self:
            return None
        while self._held is not None and _overlap(offset, length, *self._held):
            self._changed.clear()
            await self._changed.wait()
        token = self._next
        self._next += 1
        self._writes[token] = (offset, length)
        return token

    def leave(self, token: int | None) -> None:
        if token is not None and self._writes.pop(token, None) is not None:
            self._changed.set()

    @contextlib.asynccontextmanager
    async def hold(self, offset: int, length: int) -> AsyncIterator[None]:
        """Own ``[offset, +length)``: once no guest write overlaps it, none starts in it
        until the body is done."""
        self._held = (offset, length)
        try:
            while any(_overlap(offset, length, *w) for w in self._writes.values()):
                self._changed.clear()
                await self._changed.wait()
            yield
        finally:
            self._held = None
            self._changed.set()

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """The holder's own writes in the body pass the gate."""
        token = _OWNER.set(self)
        try:
            yield
        finally:
            _OWNER.reset(token)
