#!/usr/bin/env python3
"""Micro-benchmark of the fast path's decision: nanoseconds of Python per 4 KiB request.

Times what a FUSE queue does for a READ or WRITE around its I/O (the I/O itself left out):
:func:`fastpath.decide` (the export's extent checks and :func:`fast_io.route`), then for a
write what follows it (the plan's ``mark`` of shared bitmaps, where the tree has it) and
``plan.done()``, with the node's length read from shared memory and the counters in a
row of its own, as a queue worker does. Chains: ``raw`` over ``file`` on tmpfs (the
benchmark matrix's tmpfs backend), a ``file`` alone, and ``null-co``. Robust on a loaded
machine: the best of many short timeit repeats of this thread's CPU time. Runs against
another tree too, to compare before and after::

    .venv/bin/python scripts/route_micro.py [--tree /work/wt/base] [--repeat 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

N = 20_000


def _setup(tree: Path) -> None:
    sys.path.insert(0, str(tree))


def _request(p: Any, offset: int, size: int) -> memoryview:
    arg = bytearray(p.READ_IN.size)
    p.IO_EXTENT.pack_into(arg, 0, offset, size)
    return memoryview(arg)


def _cases(image: str) -> list[tuple[str, dict[str, Any]]]:
    file_node = {"driver": "file", "filename": image}
    return [
        ("raw/file", {"driver": "raw", "node-name": "d0", "file": dict(file_node)}),
        ("file", {**file_node, "node-name": "f1"}),
        ("null-co", {"driver": "null-co", "node-name": "n0", "size": 1 << 30}),
    ]


def _time(fn: Any, repeat: int) -> float:
    # CPU time of this thread: time spent descheduled (a loaded machine) is not counted.
    return min(timeit.repeat(fn, number=N, repeat=repeat, timer=time.thread_time)) / N * 1e9


def _measure(name: str, engine: Any, plan: Any, arg: memoryview, repeat: int) -> None:
    """Print the ns of a 4 KiB write and read on ``plan``, as the io_uring queue does them
    in the tree measured (bitmaps marked after a write where it has them)."""
    from qsd_py.export.fuse import fastpath

    decide = fastpath.decide
    mark = getattr(plan, "mark", None)
    listed = getattr(plan, "listed", None)
    done = plan.done

    def write() -> None:
        action, a, b = decide(engine, plan, arg, 4096, True)
        if listed is None or listed[0]:
            if mark is not None:
                mark(8192, b)
        done()

    def read() -> None:
        decide(engine, plan, arg, 1 << 20, False)
        done()

    first = decide(engine, plan, arg, 4096, True)
    assert first[0] != fastpath.ENGINE, (name, first)
    w, r = _time(write, repeat), _time(read, repeat)
    print(f"{name:10s} write {w:6.0f} ns   read {r:6.0f} ns")


def _as_worker(node: Any) -> None:
    """Count as a queue worker does, in a row of its own claimed before its fork (and,
    where the tree has it, with the nodes below the top deriving that row)."""
    import importlib.util

    if importlib.util.find_spec("qsd_py.block.stats") is None:
        return  # a tree from before the counters
    from qsd_py.block import fast_io, stats

    row = stats.claim_process_row()
    if hasattr(fast_io, "share_counts"):
        fast_io.share_counts(fast_io.plan_for(node), row)
    stats.set_process_row(row)


async def run(repeat: int) -> None:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.export.fuse import fastpath
    from qsd_py.export.fuse import proto as p
    from qsd_py.export.fuse.engine import FuseEngine
    from qsd_py.export.fuse.shared_length import SharedLength

    fd, image = tempfile.mkstemp(dir="/dev/shm", prefix="route-micro-")
    os.ftruncate(fd, 1 << 30)
    os.close(fd)
    graph = BlockGraph()
    try:
        for name, opts in _cases(image):
            node = await graph.add(opts)
            engine = FuseEngine(node, writable=True)
            shared = SharedLength()  # as in a queue worker, whose node is a frozen copy
            shared.publish(node.length())
            node.length = shared.read
            _as_worker(node)
            plan = fastpath.plan_for(node)
            assert plan is not None
            _measure(name, engine, plan, _request(p, 8192, 4096), repeat)
    finally:
        await graph.close_all()
        os.unlink(image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    _setup(args.tree.resolve())
    print(f"tree {args.tree} ({N} requests per timing, best of {args.repeat})")
    asyncio.run(run(args.repeat))


if __name__ == "__main__":
    main()
