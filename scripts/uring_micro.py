#!/usr/bin/env python3
"""Micro-benchmark of the io_uring binding: microseconds per operation on one asyncio loop.

Measures NOP round trips (QD1), batched NOPs, and 4 KiB reads from a file (tmpfs by default)
at QD1 and QD16 through AsyncRing, against os.preadv in a thread pool (what ``aio=threads``
does) and a plain os.preadv in the loop (the floor). Each case is run for several ring flag
sets so the default can be chosen on numbers.

    .venv/bin/python scripts/uring_micro.py [--dir /dev/shm] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qsd_py.uring import abi  # noqa: E402
from qsd_py.uring.aio import ASYNC_RING_FLAGS, AsyncRing  # noqa: E402
from qsd_py.uring.ring import Ring  # noqa: E402

FLAG_SETS = {
    "plain": abi.SETUP_SQE128 | abi.SETUP_SUBMIT_ALL,
    "coop": abi.SETUP_SQE128
    | abi.SETUP_SUBMIT_ALL
    | abi.SETUP_COOP_TASKRUN
    | abi.SETUP_TASKRUN_FLAG,
    "defer": ASYNC_RING_FLAGS,
}
FILE_SIZE = 64 << 20
BLOCK = 4096


async def timed(seconds: float, batch: int, body: Callable[[], Coroutine[Any, Any, None]]) -> float:
    """Run ``body`` (which does ``batch`` ops) repeatedly for ``seconds``: us per op."""
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            await body()
        n += 20 * batch
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / n * 1e6


def sync_nop(seconds: float) -> float:
    """Ring without asyncio: the floor of a Python submit+reap round trip."""
    with Ring(64) as ring:
        sink = [0]

        def cb(ud: int, res: int, fl: int) -> None:
            sink[0] = res

        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(1000):
                ring.prep_nop(1)
                ring.submit(wait_nr=1)
                ring.reap(cb)
            n += 1000
        return (time.perf_counter() - start) / n * 1e6


async def bench_ring(flags: int, fd: int, seconds: float) -> dict[str, float]:
    ring = AsyncRing(entries=256, flags=flags)
    loop = asyncio.get_running_loop()
    out: dict[str, float] = {}
    try:
        out["nop_qd1"] = await timed(seconds, 1, ring.nop)

        async def nops_cb() -> None:
            # 32 NOPs through the callback API, one submit: the FUSE transport's shape.
            fut = loop.create_future()
            left = [32]

            def cb(res: int) -> None:
                left[0] -= 1
                if not left[0]:
                    fut.set_result(None)

            for _ in range(32):
                ring.submit_rw(abi.OP_NOP, -1, 0, 0, 0, cb)
            await fut

        out["nop_batch32_cb"] = await timed(seconds, 32, nops_cb)
        mv = memoryview(bytearray(BLOCK))
        blocks = FILE_SIZE // BLOCK
        pos = [0]

        async def read_qd1() -> None:
            pos[0] = (pos[0] * 7919 + 1) % blocks
            await ring.read(fd, mv, pos[0] * BLOCK)

        out["read4k_qd1"] = await timed(seconds, 1, read_qd1)
        bufs = [memoryview(bytearray(BLOCK)) for _ in range(16)]

        async def worker(i: int, count: int) -> None:
            p = i
            for _ in range(count):
                p = (p * 7919 + 1) % blocks
                await ring.read(fd, bufs[i], p * BLOCK)

        async def read_qd16() -> None:
            await asyncio.gather(*[worker(i, 32) for i in range(16)])

        out["read4k_qd16"] = await timed(seconds, 16 * 32, read_qd16)
    finally:
        ring.close()
    return out


async def bench_threads(fd: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    blocks = FILE_SIZE // BLOCK
    out: dict[str, float] = {}
    mv = memoryview(bytearray(BLOCK))
    pos = [0]

    async def qd1() -> None:
        pos[0] = (pos[0] * 7919 + 1) % blocks
        await loop.run_in_executor(pool, os.preadv, fd, [mv], pos[0] * BLOCK)

    out["read4k_qd1"] = await timed(seconds, 1, qd1)
    bufs = [memoryview(bytearray(BLOCK)) for _ in range(16)]

    async def worker(i: int, count: int) -> None:
        p = i
        for _ in range(count):
            p = (p * 7919 + 1) % blocks
            await loop.run_in_executor(pool, os.preadv, fd, [bufs[i]], p * BLOCK)

    async def qd16() -> None:
        await asyncio.gather(*[worker(i, 32) for i in range(16)])

    out["read4k_qd16"] = await timed(seconds, 16 * 32, qd16)

    async def inline() -> None:
        pos[0] = (pos[0] * 7919 + 1) % blocks
        os.preadv(fd, [mv], pos[0] * BLOCK)

    out["read4k_inline_preadv"] = await timed(seconds, 1, inline)
    pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm", help="where the test file lives (tmpfs)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per case")
    args = ap.parse_args()
    path = Path(args.dir) / f"uring-micro-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = os.urandom(1 << 20)
        for i in range(FILE_SIZE >> 20):
            os.pwrite(fd, chunk, i << 20)
        rows: dict[str, dict[str, float]] = {}
        rows["sync Ring"] = {"nop_qd1": sync_nop(args.seconds)}
        for name, flags in FLAG_SETS.items():
            rows[f"AsyncRing {name}"] = asyncio.run(bench_ring(flags, fd, args.seconds))
        rows["threads (preadv)"] = asyncio.run(bench_threads(fd, args.seconds))
    finally:
        os.close(fd)
        path.unlink()
    cols = sorted({c for r in rows.values() for c in r})
    print(f"us/op, file on {args.dir}, {args.seconds}s per case")
    print(f"{'':20}" + "".join(f"{c:>22}" for c in cols))
    for name, r in rows.items():
        print(f"{name:20}" + "".join(f"{r[c]:>22.2f}" if c in r else f"{'-':>22}" for c in cols))


if __name__ == "__main__":
    main()
