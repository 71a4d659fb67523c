"""IOThread objects: a real thread running its own asyncio event loop.

Exports hand work to an iothread by scheduling coroutines or callbacks on its loop; a FUSE
export with an iothread list serves one cloned /dev/fuse fd (or one io_uring queue set) on
each of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from qsd_py.uring import close_loop_ring

T = TypeVar("T")


class IOThread:
    """A named thread with an asyncio loop, started at creation, stopped by :meth:`stop`."""

    def __init__(self, obj_id: str, opts: dict[str, Any] | None = None) -> None:
        self.id = obj_id
        self.opts = opts or {}
        # Polling and pool parameters, readable and settable by qom-get/qom-set. asyncio
        # has no adaptive polling, so they are kept and shown, not applied.
        from qsd_py.objects.qom import LOOP_DEFAULTS

        self.params = {k: self.opts.get(k, v) for k, v in LOOP_DEFAULTS.items()}
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"iothread-{obj_id}", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            # io_uring rings are per loop and must be closed on their own thread.
            close_loop_ring(self.loop)
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on this thread's loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this thread's loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "thread-id": self.thread.native_id or 0}
