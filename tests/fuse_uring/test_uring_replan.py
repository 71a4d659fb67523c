"""Queue workers follow every change of the plan under a writable FUSE-over-io_uring export
(issue 19), with writes racing through the mount from a subprocess.

The exports are hosted in this process (uring_support.UringServer); the workers are forks of
it, serving their queues from the image files through plans the host sends them. What changes
the plan here is what the block layer does for jobs and bitmaps, called directly: a dirty
bitmap closes fast writes (every write that starts after ``add_dirty_bitmap`` returned must be
marked in it), and a pivot that moves the export to another node, in the order mirror's does
(QEMU refuses a real mirror under a writable FUSE export; blockdev-snapshot and active commit
move a writable export the same way).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from uring_support import UringServer, pread_direct

from qsd_py.block.dirty import DirtyBitmap

MiB = 1 << 20
SIZE = 2 * MiB
ROUNDS = 20

# Random 4 KiB O_DIRECT writes to the mount until the file ``stop`` exists, each read back;
# one line per write once acknowledged: when it started (CLOCK_MONOTONIC, shared by every
# process), its offset and its byte.
WRITER = r"""
import mmap, os, random, sys, time
path, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
size = os.fstat(fd).st_size
rng = random.Random(seed)
buf, back = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
while not os.path.exists(stop):
    off = rng.randrange(size // 4096) * 4096
    byte = rng.randrange(1, 256)
    buf[:] = bytes([byte]) * 4096
    start = time.monotonic()
    assert os.pwritev(fd, [buf], off) == 4096
    assert os.preadv(fd, [back], off) == 4096 and back[:] == buf[:], f"write at {off} lost"
    print(start, off, byte, flush=True)
"""


class Writer:
    def __init__(self, mnt: Path, seed: int, stop: Path) -> None:
        self.stop = stop
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(mnt), str(seed), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.writes: list[tuple[float, int, int]] = []

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        goal = len(self.writes) + more
        deadline = time.monotonic() + timeout
        while len(self.writes) < goal:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"writer ended: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            start, off, byte = line.split()
            self.writes.append((float(start), int(off), int(byte)))
            assert time.monotonic() < deadline, "writer too slow"

    def wait_past(self, moment: float, more: int) -> None:
        """Until ``more`` writes that started after ``moment`` were acknowledged (lines
        already in the pipe are older)."""
        seen = 0
        while seen < more:
            self.wait_for(1)
            seen += self.writes[-1][0] > moment

    def finish(self) -> None:
        self.stop.touch()
        out = self.proc.stdout.read()  # type: ignore[union-attr]  # after what readline buffered
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert self.proc.wait(30) == 0, err
        for line in out.splitlines():
            start, off, byte = line.split()
            self.writes.append((float(start), int(off), int(byte)))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.stop.touch()
            self.proc.kill()
        self.proc.communicate()

    def model(self, initial: bytes) -> bytes:
        data = bytearray(initial)
        for _start, off, byte in self.writes:
            data[off : off + 4096] = bytes([byte]) * 4096
        return bytes(data)


def _node(userver: UringServer, tmp_path: Path, name: str, qcow2: bool, data: bytes = b"") -> Any:
    """Node ``name``: a raw image (with ``data``), or a fresh qcow2 image over a file."""
    if qcow2:
        path = tmp_path / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)],
                       check=True)  # fmt: skip
        spec = {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": str(path)}}  # fmt: skip
    else:
        path = tmp_path / f"{name}.img"
        path.write_bytes(data.ljust(SIZE, b"\0"))
        spec = {"driver": "file", "filename": str(path), "node-name": name}
    return userver.run(userver.daemon.graph.add(spec))


def _read_node(userver: UringServer, node: Any) -> bytes:
    async def read() -> bytes:
        buf = bytearray(SIZE)
        await node.read(0, memoryview(buf))
        return bytes(buf)

    return userver.run(read())


def _engine_requests(exp: Any) -> int:
    return sum(q["engine-requests"] for q in exp.stats()["uring-queues"])


def _export(
    userver: UringServer, tmp_path: Path, node: Any, iothreads: int = 0, uring: bool = True
) -> tuple[Any, Path]:
    """A writable export of ``node``: io_uring queues served by queue workers, or with
    ``iothreads`` on that many iothreads of this process; ``uring`` False: /dev/fuse queues
    (on those iothreads)."""
    mnt = tmp_path / "mnt"
    names = [f"io{i}" for i in range(iothreads)]
    for name in names:
        userver.iothread(name)
    opts = {"iothread": names} if names else {}
    exp = userver.export(node, mnt, writable=True, io_uring=uring, **opts)
    if uring:
        kind = "UringTransport" if iothreads else "WorkerTransport"
        assert exp.uring is not None and type(exp.uring).__name__ == kind
        assert {q["fast-path"] for q in exp.stats()["uring-queues"]} == {"uring"}
    return exp, mnt


@pytest.mark.parametrize(
    ("qcow2", "iothreads"),
    [(False, 0), (True, 0), (True, 2)],
    ids=["raw-workers", "qcow2-workers", "qcow2-iothreads"],
)
def test_bitmap_sees_every_write_after_it_was_added(
    userver: UringServer, tmp_path: Path, qcow2: bool, iothreads: int
) -> None:
    """20 times: a dirty bitmap is added while writes race through the workers, kept for a
    few writes and removed. Every write that started after ``add_dirty_bitmap`` returned is
    marked (it went through the daemon's node, not a worker's fast path); after the removal
    the workers write on their fast path again; the file ends as the model of every write.
    The plans replaced on the way give their cluster-table reader slots back."""
    node = _node(userver, tmp_path, "a", qcow2)
    exp, mnt = _export(userver, tmp_path, node, iothreads)
    initial = pread_direct(mnt, 0, SIZE)
    writer = Writer(mnt, 3, tmp_path / "stop")
    try:
        for _ in range(ROUNDS):
            writer.wait_for(5)
            bitmap = DirtyBitmap(SIZE, 4096)

            async def add(bm: DirtyBitmap = bitmap) -> float:
                node.add_dirty_bitmap(bm)
                return time.monotonic()

            added = userver.run(add())
            writer.wait_past(added, 8)
            userver.run(_call(node.remove_dirty_bitmap, bitmap))
            later = [off for start, off, _ in writer.writes if start > added]
            assert later, "no write started after the bitmap was added"
            unmarked = [off for off in later if bitmap.next_dirty(off, 4096) != (off, 4096)]
            assert not unmarked, f"writes that bypassed the bitmap at {unmarked}"
        engine = _engine_requests(exp)
        writer.wait_for(20)
        assert _engine_requests(exp) - engine < 20, "writes no longer take the fast path"
        if qcow2:
            readers = len(node.table._slots)
            assert readers <= 2 * len(exp.stats()["uring-queues"]) + 1, readers
        writer.finish()
    finally:
        writer.kill()
    assert pread_direct(mnt, 0, SIZE) == writer.model(initial)


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def _pivot(old: Any, new: Any) -> None:
    """Copy ``old`` to ``new`` while it is written, then move its users that can follow to
    ``new``, in mirror's order: a bitmap closes fast writes and marks what the copy must
    redo; the followers are drained (their requests in flight, on any loop, are done), the
    copy catches up, and the users move with no await, fast writes to ``old`` staying closed
    until they have."""
    bitmap = DirtyBitmap(SIZE, 65536)
    old.add_dirty_bitmap(bitmap)
    bitmap.mark_all()
    await _copy_dirty(old, new, bitmap)
    followers = [
        u
        for u in old.users.values()
        if u.repoint is not None and u.quiesce is not None and not u.is_parent
    ]
    resumes = [await u.quiesce() for u in followers]
    try:
        await _copy_dirty(old, new, bitmap)
        await new.flush()
        _move_users(old, new, bitmap)
    finally:
        for resume in resumes:
            resume()


async def _copy_dirty(old: Any, new: Any, bitmap: DirtyBitmap) -> None:
    """Copy what the bitmap marks until nothing is marked nor in flight on ``old``."""
    while bitmap.count or old.in_flight.count:
        run = bitmap.next_dirty(0, MiB)
        if run is None:
            await old.in_flight.wait_idle()
            continue
        bitmap.clear(*run)
        buf = bytearray(run[1])
        await old.read(run[0], memoryview(buf))
        await new.write(run[0], buf)


def _move_users(old: Any, new: Any, bitmap: DirtyBitmap) -> None:
    owner = object()
    old.close_fast_writes(owner)
    old.remove_dirty_bitmap(bitmap)
    for user in list(old.users.values()):
        if user.repoint is not None and not user.is_parent:
            new.set_user(user)
            old.remove_user(user.key)
            user.repoint(new)
    old.open_fast_writes(owner)


@pytest.mark.parametrize(
    ("iothreads", "uring"),
    [(0, True), (2, True), (2, False)],
    ids=["uring-workers", "uring-iothreads", "devfuse-iothreads"],
)
def test_writable_export_follows_twenty_pivots(
    userver: UringServer, tmp_path: Path, iothreads: int, uring: bool
) -> None:
    """20 pivots (raw and qcow2 nodes in turn) under a writable io_uring export while writes
    race through it: each write that started after a pivot returned is in the new node, none
    reaches an old one after its pivot (their bytes stay as they were), and the last node ends
    as the model of every write."""
    initial = bytes(range(256)) * (SIZE // 256)
    nodes = [_node(userver, tmp_path, "n0", False, initial)]
    exp, mnt = _export(userver, tmp_path, nodes[0], iothreads, uring)
    writer = Writer(mnt, 5, tmp_path / "stop")
    frozen: list[tuple[Any, str]] = []
    try:
        for i in range(1, ROUNDS + 1):
            writer.wait_for(5)
            new = _node(userver, tmp_path, f"n{i}", i % 2 == 1)
            userver.run(_pivot(nodes[-1], new))
            writer.wait_past(time.monotonic(), 3)  # writes that start on the new node
            assert exp.node is new
            frozen.append((nodes[-1], hashlib.sha256(_read_node(userver, nodes[-1])).hexdigest()))
            nodes.append(new)
        writer.finish()
    finally:
        writer.kill()
    model = writer.model(initial)
    assert pread_direct(mnt, 0, SIZE) == model
    assert _read_node(userver, nodes[-1]) == model
    for old, digest in frozen:
        assert hashlib.sha256(_read_node(userver, old)).hexdigest() == digest, old.node_name
    queues = exp.stats()["uring-queues" if uring else "queues"]
    assert {q["fast-path"] for q in queues} == ({"uring"} if uring else {"threads"})
