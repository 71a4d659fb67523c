"""Load for the discard tests (test_qcow2_export_discard.py): a process that punches holes
into a region of an export and writes it again, or one that reads and writes it at random.

``python churn.py MODE PATH START LENGTH SEED STOPFILE`` runs until STOPFILE exists (or
:data:`LIMIT_S` passed), with O_DIRECT:

* ``punch``: punches one cluster (FALLOC_FL_PUNCH_HOLE), reads it, and writes it again with
  records; now and then two clusters at once;
* ``io``: random 4 KiB reads and writes of records.

A record (crash_writer.record) names the block offset it was written for. Whatever the
processes do to the same blocks, a block may only ever read as zeroes or as a record of its
own offset: anything else is data of another place, served through a cluster that was
freed and handed out again. Exit status 1 and the first such block on stderr if seen; the
operations done are printed on stdout.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import sys
import time

from crash_writer import BLOCK, MAGIC, RECORD, record

CLUSTER = 64 * 1024
LIMIT_S = 60.0
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def bad_block(data: memoryview, offset: int) -> str | None:
    """Why the blocks of ``data`` (read at ``offset``) are not zeroes or their own records."""
    zero = bytes(BLOCK)
    for i in range(0, len(data), BLOCK):
        block = bytes(data[i : i + BLOCK])
        if block == zero:
            continue
        magic, writer, _, seq, at = RECORD.unpack_from(block)
        if magic != MAGIC or block != record(writer, seq, at):
            return f"{offset + i:#x}: bytes that are no record (another place's data?)"
        if at != offset + i:
            return f"{offset + i:#x}: the record written for {at:#x}"
    return None


def run(mode: str, path: str, start: int, length: int, seed: int, stop: str) -> int:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 2 * CLUSTER)
    view = memoryview(buf)
    writer = 1 if mode == "punch" else 2
    seq = ops = 0
    end = time.monotonic() + LIMIT_S
    while not os.path.exists(stop) and time.monotonic() < end:
        seq += 1
        ops += 1
        if mode == "punch":
            n = CLUSTER * rng.choice((1, 1, 1, 2))
            offset = start + rng.randrange((length - n) // CLUSTER + 1) * CLUSTER
            punch(fd, offset, n)
            os.preadv(fd, [view[:n]], offset)
            why = bad_block(view[:n], offset)  # zeroes, unless an ``io`` process wrote
            if why:
                print(why, file=sys.stderr)
                return 1
        else:
            n = BLOCK
            offset = start + rng.randrange(length // BLOCK) * BLOCK
            if rng.random() < 0.5:
                os.preadv(fd, [view[:n]], offset)
                why = bad_block(view[:n], offset)
                if why:
                    print(why, file=sys.stderr)
                    return 1
                continue
        for i in range(0, n, BLOCK):
            view[i : i + BLOCK] = record(writer, seq, offset + i)
        os.pwritev(fd, [view[:n]], offset)
    print(ops)
    return 0


if __name__ == "__main__":
    mode, path, start, length, seed, stop = sys.argv[1:]
    raise SystemExit(run(mode, path, int(start), int(length), int(seed), stop))
