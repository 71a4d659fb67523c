"""Requests in flight on a node, and waiting until there are none (drain).

Every request that enters a node's public I/O methods is counted here until it returns. A
block job that swaps a node (a pivot) or changes metadata under the node's users first stops
the users above from starting new requests, then waits until the counts of the node and its
parents reach zero: :meth:`BlockNode.drained`. Nodes are called from several loops (the main
loop, iothreads), so the count is guarded by a lock and a waiter may sit on any loop.
"""

from __future__ import annotations

import asyncio
import threading


class InFlight:
    """A count of requests in flight, with waiters for it to reach zero."""

    __slots__ = ("_lock", "count", "_idle")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self._idle: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def enter(self) -> None:
        with self._lock:
            self.count += 1

    def leave(self) -> None:
        with self._lock:
            self.count -= 1
            if self.count or not self._idle:
                return
            waiters, self._idle = self._idle, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    async def wait_idle(self) -> None:
        """Return once no request is in flight (at once if none is)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self.count:
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._idle.append((loop, fut))
        await fut


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
