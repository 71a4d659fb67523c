"""FUSE-over-io_uring exports across a mirror's pivot (issue 19), through a real mount of a
daemon subprocess, whose queue workers are forks that read the image files themselves.

QEMU 11.1 allows a mirror of a node under a read-only FUSE export (its export then follows the
pivot) and refuses it under a writable one (the export holds ``resize``, which the mirror
does not share); QEMU has no io_uring transport, so its /dev/fuse export is the yardstick for
both. Writes racing with the pivots go through an NBD export of the same node; what the FUSE
file shows after each pivot must be the target's bytes, never the old source's.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conversation import Daemon
from test_mirror import PICK, SYSTEM_PYTHON, model_after, qemu_img, wait_job

MIB = 1 << 20
SIZE = 2 * MIB
PIVOTS = 20

# The NBD writer of test_mirror.py, which also pauses: while the file ``pause`` exists it
# stops between writes and says so with the file ``paused``, which holds its count.
WRITER = r"""
import nbd, os, random, sys, time
uri, seed, stop, pause, paused = sys.argv[1:6]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(int(seed))
n = 0
while not os.path.exists(stop):
    if os.path.exists(pause):
        with open(paused + ".new", "w") as f:
            f.write(str(n))
        os.rename(paused + ".new", paused)
        while os.path.exists(pause) and not os.path.exists(stop):
            time.sleep(0.001)
        os.unlink(paused)
        continue
    off, length, byte = pick(rng, size)
    data = bytes([byte]) * length
    h.pwrite(data, off)
    if h.pread(length, off) != data:
        sys.exit(f"write {n + 1} at {off} did not read back")
    n += 1
    print(n, flush=True)
