"""Start a coroutine at once, in the caller, and give it a task only if it has to wait.

Python 3.12's eager tasks do this; on 3.11 a task costs a loop iteration before its first
step and another for its done callback, which is more than a fresh qcow2 cluster's
allocation costs when nothing is contended (its locks free, its tables cached).
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any


def start(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None] | None:
    """Run ``coro`` up to its first wait: None when it finished (an exception it raised
    propagates), else a coroutine that carries on from there, to be made a task."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return _carry_on(coro, waiting)


async def _carry_on(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _Resume(coro, waiting)


class _Resume:
    """The rest of a started coroutine as an awaitable: first what it was waiting for
    (handed on to the task as the coroutine yielded it), then each later step."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                yield waiting
            except BaseException as err:  # the task's cancellation, passed in
                try:
                    waiting = coro.throw(err)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    return
