#!/usr/bin/env python3
"""Python bytecodes an :class:`~qsd_py.uring.aio.AsyncRing` executes around its requests.

Counts, with ``sys.settrace`` opcode events, what one flush of four rounds costs (a NOP
whose completion queues the next, as a FUSE reply, the request it fetches and the polls
after make rounds) and what dispatching one pinned completion costs. Unlike a timing, a
count does not move with the machine's load, so it compares two trees on a busy machine::

    .venv/bin/python scripts/uring_bytecodes.py [--tree /work/wt/base]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def bytecodes(fn: Callable[[], object]) -> tuple[int, list[tuple[str, int]]]:
    """Bytecodes one call of ``fn`` executes, in all and per function."""
    counts: collections.Counter[str] = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            counts[frame.f_code.co_name] += 1
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return sum(counts.values()), counts.most_common()


async def run() -> None:
    from qsd_py.uring.aio import AsyncRing

    ring = AsyncRing()
    try:
        left = [3]

        def chain(res: int) -> None:
            if left[0]:
                left[0] -= 1
                ring.submit_rw(0, -1, 0, 0, 0, chain)  # IORING_OP_NOP

        ring.submit_rw(0, -1, 0, 0, 0, chain)
        total, per = bytecodes(ring._flush)
        print(f"flush of 4 rounds: {total} bytecodes  {per}")
        pinned = ring.pin(lambda res: None)
        ring._inflight += 1
        total, per = bytecodes(lambda: ring._dispatch(pinned, 0, 0))
        print(f"pinned completion: {total} bytecodes  {per}")
    finally:
        ring.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    print(f"tree {args.tree}")
    asyncio.run(run())


if __name__ == "__main__":
    main()