h.flush()
h.shutdown()
"""


class PausingWriter:
    """Seeded random writes through NBD, acknowledged one a line, that can be held."""

    def __init__(self, uri: str, seed: int, work: Path) -> None:
        self.stop, self.pause, self.paused = (work / n for n in ("stop", "pause", "paused"))
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", PICK + WRITER, uri, str(seed),
             str(self.stop), str(self.pause), str(self.paused)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.count = 0

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        goal = self.count + more
        deadline = time.monotonic() + timeout
        while self.count < goal:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"writer ended: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.count = int(line)
            assert time.monotonic() < deadline, "writer too slow"

    def hold(self) -> None:
        """Stop the writer between two writes (every write it made is acknowledged)."""
        self.pause.touch()
        deadline = time.monotonic() + 20
        while not self.paused.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "writer did not pause"
            time.sleep(0.002)
        self.count = max(self.count, int(self.paused.read_text()))

    def release(self) -> None:
        self.pause.unlink()

    def finish(self) -> int:
        self.stop.touch()
        # Read through the pipe's text wrapper: lines readline() already buffered are there,
        # and communicate() would skip them (the count would stop short).
        out = self.proc.stdout.read()  # type: ignore[union-attr]
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert self.proc.wait(30) == 0, err
        for line in out.split():
            self.count = int(line)
        return self.count


def read_direct(path: Path, size: int) -> bytes:
    """``size`` bytes of ``path`` with O_DIRECT (through the FUSE queues, no page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        n = os.preadv(fd, [buf], 0)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def work(tmp_path: Path, uring_knob: Path) -> Iterator[Path]:
    """tmp_path with FUSE-over-io_uring on; the mount lazily unmounted at the end."""
    mnt = tmp_path / "mnt"
    mnt.touch()
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _add_target(d: Daemon, work: Path, i: int) -> tuple[str, Path]:
    """Target ``i``: a raw file for even ``i``, a fresh qcow2 image for odd ones."""
    name = f"t{i}"
    if i % 2 == 0:
        path = work / f"{name}.img"
        path.write_bytes(bytes(SIZE))
        args = {"driver": "file", "filename": path.name, "node-name": name}
    else:
        path = work / f"{name}.qcow2"
        assert qemu_img("create", "-q", "-f", "qcow2", str(path), str(SIZE)).returncode == 0
        args = {"driver": "qcow2", "node-name": name, "file": {"driver": "file",
                                                              "filename": path.name}}  # fmt: skip
    assert d.cmd("blockdev-add", args) == {"return": {}}
    return name, path


def _uring_counts(d: Daemon) -> tuple[int, int, set[str]]:
    """Requests and engine requests over every io_uring queue, and their fast paths."""
    (export,) = d.cmd("x-query-fuse-queues")["return"]
    queues = export["uring-queues"]
    return (
        sum(q["requests"] for q in queues),
        sum(q["engine-requests"] for q in queues),
        {q["fast-path"] for q in queues},
    )


def test_read_only_uring_export_follows_twenty_pivots(work: Path) -> None:
    """20 mirrors in a row (raw and qcow2 targets in turn) of the node under a read-only
    FUSE-over-io_uring export and a writable NBD export, with NBD writes racing each one.
    After every pivot the export is on the target, the FUSE file reads the target's bytes
    (not the old source's, which the writes after the pivot no longer reach), and the queue
    workers serve reads on their fast path again; at the end the file is the model of every
    acknowledged write and the old sources stayed as they were at their pivot."""
    initial = random.Random(19).randbytes(SIZE)
    (work / "t0.img").write_bytes(initial)
    mnt, sock = work / "mnt", work / "nbd.sock"
    d = Daemon(work, real=False)
    writer = None
    try:
        args = {"driver": "file", "filename": "t0.img", "node-name": "t0"}
        assert d.cmd("blockdev-add", args) == {"return": {}}
        fuse = {"type": "fuse", "id": "f", "node-name": "t0", "mountpoint": str(mnt),
                "io_uring": True}  # fmt: skip
        assert d.cmd("block-export-add", fuse) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        nbd = {"type": "nbd", "id": "e", "node-name": "t0", "name": "d", "writable": True}
        assert d.cmd("block-export-add", nbd) == {"return": {}}
        assert read_direct(mnt, SIZE) == initial
        writer = PausingWriter(f"nbd+unix:///d?socket={sock}", 7, work)
        frozen: dict[Path, str] = {}
        source = work / "t0.img"
        for i in range(1, PIVOTS + 1):
            writer.wait_for(3)
            name, target = _add_target(d, work, i)
            job = f"m{i}"
            mirror = {"job-id": job, "device": f"t{i - 1}", "target": name, "sync": "full"}
            assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
            wait_job(d, job, "ready")
            writer.wait_for(2)  # writes while ready: copied by the job
            assert d.cmd("job-complete", {"id": job}) == {"return": {}}
            wait_job(d, job, None)
            nodes = {e["id"]: e["node-name"] for e in d.cmd("query-block-exports")["return"]}
            assert nodes == {"f": name, "e": name}, i
            writer.wait_for(3)  # writes after the pivot: on the target only
            writer.hold()
            seen = read_direct(mnt, SIZE)
            if i % 2 == 0:  # a raw target's file is the guest's bytes
                assert seen == file_bytes(target), f"pivot {i}: FUSE does not read the target"
            assert seen == model_after(initial, 7, writer.count), f"pivot {i}"
            frozen[source] = hashlib.sha256(file_bytes(source)).hexdigest()
            requests, engine, fast = _uring_counts(d)
            read_direct(mnt, SIZE)
            more, more_engine, _ = _uring_counts(d)
            assert fast == {"uring"}, fast
            assert more - requests > more_engine - engine, "reads no longer take the fast path"
            writer.release()
            source = target
        written = writer.finish()
        writer = None
        assert read_direct(mnt, SIZE) == model_after(initial, 7, written)
        for path, digest in frozen.items():
            assert hashlib.sha256(file_bytes(path)).hexdigest() == digest, path
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
    finally:
        if writer is not None:
            writer.stop.touch()
            writer.proc.kill()
            writer.proc.communicate()
        d.close()
    for i in range(1, PIVOTS + 1, 2):
        check = qemu_img("check", str(work / f"t{i}.qcow2"))
        assert check.returncode == 0, check.stdout + check.stderr


REFUSAL = (
    r"Permission conflict on node '(#block\d+)': permissions 'resize' are both required by an "
    r"unnamed block device \(uses node '\1' as 'root' child\) and unshared by mirror job 'x' "
    r"\(uses node '\1' as 'main node' child\)\."
)


def _refusal(work: Path, real: bool, export: dict) -> tuple[str, list]:
    """blockdev-mirror of the node under ``export``: the error and the job's events."""
    for name in ("src", "tgt"):
        (work / f"{name}.img").write_bytes(bytes(MIB))
    d = Daemon(work, real=real)
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        assert d.cmd("block-export-add", export) == {"return": {}}
        d.events()
        reply = d.cmd(
            "blockdev-mirror", {"job-id": "x", "device": "src", "target": "tgt", "sync": "full"}
        )
        events = [(e["event"], e["data"]["status"]) for e in d.events()]
        assert d.cmd("block-export-del", {"id": "e"}) == {"return": {}}
        return reply["error"]["desc"], events
    finally:
        d.close()
        subprocess.run(["umount", "-l", export["mountpoint"]], capture_output=True, check=False)


@pytest.mark.parametrize("growable", [False, True])
def test_writable_uring_export_refuses_a_mirror(work: Path, growable: bool) -> None:
    """Writable, growable or not, the io_uring export refuses as QEMU's FUSE export does."""
    export = {"type": "fuse", "id": "e", "node-name": "src", "mountpoint": str(work / "mnt"),
              "writable": True, "growable": growable, "io_uring": True}  # fmt: skip
    desc, events = _refusal(work, False, export)
    assert re.fullmatch(REFUSAL, desc), desc
    assert events == [("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "null")]


@pytest.mark.realqsd
@pytest.mark.parametrize("growable", [False, True])
def test_writable_export_refusal_is_qemus(uring_knob: Path, growable: bool) -> None:
    """QEMU 11.1's FUSE export (it has no io_uring transport) refuses with the same text and
    events as qsd-py's io_uring export (node names aside: both are generated)."""
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("fuse-uring-pivot") as share:
        (share / "mnt").touch()
        export = {"type": "fuse", "id": "e", "node-name": "src", "mountpoint": str(share / "mnt"),
                  "writable": True, "growable": growable}  # fmt: skip
        real = _refusal(share, True, export)
        ours = _refusal(share, False, {**export, "io_uring": True})
    assert re.fullmatch(REFUSAL, real[0]), real
    assert re.sub(r"#block\d+", "#N", ours[0]) == re.sub(r"#block\d+", "#N", real[0])
    assert ours[1] == real[1]


# --- blockdev-snapshot under a writable export ---------------------------------------------------
# Random 4 KiB O_DIRECT writes to the FUSE file until ``stop`` exists, each read back; one line
# per acknowledged write: its offset and byte.
FILE_WRITER = r"""
import mmap, os, random, sys
path, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
size = os.fstat(fd).st_size
rng = random.Random(seed)
buf, back = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
while not os.path.exists(stop):
    off = rng.randrange(size // 4096) * 4096
    byte = rng.randrange(1, 256)
    buf[:] = bytes([byte]) * 4096
    assert os.pwritev(fd, [buf], off) == 4096
    assert os.preadv(fd, [back], off) == 4096 and back[:] == buf[:], f"write at {off} lost"
    print(off, byte, flush=True)
"""

SNAPSHOTS = 10


def test_writable_uring_export_follows_ten_snapshots(work: Path) -> None:
    """blockdev-snapshot 10 times (each overlay above the last) under a writable
    FUSE-over-io_uring export while a process writes through it (QEMU allows it and moves
    its export to the overlay): every write reads back, the file ends as the model of every
    write, each node left below stays as it was when the next overlay went above it, and
    every image is consistent."""
    initial = random.Random(11).randbytes(SIZE)
    (work / "base.img").write_bytes(initial)
    mnt = work / "mnt"
    d = Daemon(work, real=False)
    proc = None
    frozen: dict[Path, str] = {}
    try:
        args = {"driver": "file", "filename": "base.img", "node-name": "base"}
        assert d.cmd("blockdev-add", args) == {"return": {}}
        fuse = {"type": "fuse", "id": "f", "node-name": "base", "mountpoint": str(mnt),
                "writable": True, "io_uring": True}  # fmt: skip
        assert d.cmd("block-export-add", fuse) == {"return": {}}
        stop = work / "stop"
        proc = subprocess.Popen(
            [sys.executable, "-c", FILE_WRITER, str(mnt), "13", str(stop)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines: list[str] = []

        def wait_writes(more: int) -> None:
            goal = len(lines) + more
            while len(lines) < goal:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                assert line, proc.stderr.read()  # type: ignore[union-attr]
                lines.append(line)

        below, below_path = "base", work / "base.img"
        for i in range(1, SNAPSHOTS + 1):
            wait_writes(20)
            name, path = f"s{i}", work / f"s{i}.qcow2"
            made = qemu_img("create", "-q", "-f", "qcow2", str(path), str(SIZE))
            assert made.returncode == 0, made.stderr
            overlay = {"driver": "qcow2", "node-name": name, "backing": None,
                       "file": {"driver": "file", "filename": path.name}}  # fmt: skip
            assert d.cmd("blockdev-add", overlay) == {"return": {}}
            reply = d.cmd("blockdev-snapshot", {"node": below, "overlay": name})
            assert reply == {"return": {}}, reply
            frozen[below_path] = hashlib.sha256(file_bytes(below_path)).hexdigest()
            nodes = {e["id"]: e["node-name"] for e in d.cmd("query-block-exports")["return"]}
            assert nodes == {"f": name}
            below, below_path = name, path
        wait_writes(20)
        stop.touch()
        rest = proc.stdout.read()  # type: ignore[union-attr]
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert proc.wait(30) == 0, err
        lines += rest.splitlines()
        model = bytearray(initial)
        for line in lines:
            off, byte = map(int, line.split())
            model[off : off + 4096] = bytes([byte]) * 4096
        assert read_direct(mnt, SIZE) == bytes(model)
        for path, digest in frozen.items():
            assert hashlib.sha256(file_bytes(path)).hexdigest() == digest, path.name
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        d.close()
    for i in range(1, SNAPSHOTS + 1):
        check = qemu_img("check", str(work / f"s{i}.qcow2"))
        assert check.returncode == 0, check.stdout + check.stderr
