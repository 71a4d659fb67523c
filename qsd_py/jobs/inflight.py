"""The copies a job has in flight (mirror's 16 requests, backup's block-copy workers).

Each copy is a task with the byte range it covers. A finished task leaves the set from its
done callback and wakes the job if it waits for one: a wait costs the same with 64 copies in
flight as with one (``asyncio.wait`` would hook and unhook a callback on every task in
flight each time one finishes, once per chunk of a 1 GiB copy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, ValuesView
from typing import Any


class CopiesInFlight:
    """Tasks in flight with the ``(start, end)`` each one copies."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], tuple[int, int]] = {}
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def ranges(self) -> ValuesView[tuple[int, int]]:
        return self._tasks.values()

    def start(self, coro: Coroutine[Any, Any, None], start: int, end: int) -> None:
        """Run ``coro`` as a copy of ``[start, end)``; it must handle its own errors (an
        exception left in the task is not looked at)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[task] = (start, end)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        del self._tasks[task]
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_one(self) -> None:
        """Until a copy in flight has finished (at once if none is in flight)."""
        if not self._tasks:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_all(self) -> None:
        """Until no copy is in flight."""
        while self._tasks:
            await self.wait_one()
