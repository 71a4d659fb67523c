"""aio=threads: ThreadPoolBackend.run hands results, exceptions and cancellations back to the
awaiting loop, and its pool grows only while every worker is busy."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from qsd_py.block.aio import ThreadPoolBackend


def pool_threads() -> set[int]:
    """Idents of the threads a ThreadPoolBackend pool started (named qsd-aio-cb)."""
    return {t.ident for t in threading.enumerate() if t.name == "qsd-aio-cb" and t.ident}


async def test_run_returns_result_from_another_thread() -> None:
    backend = ThreadPoolBackend(max_workers=4)
    main = threading.get_ident()
    ident = await backend.run(threading.get_ident)
    assert ident != main
    assert await backend.run(divmod, 17, 5) == (3, 2)


async def test_run_raises_the_callers_exception() -> None:
    backend = ThreadPoolBackend(max_workers=4)
    with pytest.raises(FileNotFoundError):
        await backend.run(os.stat, "/nonexistent/qsd-py")
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as e:
        await backend.fdatasync(r)
    assert e.value.errno == 9  # EBADF
    with pytest.raises(ValueError):  # not only OSError crosses over
        await backend.run(int, "x")


async def test_sequential_calls_reuse_one_worker() -> None:
    """A caller quicker than the worker must not start a second thread (the 200-cycle test in
    tests/test_cycles.py counts the daemon's threads)."""
    backend = ThreadPoolBackend(max_workers=8)
    before = pool_threads()
    idents = {await backend.run(threading.get_ident) for _ in range(500)}
    assert len(idents) == 1
    assert len(pool_threads() - before) == 1


async def test_concurrent_calls_grow_the_pool_to_its_bound() -> None:
    backend = ThreadPoolBackend(max_workers=3)
    gate = threading.Barrier(3, timeout=5)  # three calls must be running at once
    before = pool_threads()
    idents = await asyncio.gather(*(backend.run(lambda: (gate.wait(), threading.get_ident())[1])
                                    for _ in range(3)))  # fmt: skip
    assert len(set(idents)) == 3
    await asyncio.gather(*(backend.run(threading.get_ident) for _ in range(20)))
    assert len(pool_threads() - before) == 3


async def test_cancelled_waiter_does_not_break_the_pool() -> None:
    backend = ThreadPoolBackend(max_workers=2)
    release = threading.Event()
    task = asyncio.ensure_future(backend.run(release.wait, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await backend.run(sum, (1, 2, 3)) == 6
