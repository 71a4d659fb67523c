"""A transaction of a bitmap (``block-dirty-bitmap-add``, or ``-clear`` of one that has
recorded already) and a full backup, while a guest writes through an export of each kind
(NBD, FUSE over /dev/fuse, FUSE over io_uring served by the queue workers): every write,
before, during and after the job, either lands in the backup's point in time or is marked
in the bitmap. So the backup's chunks that the bitmap leaves clean equal the source's, and
an incremental backup on the bitmap onto a copy of the full one equals the source. A write
that neither holds is data the next incremental backup loses, and fails the test (writes
after the job take the exports' fast paths, which mark the bitmap themselves)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bitmap_support import dirty_runs, random_extent, wait_exports_gone

SIZE = 32 << 20
GRAN = 65536
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libnbd

# An NBD guest: seeded writes (4 KiB aligned ones and odd ones), 5 ms apart (so that most
# chunks stay clean and a missed mark shows), until ``stop`` exists.
NBD_WRITER = r"""
import nbd, os, random, sys, time
uri, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
n = 0
while not os.path.exists(stop):
    if rng.random() < 0.5:
        off, k = rng.randrange(size // 4096) * 4096, 4096
    else:
        off = rng.randrange(size - 4096)
        k = min(rng.randint(1, 70000), size - off)
    h.pwrite(rng.randbytes(k), off)
    n += 1
    time.sleep(0.005)
print(n)
h.shutdown()
"""


def _fuse_writer(path: Path, seed: int, stop: threading.Event, count: list[int]) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        while not stop.is_set():
            offset, length = random_extent(rng, SIZE, 70000)
            os.pwrite(fd, rng.randbytes(length), offset)
            count[0] += 1
            time.sleep(0.005)
    finally:
        os.close(fd)


class Guest:
    """Writers through one export of node ``src`` until :meth:`stop`."""

    def __init__(self, qmp, kind: str, work: Path, sock: Path) -> None:
        self.qmp, self.kind = qmp, kind
        self.halt = work / "halt"
        self.procs: list[subprocess.Popen[str]] = []
        self.threads: list[threading.Thread] = []
        self.event = threading.Event()
        self.counts = [[0], [0]]
        if kind == "nbd":
            qmp.cmd("block-export-add", type="nbd", id="g", **{"node-name": "src"}, name="g",
                    writable=True)  # fmt: skip
            uri = f"nbd+unix:///g?socket={sock}"
            self.procs = [
                subprocess.Popen([SYSTEM_PYTHON, "-c", NBD_WRITER, uri, str(i), str(self.halt)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)
            ]  # fmt: skip
            return
        mnt = work / "guest.raw"
        mnt.touch()
        qmp.cmd("block-export-add", type="fuse", id="g", **{"node-name": "src"},
                mountpoint=str(mnt), writable=True, io_uring=kind == "uring")  # fmt: skip
        self.threads = [
            threading.Thread(target=_fuse_writer, args=(mnt, i, self.event, self.counts[i]))
            for i in range(2)
        ]
        for t in self.threads:
            t.start()

    def stop(self) -> int:
        """Stop the writers, take the export away; how many writes they made."""
        self.halt.touch()
        self.event.set()
        writes = 0
        for proc in self.procs:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            writes += int(out)
        for t in self.threads:
            t.join(30)
        writes += sum(c[0] for c in self.counts)
        self.qmp.cmd("block-export-del", id="g")
        wait_exports_gone(self.qmp)
        return writes

    def kill(self) -> None:
        self.halt.touch()
        self.event.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_job(qmp, job: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(j["id"] == job for j in qmp.cmd("query-jobs")):
        assert time.monotonic() < deadline, f"job {job} did not end"
        time.sleep(0.02)
    ends = [e for e in qmp.get_events(wait=False) if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert ends and "error" not in ends[-1]["data"], ends


@pytest.mark.parametrize(
    ("kind", "action"),
    [("nbd", "add"), ("nbd", "clear"), ("devfuse", "add"), ("uring", "add"), ("uring", "clear")],
)
def test_writes_land_in_the_backup_or_in_the_bitmap(
    qsd, uring_knob, tmp_path: Path, kind: str, action: str
) -> None:
    (tmp_path / "src.img").write_bytes(random.Random(9).randbytes(SIZE))
    for name in ("full.img", "inc.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(SIZE)
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=src,filename={tmp_path / 'src.img'}",
        "--blockdev", f"driver=file,node-name=full,filename={tmp_path / 'full.img'}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
    )  # fmt: skip
    qmp = daemon.qmp()
    guest = None
    try:
        if action == "clear":  # a bitmap that recorded before: the transaction empties it
            qmp.cmd("block-dirty-bitmap-add", node="src", name="b1", granularity=GRAN)
        guest = Guest(qmp, kind, tmp_path, sock)
        time.sleep(0.3)
        bitmap = {"node": "src", "name": "b1"}
        first = {"type": "block-dirty-bitmap-clear", "data": bitmap}
        if action == "add":
            first = {"type": "block-dirty-bitmap-add", "data": {**bitmap, "granularity": GRAN}}
        backup = {"job-id": "j", "device": "src", "target": "full", "sync": "full",
                  "speed": 64 << 20}  # fmt: skip
        qmp.cmd("transaction", actions=[first, {"type": "blockdev-backup", "data": backup}])
        time.sleep(0.2)
        assert qmp.cmd("query-jobs"), "the job ended before the guest wrote to it"
        _wait_job(qmp, "j")
        time.sleep(0.2)  # and after it: the writes that only the bitmap has
        writes = guest.stop()
        assert writes > 50, f"only {writes} writes"
        qmp.cmd("block-export-add", type="nbd", id="v", **{"node-name": "src"}, name="v",
                writable=True, bitmaps=["b1"])  # fmt: skip
        runs = dirty_runs(f"nbd+unix:///v?socket={sock}", "b1")
        qmp.cmd("block-export-del", id="v")
        wait_exports_gone(qmp)
        src, full = (tmp_path / "src.img").read_bytes(), (tmp_path / "full.img").read_bytes()
        dirty = set()
        for start, length in runs:
            dirty.update(range(start // GRAN, (start + length) // GRAN))
        at = [slice(c * GRAN, (c + 1) * GRAN) for c in range(SIZE // GRAN)]
        missed = [c for c, s in enumerate(at) if c not in dirty and full[s] != src[s]]
        assert not missed, f"chunks written after the point in time, not in the bitmap: {missed}"
        assert len(dirty) < SIZE // GRAN, "every chunk dirty: the test proves nothing"
        shutil.copy(tmp_path / "full.img", tmp_path / "inc.img")
        qmp.cmd("blockdev-add", driver="file", **{"node-name": "inc"},
                filename=str(tmp_path / "inc.img"))  # fmt: skip
        qmp.cmd("blockdev-backup", **{"job-id": "i"}, device="src", target="inc",
                sync="incremental", bitmap="b1")  # fmt: skip
        _wait_job(qmp, "i")
        assert (tmp_path / "inc.img").read_bytes() == (tmp_path / "src.img").read_bytes()
    finally:
        if guest is not None:
            guest.kill()
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(EOFError):
            qmp.close()
