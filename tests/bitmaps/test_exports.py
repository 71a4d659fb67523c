"""Writes from every export mark the node's bitmaps: a qsd-py daemon with a raw node, a
bitmap added by QMP, a FUSE export over /dev/fuse, one over FUSE-over-io_uring (served by
the per-CPU queue workers) and a writable NBD export offering the bitmap. Concurrent writers
on all three; then ``nbdinfo --map=qemu:dirty-bitmap:b`` and query-named-block-nodes must say
exactly which chunks were written (a chunk a bitmap misses is data an incremental backup
loses)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bitmap_support import dirty_runs

SIZE = 16 << 20
GRAN = 65536


def _pwrite_all(path: Path, writes: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length in writes:
            os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _nbd_writes(url: str, writes: list[tuple[int, int]]) -> None:
    cmds = [arg for offset, length in writes for arg in ("-c", f"write {offset} {length}")]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, url], check=True, capture_output=True)


def _plan(rng: random.Random, count: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(count):
        offset = rng.randrange(SIZE - 4096)
        out.append((offset, min(rng.randint(1, 40_000), SIZE - offset)))
    return out


def _wait_exports_gone(qmp, timeout: float = 10.0) -> None:
    """block-export-del returns before the export is gone (BLOCK_EXPORT_DELETED)."""
    deadline = time.monotonic() + timeout
    while qmp.cmd("query-block-exports"):
        assert time.monotonic() < deadline, "exports not gone"
        time.sleep(0.02)


def _engine_requests(qmp) -> int:
    """Requests the io_uring queues' workers handed to the daemon's engine."""
    (export,) = qmp.cmd("x-query-fuse-queues")
    return sum(q["engine-requests"] for q in export["uring-queues"])


def _serialized(chunks: set[int]) -> bytes:
    nchunks = SIZE // GRAN
    out = bytearray(8 * max(1, -(-nchunks // 64)))
    for c in chunks:
        out[c // 8] |= 1 << (c % 8)
    return bytes(out)


def test_writes_from_all_exports_mark_the_bitmap(qsd, uring_knob, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    fuse, uring = tmp_path / "fuse.raw", tmp_path / "uring.raw"
    fuse.touch()
    uring.touch()
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
    )  # fmt: skip
    qmp = daemon.qmp()
    try:
        qmp.cmd("block-dirty-bitmap-add", node="d0", name="b", granularity=GRAN)
        qmp.cmd("block-export-add", type="fuse", id="e1", **{"node-name": "d0"},
                mountpoint=str(fuse), writable=True)  # fmt: skip
        qmp.cmd("block-export-add", type="fuse", id="e2", **{"node-name": "d0"},
                mountpoint=str(uring), writable=True, io_uring=True)  # fmt: skip
        url = f"nbd+unix:///d0?socket={sock}"
        rng = random.Random(20)
        plans = [_plan(rng, 150), _plan(rng, 150), _plan(rng, 60)]
        workers = [
            threading.Thread(target=_pwrite_all, args=(fuse, plans[0], 1)),
            threading.Thread(target=_pwrite_all, args=(uring, plans[1], 2)),
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
        # A writable FUSE export needs the resize permission that NBD exports unshare.
        qmp.cmd("block-export-del", id="e1")
        qmp.cmd("block-export-del", id="e2")
        _wait_exports_gone(qmp)
        qmp.cmd("block-export-add", type="nbd", id="e3", **{"node-name": "d0"},
                name="d0", writable=True, bitmaps=["b"])  # fmt: skip
        _nbd_writes(url, plans[2])
        chunks: set[int] = set()
        for offset, length in (w for plan in plans for w in plan):
            chunks.update(range(offset // GRAN, (offset + length - 1) // GRAN + 1))
        want = []
        for c in sorted(chunks):
            if want and want[-1][0] + want[-1][1] == c * GRAN:
                want[-1] = (want[-1][0], want[-1][1] + GRAN)
            else:
                want.append((c * GRAN, GRAN))
        assert dirty_runs(url, "b") == want
        nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
        (info,) = nodes["d0"]["dirty-bitmaps"]
        assert info == {"name": "b", "recording": True, "persistent": False, "busy": True,
                        "granularity": GRAN, "count": len(chunks) * GRAN}  # fmt: skip
        sha = qmp.cmd("x-debug-block-dirty-bitmap-sha256", node="d0", name="b")["sha256"]
        assert sha == hashlib.sha256(_serialized(chunks)).hexdigest()
        # Cleared (once no export holds it), the next writes are the only ones seen.
        qmp.cmd("block-export-del", id="e3")
        _wait_exports_gone(qmp)
        qmp.cmd("block-dirty-bitmap-clear", node="d0", name="b")
        qmp.cmd("block-export-add", type="fuse", id="e5", **{"node-name": "d0"},
                mountpoint=str(uring), writable=True, io_uring=True)  # fmt: skip
        _pwrite_all(uring, [(5 * GRAN + 100, 10), (9 * GRAN, GRAN + 1)], 3)
        qmp.cmd("block-export-del", id="e5")
        _wait_exports_gone(qmp)
        qmp.cmd("block-export-add", type="nbd", id="e4", **{"node-name": "d0"},
                name="d0", bitmaps=["b"], writable=True)  # fmt: skip
        assert dirty_runs(url, "b") == [(5 * GRAN, GRAN), (9 * GRAN, 2 * GRAN)]
    finally:
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(EOFError):  # the daemon may hang up first, as QEMU does
            qmp.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_bitmap_added_while_queue_workers_write(qsd, uring_knob, tmp_path: Path, fmt: str) -> None:
    """The per-CPU queue workers were forked before the bitmap existed: every write they
    start once block-dirty-bitmap-add returned is in the bitmap, marked by the workers
    themselves (the bitmap's bytes are shared with them: qsd_py/block/shared_bits.py), so
    their writes stay on their queues. qcow2: fresh clusters are allocated by the daemon
    for the worker, which then writes them itself."""
    image = tmp_path / "disk.img"
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)],
                       check=True)  # fmt: skip
    else:
        with open(image, "wb") as f:
            f.truncate(SIZE)
    uring = tmp_path / "uring.raw"
    uring.touch()
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", f"driver={fmt},node-name=d0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=fuse,id=e2,node-name=d0,mountpoint={uring},writable=on,io_uring=on",
    )  # fmt: skip
    qmp = daemon.qmp()
    stop = threading.Event()
    after: list[tuple[int, int]] = []
    added = threading.Event()

    def writer() -> None:
        rng = random.Random(5)
        fd = os.open(uring, os.O_WRONLY)
        try:
            while not stop.is_set():
                offset, length = _plan(rng, 1)[0]
                counted = added.is_set()  # read before the write starts
                os.pwrite(fd, b"w" * length, offset)
                if counted:
                    after.append((offset, length))
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        qmp.cmd("block-dirty-bitmap-add", node="d0", name="b", granularity=GRAN)
        added.set()
        before = _engine_requests(qmp)
        while len(after) < 200:
            time.sleep(0.01)
        stop.set()
        thread.join(30)
        # The workers marked the bitmap themselves: their writes stayed on their queues
        # (qcow2's first writes to a cluster need the daemon to allocate it, bitmap or not).
        if fmt == "raw":
            assert _engine_requests(qmp) - before < 20
        qmp.cmd("block-export-del", id="e2")
        _wait_exports_gone(qmp)
        qmp.cmd("block-export-add", type="nbd", id="e3", **{"node-name": "d0"},
                name="d0", bitmaps=["b"], writable=True)  # fmt: skip
        marked = set()
        for start, length in dirty_runs(f"nbd+unix:///d0?socket={sock}", "b"):
            marked.update(range(start // GRAN, (start + length) // GRAN))
        for offset, length in after:
            assert set(range(offset // GRAN, (offset + length - 1) // GRAN + 1)) <= marked
    finally:
        stop.set()
        thread.join(30)
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(EOFError):
            qmp.close()


def test_bitmap_of_a_node_below_the_export(qsd, uring_knob, tmp_path: Path) -> None:
    """A bitmap on the file node under the exported raw node (with an ``offset`` window):
    the workers' writes reach it through the daemon's nodes, at the file's offsets."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE + GRAN)
    uring = tmp_path / "uring.raw"
    uring.touch()
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", f"driver=raw,node-name=d0,file=f0,offset={GRAN},size={SIZE}",
        "--export", f"type=fuse,id=e2,node-name=d0,mountpoint={uring},writable=on,io_uring=on",
    )  # fmt: skip
    qmp = daemon.qmp()
    try:
        qmp.cmd("block-dirty-bitmap-add", node="f0", name="b", granularity=GRAN)
        _pwrite_all(uring, [(0, 10), (3 * GRAN, 2 * GRAN)], 6)
        nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
        (info,) = nodes["f0"]["dirty-bitmaps"]
        assert info["count"] == 3 * GRAN  # chunks 1, 4 and 5 of the file
        sha = qmp.cmd("x-debug-block-dirty-bitmap-sha256", node="f0", name="b")["sha256"]
        nchunks = (SIZE + GRAN) // GRAN
        want = bytearray(8 * -(-nchunks // 64))
        for c in (1, 4, 5):
            want[c // 8] |= 1 << (c % 8)
        assert sha == hashlib.sha256(bytes(want)).hexdigest()
    finally:
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(EOFError):
            qmp.close()
