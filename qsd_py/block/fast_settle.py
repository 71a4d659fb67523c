"""Waiting until the fast writes a plan's owner has in flight are done.

A job that needs every write through a node from some point on (mirror's pivot) closes the
node's fast plans to writes (:meth:`BlockNode.close_fast_writes`); a fast write that passed
its plan's check just before is still in flight, and it may land (and mark the node's shared
bitmaps) after the job looked. :meth:`BlockNode.settle_fast_writes` waits for those: each
owner of a plan (an NBD connection, a FUSE queue, the queue workers' transport) sets the
plan's ``settle`` to a coroutine function that returns once nothing the owner routed on the
fast path is in flight; :func:`settle_on` is that wait for an owner living on an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 5.0
_POLL_S = 0.0005


async def settle_on(loop: asyncio.AbstractEventLoop, busy: Callable[[], int], name: str) -> bool:
    """Wait until ``busy()`` (fast requests in flight, read on ``loop``) is 0. Run on
    ``loop`` itself: a callback there that routed a write before the plans were closed has
    started its transfer (and counted it) before the wait looks. False (logged) when it
    did not settle in :data:`SETTLE_TIMEOUT_S`."""

    async def wait() -> bool:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while busy():
            if time.monotonic() > deadline:
                log.error("%s: fast writes still in flight after %ss", name, SETTLE_TIMEOUT_S)
                return False
            await asyncio.sleep(_POLL_S)
        return True

    if loop is asyncio.get_running_loop():
        return await wait()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wait(), loop))
