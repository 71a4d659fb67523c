#!/usr/bin/env python3
"""Micro-benchmark of a block job's target writes: the loop thread's CPU per 1 MiB write.

Writes 1 GiB in 1 MiB requests, 16 in flight (a mirror's or a backup's chunks), into a new
image on tmpfs (``/dev/shm``) with ``cache.direct=on``, in this process's loop: a fresh qcow2
made by the host's qemu-img (every write allocates 16 clusters), or a sparse raw file. The
data goes to the file in pool threads as in the daemon; what is timed is the loop thread's
CPU (``time.thread_time``), the Python the node spends per write, which the loaded 2-vCPU
VM lets through one core. The machine is shared: compare trees in alternating runs and
take the minimum (each ``--tree`` in turn, one run each, ``--runs`` times)::

    .venv/bin/python scripts/fresh_write_micro.py --tree . --tree /tmp/old-tree [--format raw]
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


async def one_run(fmt: str, mib: int, path: Path) -> float:
    """Loop-thread CPU milliseconds per MiB written."""
    from qsd_py.block.graph import BlockGraph

    path.unlink(missing_ok=True)
    if fmt == "qcow2":
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{mib}M"]
        subprocess.run(cmd, check=True)
    else:
        with open(path, "wb") as f:
            f.truncate(mib * MiB)
    graph = BlockGraph()
    try:
        file = {"driver": "file", "filename": str(path), "cache": {"direct": True}}
        node = await graph.add({"driver": fmt, "node-name": "t", "file": file})
        bufs = [memoryview(mmap.mmap(-1, MiB)) for _ in range(16)]
        for buf in bufs:
            buf[:] = os.urandom(MiB)
        slots = asyncio.Semaphore(16)

        async def write(i: int) -> None:
            try:
                await node.write(i * MiB, bufs[i % 16])
            finally:
                slots.release()

        tasks = []
        cpu = time.thread_time()
        for i in range(mib):
            await slots.acquire()
            tasks.append(asyncio.create_task(write(i)))
        await asyncio.gather(*tasks)
        cpu = time.thread_time() - cpu
    finally:
        await graph.close_all()
        path.unlink(missing_ok=True)
    return 1000 * cpu / mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", help="a qsd-py tree (default: this one)")
    ap.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(f"/dev/shm/fresh-write-micro-{os.getpid()}.{args.format}")
    trees = [str(Path(t).resolve()) for t in args.tree or [Path(__file__).parents[1]]]
    if args.child:  # one run in a fresh process of the tree asked for
        sys.path.insert(0, trees[0])
        print(f"{asyncio.run(one_run(args.format, args.mib, path)):.3f}")
        return
    argv = [sys.executable, __file__, "--child", "--format", args.format, "--mib", str(args.mib)]
    best = dict.fromkeys(trees, float("inf"))
    for _ in range(args.runs):
        for tree in trees:
            out = subprocess.run([*argv, "--tree", tree], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            best[tree] = min(best[tree], float(out.stdout))
            print(f"{tree} {args.format}: {out.stdout.strip()} ms/MiB", flush=True)
    for tree, ms in best.items():
        print(f"best of {args.runs}: {ms:.3f} ms of loop CPU per MiB  {tree}")


if __name__ == "__main__":
    main()
