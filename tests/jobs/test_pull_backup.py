"""Pull-mode incremental backup as users run it, while the guest keeps writing through an
NBD export of the source: bitmap ``b0`` records since the previous backup; at the point in
time one transaction adds ``b1`` (the next round's), disables ``b0`` and starts a
``sync=none`` backup job whose copy-before-write filter (``filter-node-name``) gets a
``snapshot-access`` node on top, exported read-only over NBD with
``bitmaps=[{node: src, name: b0}]``. The backup tool reads the dirty regions with
``nbdinfo --map=qemu:dirty-bitmap:b0`` and copies only those from the export onto a copy of
the previous backup: the result is the source at the point in time (a write acknowledged
before the transaction is in it, one made after is not, and it equals the whole snapshot
export), and ``b1`` holds the writes made since. The same recipe with QEMU 11.1 (opt-in)."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from bitmaps.bitmap_support import dirty_runs
from conversation import Daemon

MIB = 1 << 20
SIZE = 16 * MIB
GRAN = 65536
WRITER_END = 15 * MIB  # the writer's range; the last MiB holds the two anchor writes
BEFORE, AFTER = 15 * MIB, 15 * MIB + GRAN  # anchors: written before and after the transaction
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libnbd

# The guest: seeded writes below WRITER_END, 10 ms apart (a backup copies fewer chunks than
# the image has), until ``stop`` exists; one line per write.
WRITER = r"""
import nbd, os, random, sys, time
uri, seed, stop, end = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(seed)
while not os.path.exists(stop):
    off = rng.randrange(end - 4096)
    n = min(rng.choice((4096, rng.randint(1, 70000))), end - off)
    h.pwrite(rng.randbytes(n), off)
    print(off, n, flush=True)
    time.sleep(0.01)
h.shutdown()
"""

# The backup tool's copy: the ranges "offset:length" from the export into a file.
COPY = r"""
import nbd, sys
uri, out = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
with open(out, "r+b") as f:
    for run in sys.argv[3:]:
        off, n = map(int, run.split(":"))
        pos = off
        while pos < off + n:
            k = min(1 << 20, off + n - pos)
            f.seek(pos)
            f.write(h.pread(k, pos))
            pos += k
h.shutdown()
"""


def _io(uri: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, uri], check=True, capture_output=True)


def _copy(uri: str, out: Path, runs: list[tuple[int, int]]) -> None:
    args = [f"{o}:{n}" for o, n in runs]
    done = subprocess.run([SYSTEM_PYTHON, "-c", COPY, uri, str(out), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


def _ok(reply: dict) -> None:
    assert reply == {"return": {}}, reply


def pull_backup(work: Path, real: bool) -> None:
    """The recipe against one daemon; asserts as it goes."""
    initial = random.Random(3).randbytes(SIZE)
    (work / "src.img").write_bytes(initial)
    shutil.copy(work / "src.img", work / "prev.img")  # the previous (full) backup
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "src.img", "-F", "raw",
                    str(work / "tmp.qcow2")], check=True, cwd=work)  # fmt: skip
    sock = work / "nbd.sock"
    stop = work / "stop"
    stop.unlink(missing_ok=True)
    live, snap = f"nbd+unix:///live?socket={sock}", f"nbd+unix:///snap?socket={sock}"
    d = Daemon(work, real)
    writer = None
    try:
        _ok(d.cmd("blockdev-add", {"driver": "file", "filename": "src.img", "node-name": "src"}))
        _ok(d.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0", "granularity": GRAN}))
        _ok(d.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}))
        _ok(d.cmd("block-export-add", {"type": "nbd", "id": "live", "node-name": "src",
                                       "name": "live", "writable": True}))  # fmt: skip
        writer = subprocess.Popen([SYSTEM_PYTHON, "-c", WRITER, live, "7", str(stop),
                                   str(WRITER_END)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(0.5)
        _io(live, f"write -P 0xaa {BEFORE} 4k")
        tmp = {"driver": "qcow2", "node-name": "tmp", "backing": "src",
               "file": {"driver": "file", "filename": "tmp.qcow2"}}  # fmt: skip
        _ok(d.cmd("blockdev-add", tmp))
        actions = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "b1", "granularity": GRAN}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}},
            {"type": "blockdev-backup",
             "data": {"job-id": "fleece", "device": "src", "target": "tmp", "sync": "none",
                      "filter-node-name": "cbw"}},
        ]  # fmt: skip
        _ok(d.cmd("transaction", {"actions": actions}))
        _io(live, f"write -P 0xbb {AFTER} 4k")
        _ok(d.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                   "file": "cbw"}))  # fmt: skip
        _ok(d.cmd("block-export-add", {"type": "nbd", "id": "snap", "node-name": "acc",
                                       "name": "snap",
                                       "bitmaps": [{"node": "src", "name": "b0"}]}))  # fmt: skip
        runs = dirty_runs(snap, "b0")
        result = work / "result.img"
        shutil.copy(work / "prev.img", result)
        _copy(snap, result, runs)  # the guest still writes meanwhile
        whole = work / "whole.img"
        whole.write_bytes(bytes(SIZE))
        _copy(snap, whole, [(0, SIZE)])
        stop.touch()
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err
        after_b1 = dirty_runs_of(d, live)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        d.close()
    got = result.read_bytes()
    assert got[BEFORE : BEFORE + 4096] == b"\xaa" * 4096  # acknowledged before: in it
    assert got[AFTER : AFTER + 4096] == initial[AFTER : AFTER + 4096]  # after: not
    assert len(out.split("\n")) > 20, "the guest hardly wrote"
    assert runs and sum(n for _, n in runs) < WRITER_END, runs
    assert got == whole.read_bytes(), "a region written before the point in time was missed"
    assert got != (work / "src.img").read_bytes(), "the guest's later writes are in the backup"
    assert (AFTER, GRAN) in after_b1 or any(o <= AFTER < o + n for o, n in after_b1)


def dirty_runs_of(d: Daemon, live: str) -> list[tuple[int, int]]:
    """``b1``'s dirty runs, through a second writable export that offers it."""
    _ok(d.cmd("block-export-add", {"type": "nbd", "id": "b1view", "node-name": "cbw",
                                   "name": "b1view", "writable": True,
                                   "bitmaps": [{"node": "src", "name": "b1"}]}))  # fmt: skip
    return dirty_runs(live.replace("/live?", "/b1view?"), "b1")


def test_pull_mode_incremental_backup(tmp_path: Path) -> None:
    pull_backup(tmp_path, False)


@pytest.mark.realqsd
def test_pull_mode_incremental_backup_with_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("pull-backup") as work:
        pull_backup(work, True)
