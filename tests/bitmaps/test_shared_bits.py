"""Bitmaps marked by forked processes (shared_bits.py): a fork made before the bitmap
existed finds it through the node's page, marks it, and the daemon's count sees the marks;
a bitmap taken off the list is not marked any more."""

from __future__ import annotations

import mmap
import os

from qsd_py.block import shared_bits
from qsd_py.block.dirty import DirtyBitmap


def _in_child(page: mmap.mmap, go: int, done: int, writes: list[tuple[int, int]]) -> None:
    """The fork: wait for the word, then mark ``writes`` through the page."""
    status = 1
    try:
        os.read(go, 1)
        marker = shared_bits.Marker(page)
        for offset, length in writes:
            marker.mark(offset, length)
        status = 0
    finally:
        os.write(done, b"x")
        os._exit(status)


def _fork_and_mark(page: mmap.mmap, publish, writes: list[tuple[int, int]]) -> None:
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _in_child(page, go_r, done_w, writes)
    try:
        publish()  # after the fork: the child must find the bitmap by itself
        os.write(go_w, b"x")
        assert os.read(done_r, 1) == b"x"
    finally:
        _, status = os.waitpid(pid, 0)
        for fd in (go_r, go_w, done_r, done_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_fork_marks_a_bitmap_made_after_it() -> None:
    page = mmap.mmap(-1, mmap.PAGESIZE)
    a, b = DirtyBitmap(1 << 20, 65536), DirtyBitmap(1 << 20, 4096)
    for bitmap in (a, b):
        bitmap.share()

    def publish() -> None:
        shared_bits.publish(page, [a.shared_entry(), b.shared_entry()])

    _fork_and_mark(page, publish, [(0, 1), (70000, 5000), ((1 << 20) - 1, 100)])
    assert [r[:2] for r in a.runs(0, 1 << 20) if r[2]] == [(0, 131072), (983040, 65536)]
    assert a.count == 3 * 65536
    assert b.count == (1 + 2 + 1) * 4096
    assert page[1] == 1

    # Only b stays listed: a fork's marks reach it alone.
    a.clear(0, 1 << 20)
    _fork_and_mark(page, lambda: shared_bits.publish(page, [b.shared_entry()]), [(500000, 1)])
    assert a.count == 0
    assert b.count == 5 * 4096
    shared_bits.publish(page, [])
    assert page[1] == 0
    for bitmap in (a, b):
        bitmap.unshare()
