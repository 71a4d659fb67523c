"""NBD and /dev/fuse writes stay on their fast path while a user's bitmap records, and the
bitmap sees every one of them: the daemon's fast paths mark the node's shared bitmaps
themselves after each write (FastPlan.mark, as the queue workers do), before the reply.

Writers run while the bitmap is added; every write started after block-dirty-bitmap-add
returned must be in it (``nbdinfo --map=qemu:dirty-bitmap:NAME``), and nothing not
written may be. The image is on the disk (fast writes are ring transfers), on a tmpfs
(inline copies), or a qcow2 image (through its cluster table)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bitmap_support import dirty_runs, random_extent, wait_exports_gone

SIZE = 64 << 20  # 1024 chunks: few are written twice, so a missed mark shows
GRAN = 65536
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libnbd

# An NBD writer: seeded writes (aligned 4 KiB ones and odd ones) until ``stop`` exists; a
# line "offset length counted" once each is acknowledged, counted when ``flag`` existed
# before the write was sent.
NBD_WRITER = r"""
import nbd, os, random, sys
uri, seed, flag, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
while not os.path.exists(stop):
    if rng.random() < 0.5:
        off, n = rng.randrange(size // 4096) * 4096, 4096
    else:
        off = rng.randrange(size - 4096)
        n = min(rng.randint(1, 40000), size - off)
    counted = os.path.exists(flag)
    h.pwrite(rng.randbytes(n), off)
    print(off, n, int(counted), flush=True)
h.shutdown()
"""


def _chunks(offset: int, length: int) -> set[int]:
    return set(range(offset // GRAN, (offset + length - 1) // GRAN + 1))


def _marked(url: str, name: str) -> set[int]:
    out: set[int] = set()
    for start, length in dirty_runs(url, name):
        out.update(range(start // GRAN, (start + length) // GRAN))
    return out


def _check(qmp, url: str, name: str, must: list, written: list) -> None:
    """Through an export offering bitmap ``name`` (taken away again): every write of
    ``must`` counted after the add is marked, and nothing outside ``written`` is."""
    qmp.cmd("block-export-add", type="nbd", id="view", **{"node-name": "d0"}, name="view",
            writable=True, bitmaps=[name])  # fmt: skip
    try:
        marked = _marked(url, name)
    finally:
        qmp.cmd("block-export-del", id="view")
        wait_exports_gone(qmp, "view")
    missed = [(o, n) for o, n, c in must if c and not _chunks(o, n) <= marked]
    assert not missed, f"bitmap {name} missed {len(missed)} writes: {missed[:5]}"
    assert marked <= set().union(*(_chunks(o, n) for o, n, _ in written)), (
        f"bitmap {name} marks chunks nobody wrote"
    )


def _fuse_writer(path: Path, seed: int, added: threading.Event, stop: threading.Event,
                 log: list[tuple[int, int, bool]]) -> None:  # fmt: skip
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        while not stop.is_set():
            offset, length = random_extent(rng, SIZE, 40000)
            counted = added.is_set()  # read before the write starts
            os.pwrite(fd, rng.randbytes(length), offset)
            log.append((offset, length, counted))
    finally:
        os.close(fd)


def _engine_requests(qmp) -> int:
    (export,) = qmp.cmd("x-query-fuse-queues")
    return sum(q["engine-requests"] for q in export["queues"])


@pytest.fixture(params=["disk", "memory", "qcow2"])
def image(request, tmp_path: Path):
    """The image and its format: raw in the test's directory, raw on a tmpfs mounted for
    the test, or qcow2 with preallocated metadata (writes in place, through the cluster
    table) in the test's directory."""
    where = tmp_path
    if request.param == "memory":
        where = tmp_path / "mem"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs: {done.stderr}")
    path = where / "disk.img"
    fmt = "qcow2" if request.param == "qcow2" else "raw"
    try:
        if fmt == "qcow2":
            opts = ["-o", "preallocation=metadata"]
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(SIZE)],
                           check=True)  # fmt: skip
        else:
            with open(path, "wb") as f:
                f.truncate(SIZE)
        yield path, fmt
    finally:
        if where != tmp_path:
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_dev_fuse_and_nbd_writes_mark_the_bitmap_on_their_fast_path(
    qsd, tmp_path: Path, image: tuple[Path, str]
) -> None:
    path, fmt = image
    mnt = tmp_path / "fuse.raw"
    mnt.touch()
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={path}",
        "--blockdev", f"driver={fmt},node-name=d0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=fuse,id=e1,node-name=d0,mountpoint={mnt},writable=on",
    )  # fmt: skip
    qmp = daemon.qmp()
    url = f"nbd+unix:///view?socket={sock}"
    writers: list[subprocess.Popen[str]] = []
    try:
        # Phase 1: /dev/fuse writers (two threads); bitmap "b" is added while they write.
        added, stop = threading.Event(), threading.Event()
        logs: list[list[tuple[int, int, bool]]] = [[], []]
        threads = [threading.Thread(target=_fuse_writer, args=(mnt, i, added, stop, logs[i]))
                   for i in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(0.2)
        qmp.cmd("block-dirty-bitmap-add", node="d0", name="b", granularity=GRAN)
        before = _engine_requests(qmp)
        added.set()
        deadline = time.monotonic() + 60
        while sum(c for log in logs for *_, c in log) < 200:
            assert time.monotonic() < deadline, "fuse writers too slow"
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(30)
        engine = _engine_requests(qmp) - before
        fuse_writes = [w for log in logs for w in log]
        assert engine < 20, f"{engine} of the fuse writes took the engine"
        qmp.cmd("block-export-del", id="e1")
        wait_exports_gone(qmp)
        _check(qmp, url, "b", fuse_writes, fuse_writes)
        # Phase 2: two NBD writers on export "w"; bitmap "b2" is added while they write.
        qmp.cmd("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w",
                writable=True)  # fmt: skip
        flag, halt = tmp_path / "added", tmp_path / "halt"
        writers = [
            subprocess.Popen([SYSTEM_PYTHON, "-c", NBD_WRITER, f"nbd+unix:///w?socket={sock}",
                              str(10 + i), str(flag), str(halt)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)
        ]  # fmt: skip
        time.sleep(0.3)
        qmp.cmd("block-dirty-bitmap-add", node="d0", name="b2", granularity=GRAN)
        flag.touch()
        time.sleep(0.5)
        halt.touch()
        nbd_writes = []
        for w in writers:
            out, err = w.communicate(timeout=30)
            assert w.returncode == 0, err
            nbd_writes += [tuple(map(int, line.split())) for line in out.splitlines()]
        assert sum(c for *_, c in nbd_writes) > 100, "too few NBD writes after the add"
        _check(qmp, url, "b2", nbd_writes, nbd_writes)
        _check(qmp, url, "b", fuse_writes + nbd_writes, fuse_writes + nbd_writes)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(EOFError):
            qmp.close()
