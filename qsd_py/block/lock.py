"""A lock for coroutines of several asyncio loops.

Block nodes are called from the main loop and from iothreads' loops at once; what must not
interleave (a resize, a format driver's metadata update) takes this lock, which hands itself
to the next waiter on that waiter's own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class CrossLoopLock:
    """A mutex for coroutines running on *different* asyncio loops (multi-queue exports).

    ``asyncio.Lock`` belongs to one loop; resizes must be serialized across all queues so
    that two growing writes cannot shrink the image by finishing out of order.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    async def __aenter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        await fut  # ownership is handed over by release(); a cancelled waiter passes it on

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        with self._mutex:
            if not self._waiters:
                self._held = False
                return
            loop, fut = self._waiters.popleft()
        if loop is _running_loop():
            loop.call_soon(self._hand_over, fut)  # no self-pipe write to wake our own loop
        else:
            loop.call_soon_threadsafe(self._hand_over, fut)

    def _hand_over(self, fut: asyncio.Future[None]) -> None:
        if fut.done():  # cancelled while waiting: give the lock to the next one
            self._release()
        else:
            fut.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop of the calling thread if it is running (releases also happen from plain
    threads, such as a pool's)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
