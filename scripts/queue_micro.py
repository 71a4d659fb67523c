#!/usr/bin/env python3
"""Micro-benchmark of a FUSE-over-io_uring queue's Python per request, without the kernel's FUSE.

Drives one :class:`~qsd_py.export.fuse.uring.UringQueue` entry as a queue worker serves it:
the kernel's header of a 4 KiB WRITE or READ is written into the entry, then its completion
callback runs (``_on_cqe``: the request, ``decide``/``route``, the inline copy to or from a
file on tmpfs, the reply packed and its COMMIT_AND_FETCH queued on a stub ring that only
counts). The node is ``raw`` over ``file``, the benchmark matrix's tmpfs chain, its length
read from shared memory and its counters in a row of their own, as in a worker. The time is
this thread's CPU time (the copy's system call included), the best of many short repeats:
robust on a loaded machine. Runs against another tree too, to compare before and after::

    .venv/bin/python scripts/queue_micro.py [--tree /work/wt/base] [--repeat 30] [--profile]

On a loaded machine, shorter timings taken more often find quiet moments more surely
(``--number 2000 --repeat 300``): thread time includes what a hypervisor steals.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import mmap
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

N = 20_000


class StubRing:
    """What the queue asks of its AsyncRing on this path; submissions are dropped."""

    closed = False

    def submit_prebuilt(self, sqe: bytes, user_data: int, at: int = 0, patch: int = 0) -> int:
        return 0

    def enable_polling(self) -> None:
        pass


def _as_worker(node: Any) -> None:
    """A row of its own for the counters (and derived rows where the tree has them)."""
    if importlib.util.find_spec("qsd_py.block.stats") is None:
        return  # a tree from before the counters
    from qsd_py.block import fast_io, stats

    row = stats.claim_process_row()
    if hasattr(fast_io, "share_counts"):
        fast_io.share_counts(fast_io.plan_for(node), row)
    stats.set_process_row(row)


def _queue(node: Any) -> tuple[Any, Any]:
    """A queue of one entry on a stub ring, with the node's fast plan."""
    from qsd_py.export.fuse import fastpath
    from qsd_py.export.fuse import uring as u
    from qsd_py.export.fuse.engine import FuseEngine
    from qsd_py.export.fuse.shared_length import SharedLength

    engine = FuseEngine(node, writable=True)
    engine.max_write = 1 << 20
    shared = SharedLength()
    shared.publish(node.length())
    node.length = shared.read
    q = u.UringQueue(0, -1, engine, asyncio.get_running_loop(), depth=1,
                     payload_size=1 << 20, name="micro")  # fmt: skip
    entry = u._Entry(q, memoryview(mmap.mmap(-1, 4096))[: u.HEADER_SIZE],
                     memoryview(mmap.mmap(-1, 1 << 20)))  # fmt: skip
    q.entries, q.ring = [entry], StubRing()
    plan = fastpath.plan_for(node, ring_io=True)
    if hasattr(q, "install"):
        q.install(plan)
    else:
        q.plan = plan
    return q, entry


def bytecodes(fn: Any) -> int:
    """Python bytecodes one call of ``fn`` executes (the stub's included): unlike its time,
    the same on a loaded machine, and what a change of the Python path changes."""
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


async def run(repeat: int, profile: bool, number: int = N) -> None:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.export.fuse import proto as p

    fd, image = tempfile.mkstemp(dir="/dev/shm", prefix="queue-micro-")
    os.ftruncate(fd, 1 << 30)
    os.close(fd)
    graph = BlockGraph()
    try:
        node = await graph.add({"driver": "raw", "node-name": "d0",
                                "file": {"driver": "file", "filename": image}})  # fmt: skip
        _as_worker(node)
        q, entry = _queue(node)
        op = [p.WRITE]

        def one() -> None:
            p.IN_HEADER.pack_into(entry.hdr, 0, 80, op[0], 1, 1, 0, 0, 0, 0, 0)  # the kernel's
            entry.live = True
            q.live += 1
            entry.on_cqe(0)

        p.WRITE_IN.pack_into(entry.hdr, p.URING_ARG_OFFSET, 1, 8192, 4096, 0, 0, 0, 0)
        out = []
        for name, code in (("write", p.WRITE), ("read", p.READ)):
            op[0] = code
            one()
            assert q.stats.engine_requests == 0, "the request took the engine"
            best = min(timeit.repeat(one, number=number, repeat=repeat, timer=time.thread_time))
            out.append(f"{name} {best / number * 1e9:6.0f} ns ({bytecodes(one)} bytecodes)")
        assert q.stats.bytes_written > 4096 and q.stats.bytes_read > 4096
        print("   ".join(out))
        if profile:
            import cProfile
            import pstats

            op[0] = p.WRITE
            prof = cProfile.Profile()
            prof.runcall(lambda: [one() for _ in range(N)])
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    finally:
        await graph.close_all()
        os.unlink(image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--number", type=int, default=N, help="requests per timing")
    ap.add_argument("--profile", action="store_true", help="cProfile the writes too")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    print(f"tree {args.tree} ({args.number} requests per timing, best of {args.repeat})")
    asyncio.run(run(args.repeat, args.profile, args.number))


if __name__ == "__main__":
    main()
