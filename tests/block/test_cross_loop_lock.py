"""CrossLoopLock: one holder at a time, waiters served in order, on their own loop.

A release hands the lock to the next waiter; a waiter on the releasing loop is woken with a
plain ``call_soon``, one on another loop through its thread-safe wake-up. Both roads are
exercised here, with a check that two holders never overlap.
"""

from __future__ import annotations

import asyncio
import threading

from qsd_py.block.lock import CrossLoopLock


async def test_same_loop_waiters_in_order_and_alone() -> None:
    lock = CrossLoopLock()
    holders: list[int] = []
    order: list[int] = []

    async def worker(n: int) -> None:
        async with lock:
            holders.append(n)
            assert len(holders) == 1
            order.append(n)
            await asyncio.sleep(0.001)
            holders.remove(n)

    await asyncio.gather(*(worker(n) for n in range(20)))
    assert order == list(range(20))


async def test_waiter_on_another_loop_gets_the_lock() -> None:
    lock = CrossLoopLock()
    inside = threading.Event()
    got: list[str] = []
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()

    async def remote() -> None:
        async with lock:
            got.append("remote")
            inside.set()

    try:
        async with lock:
            future = asyncio.run_coroutine_threadsafe(remote(), other)
            await asyncio.sleep(0.05)
            assert not got  # held here: the other loop waits
        await asyncio.wrap_future(future)
        assert got == ["remote"] and inside.is_set()
        async with lock:  # free again for this loop
            got.append("local")
        assert got == ["remote", "local"]
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(5)
        other.close()


async def test_cancelled_waiter_passes_the_lock_on() -> None:
    lock = CrossLoopLock()
    await lock.__aenter__()
    cancelled = asyncio.ensure_future(lock.__aenter__())
    later: list[int] = []

    async def next_one() -> None:
        async with lock:
            later.append(1)

    waiting = asyncio.ensure_future(next_one())
    await asyncio.sleep(0)
    cancelled.cancel()
    await lock.__aexit__(None, None, None)
    await asyncio.wait_for(waiting, 2)
    assert later == [1]
