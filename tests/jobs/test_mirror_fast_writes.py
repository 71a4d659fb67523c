"""A background mirror under NBD writes that stay on the exports' fast path (issue 19).

The mirror's dirty bitmap is a shared one (qsd_py/block/shared_bits.py): NBD connections
keep writing around the source's coroutines and mark it themselves, and the job seals the
source (fast writes closed, the ones in flight waited for) before its last catch-up and the
pivot. Several writers race the copy, the ``ready`` phase and ``job-complete``; a write the
copy missed (a mark lost, or one landing after the last check) leaves the target short of
an acknowledged write, which the comparison with the writers' model finds.

(A writable FUSE export refuses a mirror, as QEMU's does: test_fuse_uring_pivot.py; so the
FUSE queues never write under one.)
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from conversation import Daemon
from test_mirror import SYSTEM_PYTHON, qemu_img, wait_job

MIB = 1 << 20
SIZE = 4 * MIB
BLOCK = 4096
WRITERS = 3
RUNS = 4

# 4 KiB writes to the blocks of stripe ``k`` (block % n == k) only, so that the writers'
# order among each other does not matter, each read back; a line every 64 writes.
STRIPE_PICK = r"""
def pick(rng, size, k, n):
    blocks = size // 4096
    block = rng.randrange(blocks // n) * n + k
    return block * 4096, rng.randrange(1, 256)
"""
STRIPE_WRITER = r"""
import nbd, os, random, sys
uri, stop = sys.argv[1], sys.argv[5]
seed, k, n = (int(a) for a in sys.argv[2:5])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
count = 0
while not os.path.exists(stop):
    off, byte = pick(rng, size, k, n)
    data = bytes([byte]) * 4096
    h.pwrite(data, off)
    if h.pread(4096, off) != data:
        sys.exit(f"write {count + 1} at {off} did not read back")
    count += 1
    if count % 64 == 0:
        print(count, flush=True)
h.flush()
h.shutdown()
print(count, flush=True)
"""
exec(STRIPE_PICK)  # the model replays the writers' own choices  # noqa: S102


class StripeWriters:
    """``WRITERS`` processes, one NBD connection each, writing their own stripes."""

    def __init__(self, uri: str, seed: int, stop: Path) -> None:
        self.stop = stop
        self.seeds = [seed * 100 + k for k in range(WRITERS)]
        self.procs = [
            subprocess.Popen(
                [
                    SYSTEM_PYTHON,
                    "-c",
                    STRIPE_PICK + STRIPE_WRITER,
                    uri,
                    str(s),
                    str(k),
                    str(WRITERS),
                    str(stop),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for k, s in enumerate(self.seeds)
        ]

    def wait_for(self, more: int) -> None:
        """Until each writer reported ``more`` further writes (in steps of 64)."""
        for proc in self.procs:
            for _ in range(max(1, more // 64)):
                line = proc.stdout.readline()  # type: ignore[union-attr]
                assert line, proc.stderr.read()  # type: ignore[union-attr]

    def finish(self) -> list[int]:
        """Stop them; how many writes each made (all acknowledged)."""
        self.stop.touch()
        counts = []
        for proc in self.procs:
            out = proc.stdout.read()  # type: ignore[union-attr]
            err = proc.stderr.read()  # type: ignore[union-attr]
            assert proc.wait(30) == 0, err
            counts.append(int(out.split()[-1]))
        return counts

    def kill(self) -> None:
        self.stop.touch()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def model(self, data: bytearray, counts: list[int]) -> None:
        """Apply every acknowledged write to ``data``."""
        for k, (seed, count) in enumerate(zip(self.seeds, counts, strict=True)):
            rng = random.Random(seed)
            for _ in range(count):
                off, byte = pick(rng, len(data), k, WRITERS)  # type: ignore[name-defined]  # noqa: F821
                data[off : off + BLOCK] = bytes([byte]) * BLOCK


def _add_target(d: Daemon, work: Path, i: int) -> tuple[str, Path, str]:
    """Target ``i``: a fresh qcow2 image for odd ``i``, a zeroed raw file for even ones."""
    name = f"t{i}"
    if i % 2:
        path = work / f"{name}.qcow2"
        assert qemu_img("create", "-q", "-f", "qcow2", str(path), str(SIZE)).returncode == 0
        args = {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": path.name}}  # fmt: skip
        fmt = "qcow2"
    else:
        path = work / f"{name}.img"
        path.write_bytes(bytes(SIZE))
        args = {"driver": "file", "filename": path.name, "node-name": name}
        fmt = "raw"
    assert d.cmd("blockdev-add", args) == {"return": {}}
    return name, path, fmt


@pytest.mark.parametrize("iothread", [False, True])
def test_background_mirror_keeps_every_fast_write(tmp_path: Path, iothread: bool) -> None:
    """``RUNS`` mirrors in a row (each from the last one's target; qcow2 and raw targets in
    turn), each under three NBD writers (the export on the main loop or an iothread) from
    the copy through ``ready`` and ``job-complete`` to the pivot: once the writers stop,
    the export is on the target and the target holds every acknowledged write
    (``qemu-img compare`` with the model)."""
    initial = random.Random(5).randbytes(SIZE)
    (tmp_path / "t0.img").write_bytes(initial)
    model = bytearray(initial)
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    writers = None
    try:
        args = {"driver": "file", "filename": "t0.img", "node-name": "t0"}
        assert d.cmd("blockdev-add", args) == {"return": {}}
        export = {"type": "nbd", "id": "e", "node-name": "t0", "name": "d", "writable": True}
        if iothread:
            assert d.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
            export["iothread"] = "io0"
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        assert d.cmd("block-export-add", export) == {"return": {}}
        uri = f"nbd+unix:///d?socket={sock}"
        for i in range(1, RUNS + 1):
            name, path, fmt = _add_target(d, tmp_path, i)
            writers = StripeWriters(uri, i, tmp_path / f"stop{i}")
            writers.wait_for(64)
            mirror = {"job-id": "m", "device": f"t{i - 1}", "target": name, "sync": "full",
                      "speed": 8 * MIB}  # fmt: skip
            assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
            writers.wait_for(128)  # racing the copy
            assert d.cmd("block-job-set-speed", {"device": "m", "speed": 0}) == {"return": {}}
            wait_job(d, "m", "ready", timeout=90)  # the writers never pause
            writers.wait_for(128)  # dirtied again while ready
            assert d.cmd("job-complete", {"id": "m"}) == {"return": {}}
            wait_job(d, "m", None)
            writers.wait_for(64)  # on the target now
            counts = writers.finish()
            writers.model(model, counts)
            writers = None
            nodes = [e["node-name"] for e in d.cmd("query-block-exports")["return"]]
            assert nodes == [name], i
            (tmp_path / "model.img").write_bytes(model)
            same = qemu_img("compare", "-U", "-f", "raw", "-F", fmt, str(tmp_path / "model.img"),
                            str(path))  # fmt: skip
            assert same.returncode == 0, f"run {i}: {same.stdout}{same.stderr}"
    finally:
        if writers is not None:
            writers.kill()
        d.close()
