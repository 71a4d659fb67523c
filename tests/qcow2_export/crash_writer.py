"""A writer of the crash tests (crash_harness.py): a process of its own, so that it can be
waited for, or killed, whatever the FUSE mount it writes to does.

``python crash_writer.py PATH ID START LENGTH SEED SYNC LOG`` writes extents of 1 to 16 blocks
of 4 KiB with O_DIRECT at random places of ``[START, START + LENGTH)`` of PATH, and calls fsync
after every SYNC-th write. Each block is a record of (writer, sequence number, block offset)
repeated, so a block read back tells which write put it there. The LOG gets one line per
event, written with ``os.write`` before the next step: ``i SEQ OFFSET BLOCKS`` before a write
is issued, ``a SEQ`` once it was acknowledged, ``f SEQ`` once an fsync returned that was
called after write SEQ was acknowledged, ``e ERRNO`` when a request failed (the end).
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import sys
import time

BLOCK = 4096
RECORD = struct.Struct("<8sIIQQ")  # magic, writer, 0, sequence number, block offset
MAGIC = b"qsdcrash"
EXTENTS = (1, 1, 1, 2, 4, 8, 16)  # blocks per write: mostly single blocks, some long ones
WRITER_LIMIT_S = 60.0  # a writer gives up after this long even if nobody kills anything


def record(writer: int, seq: int, offset: int) -> bytes:
    """The 4 KiB that write ``seq`` of ``writer`` puts at ``offset``."""
    return RECORD.pack(MAGIC, writer, 0, seq, offset) * (BLOCK // RECORD.size)


def main(path: str, writer: int, start: int, length: int, seed: int, sync_every: int,
         log_path: str) -> int:  # fmt: skip
    """Write until a request fails (the daemon died) or :data:`WRITER_LIMIT_S` passed."""
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, max(EXTENTS) * BLOCK)
    blocks = length // BLOCK
    seq = 0
    end = time.monotonic() + WRITER_LIMIT_S
    try:
        while time.monotonic() < end:
            n = rng.choice(EXTENTS)
            offset = start + rng.randrange(blocks - n + 1) * BLOCK
            seq += 1
            for i in range(n):
                buf[i * BLOCK : (i + 1) * BLOCK] = record(writer, seq, offset + i * BLOCK)
            os.write(log, b"i %d %d %d\n" % (seq, offset, n))
            os.pwritev(fd, [memoryview(buf)[: n * BLOCK]], offset)
            os.write(log, b"a %d\n" % seq)
            if seq % sync_every == 0:
                os.fsync(fd)
                os.write(log, b"f %d\n" % seq)
    except OSError as err:
        os.write(log, b"e %d\n" % err.errno)
    return 0


if __name__ == "__main__":
    path, *nums, log_path = sys.argv[1:]
    writer, start, length, seed, sync_every = map(int, nums)
    raise SystemExit(main(path, writer, start, length, seed, sync_every, log_path))
