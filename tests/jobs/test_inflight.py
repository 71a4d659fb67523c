"""The jobs' copies in flight (qsd_py/jobs/inflight.py): a finished copy leaves the set on
its own, a wait ends when one finishes, and none in flight means no wait."""

from __future__ import annotations

import asyncio

from qsd_py.jobs.inflight import CopiesInFlight


async def test_wait_one_ends_with_the_first_finished_copy() -> None:
    ops = CopiesInFlight()
    gates = [asyncio.Event() for _ in range(3)]
    for i, gate in enumerate(gates):
        ops.start(gate.wait(), i * 10, i * 10 + 10)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert len(ops) == 3 and sorted(ops.ranges()) == [(0, 10), (10, 20), (20, 30)]
    waiter = asyncio.ensure_future(ops.wait_one())
    await asyncio.sleep(0)
    assert not waiter.done()
    gates[1].set()
    await asyncio.wait_for(waiter, 5)
    assert sorted(ops.ranges()) == [(0, 10), (20, 30)]
    for gate in gates:
        gate.set()
    await asyncio.wait_for(ops.wait_all(), 5)
    assert not ops and len(ops) == 0


async def test_no_copy_in_flight_no_wait() -> None:
    ops = CopiesInFlight()
    await asyncio.wait_for(ops.wait_one(), 1)
    await asyncio.wait_for(ops.wait_all(), 1)


async def test_a_failed_or_cancelled_copy_leaves_too() -> None:
    ops = CopiesInFlight()

    async def fail() -> None:
        raise OSError("lost")

    ops.start(fail(), 0, 1)
    ops.start(asyncio.sleep(3600), 1, 2)  # type: ignore[arg-type]
    await asyncio.wait_for(ops.wait_one(), 5)
    assert list(ops.ranges()) == [(1, 2)]
    for task in list(ops._tasks):
        task.cancel()
    await asyncio.wait_for(ops.wait_all(), 5)
    assert not ops
