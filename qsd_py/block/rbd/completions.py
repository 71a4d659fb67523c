"""Handing results from other threads to the asyncio loop that waits for them.

The rbd driver's blocking calls (connect, open, resize, diff iterate) finish on threads of
their own, and the probes in scripts/ hand the binding's librbd completions over this way
(the driver's own I/O completions come on librbd's event socket instead, capi.py). Waking
the owning loop with ``call_soon_threadsafe`` for every result costs a write to the loop's
self-pipe and an epoll round each. Here results are queued per loop, and the loop is woken
once per batch: only the result that finds the queue empty schedules the drain; those
arriving before the drain has run just join the queue.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

Settle = Callable[[], None]


class LoopInbox:
    """Completions waiting for one loop; :meth:`post` may be called from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[Settle] = deque()
        self._lock = threading.Lock()

    def post(self, settle: Settle) -> None:
        """Queue ``settle`` to run on the loop; wake the loop if nothing was queued (the
        check and the append under one lock, so no two threads both see a non-empty queue
        that the drain has already emptied)."""
        with self._lock:
            wake = not self._queue
            self._queue.append(settle)
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _drain(self) -> None:
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
        for settle in batch:
            settle()


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = (
    weakref.WeakKeyDictionary()
)
_inboxes_lock = threading.Lock()


def inbox() -> LoopInbox:
    """The inbox of the running loop (made on first use)."""
    loop = asyncio.get_running_loop()
    box = _inboxes.get(loop)
    if box is None:
        with _inboxes_lock:
            box = _inboxes.setdefault(loop, LoopInbox(loop))
    return box


def result_setter(fut: asyncio.Future[Any], value: Any) -> Settle:
    """A settle function: ``fut`` gets ``value`` (an exception is raised into it)."""

    def settle() -> None:
        if fut.done():  # cancelled meanwhile
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)

    return settle
