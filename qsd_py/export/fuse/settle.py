"""Making a plan change take effect on queues served by other threads (iothreads).

A queue on an iothread reads its plan between requests on its own loop; the daemon changes
what the plan must be (a pivot, fast writes closed) on the main loop. :func:`drop_and_settle`
is the in-process counterpart of a queue worker's acknowledgement (workers.py): it has the
queue drop its plan *on its loop*, so no request starts on it afterwards, then waits until
the fast-path transfers it had started are done. Blocking, like the workers' round trip: a
few I/O latencies, after which no request of that queue can reach the old plan's file. The
new plan is then made on the queue's loop without waiting (requests take the engine until
it is there).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("qsd_py.export.fuse")

SETTLE_TIMEOUT_S = 5.0
_POLL_S = 0.0001


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def drop_and_settle(
    loop: asyncio.AbstractEventLoop,
    drop: Callable[[], None],
    busy: Callable[[], int],
    then: Callable[[], None],
    name: str,
) -> bool:
    """Run ``drop`` on ``loop``, wait until ``busy()`` is 0, then queue ``then`` there.
    On the caller's own loop the drop and ``then`` run at once (its transfers cannot finish
    while it waits). False (logged) if the queue did not settle in time."""
    if loop is _running():
        drop()
        then()
        return True
    ran = threading.Event()

    def call() -> None:
        try:
            drop()
        finally:
            ran.set()

    loop.call_soon_threadsafe(call)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    settled = ran.wait(SETTLE_TIMEOUT_S)
    while settled and busy():
        if time.monotonic() > deadline:
            settled = False
            break
        time.sleep(_POLL_S)
    loop.call_soon_threadsafe(then)
    if not settled:
        log.error("%s: the queue did not settle on its new plan in time", name)
    return settled
