"""eager.start: work that never waits finishes in the caller, work that waits carries on
as a task from where it stopped, with what it awaited, and can be cancelled there."""

from __future__ import annotations

import asyncio

import pytest

from qsd_py.export.nbd import eager


async def test_work_without_a_wait_finishes_in_the_caller() -> None:
    done: list[str] = []

    async def work() -> None:
        done.append("ran")

    assert eager.start(work()) is None
    assert done == ["ran"]


async def test_an_error_without_a_wait_reaches_the_caller() -> None:
    async def work() -> None:
        raise OSError(5, "boom")

    with pytest.raises(OSError, match="boom"):
        eager.start(work())


async def test_work_that_waits_carries_on_as_a_task() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    seen: list[object] = []

    async def work() -> None:
        seen.append("before")
        seen.append(await first)
        await asyncio.sleep(0)
        seen.append(await second)

    rest = eager.start(work())
    assert rest is not None and seen == ["before"]
    task = loop.create_task(rest)
    await asyncio.sleep(0)
    assert not task.done()
    first.set_result(1)
    await asyncio.sleep(0)
    second.set_result(2)
    await task
    assert seen == ["before", 1, 2]


async def test_a_task_carrying_on_is_cancelled_inside_the_work() -> None:
    loop = asyncio.get_running_loop()
    never = loop.create_future()
    cleaned: list[str] = []

    async def work() -> None:
        try:
            await never
        finally:
            cleaned.append("finally")

    rest = eager.start(work())
    assert rest is not None
    task = loop.create_task(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"] and never.cancelled()
