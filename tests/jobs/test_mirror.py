"""blockdev-mirror: QEMU 11.1's transcript, a mirror under NBD write load with its pivot,
target errors, and the writable FUSE export QEMU refuses."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import mirror_script
import pytest
from conversation import Daemon

MIB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libnbd


def test_transcript_is_qemus(tmp_path: Path) -> None:
    """Errors, event order and replies of the recorded conversation (QEMU 11.1's)."""
    want = json.loads(mirror_script.DATA.read_text())
    assert mirror_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("mirror-live") as work:
        real = mirror_script.run_script(True, work)
        assert mirror_script.run_script(False, work) == real


# --- under load -------------------------------------------------------------------------------
# A writer through the NBD export: seeded random writes until told to stop, each read back
# at once (a read served from the wrong node across the pivot fails it), one line per write
# acknowledged (so the test knows how many the model must replay).
WRITER = r"""
import nbd, os, random, sys
uri, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(seed)
n = 0
while not os.path.exists(stop):
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
PICK = r"""
def pick(rng, size):
    length = rng.choice((512, 4096, 65536, 3 * 4096))
    off = rng.randrange(0, (size - length) // 512) * 512
    return off, length, rng.randrange(1, 256)
"""
exec(PICK)  # the model uses the writer's own choice of writes  # noqa: S102


def model_after(initial: bytes, seed: int, writes: int) -> bytes:
    data = bytearray(initial)
    rng = random.Random(seed)
    for _ in range(writes):
        off, length, byte = pick(rng, len(data))  # type: ignore[name-defined]  # noqa: F821
        data[off : off + length] = bytes([byte]) * length
    return bytes(data)


class Writer:
    def __init__(self, uri: str, seed: int, stop: Path) -> None:
        self.stop = stop
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", PICK + WRITER, uri, str(seed), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.count = 0

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        """Until ``more`` further writes were acknowledged."""
        goal = self.count + more
        deadline = time.monotonic() + timeout
        while self.count < goal:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"writer ended: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.count = int(line)
            assert time.monotonic() < deadline, "writer too slow"

    def finish(self) -> int:
        """Stop the writer; the number of writes it made. The rest of its output is read
        through the buffer ``readline`` filled (``communicate`` reads the pipe itself and
        would miss a count read ahead, and the model a write)."""
        self.stop.touch()
        out = self.proc.stdout.read()  # type: ignore[union-attr]  # EOF: it saw the stop
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert self.proc.wait(30) == 0, err
        for line in out.split():
            self.count = int(line)
        return self.count


def wait_job(d: Daemon, job: str, status: str | None, timeout: float = 20.0) -> None:
    """Until job ``job`` is in ``status`` (None: gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["id"]: j["status"] for j in d.cmd("query-jobs")["return"]}
        if jobs.get(job) == status:
            return
        time.sleep(0.005)
    raise TimeoutError(f"job {job} not {status}: {jobs}")


def read_export(uri: str, size: int) -> bytes:
    script = (
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
        "sys.stdout.buffer.write(h.pread(int(sys.argv[2]), 0))\nh.shutdown()\n"
    )
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", script, uri, str(size)], capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("sync", "mode"), [("full", "background"), ("top", "write-blocking")])
def test_mirror_under_nbd_load_pivots_without_losing_a_write(
    tmp_path: Path, sync: str, mode: str
) -> None:
    """Writes through a writable NBD export before, during and after the copy and across the
    pivot: the export then serves the qcow2 target, which holds every acknowledged write."""
    size = 8 * MIB
    initial = random.Random(7).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    assert (
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tgt.qcow2"), str(size)).returncode
        == 0
    )
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    writer = None
    try:
        for args in (
            {"driver": "file", "filename": "src.img", "node-name": "src"},
            {
                "driver": "qcow2",
                "node-name": "tgt",
                "file": {"driver": "file", "filename": "tgt.qcow2"},
            },
        ):
            assert d.cmd("blockdev-add", args) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        export = {"type": "nbd", "id": "e", "node-name": "src", "name": "d", "writable": True}
        assert d.cmd("block-export-add", export) == {"return": {}}
        uri = f"nbd+unix:///d?socket={sock}"
        writer = Writer(uri, 42, tmp_path / "stop")
        writer.wait_for(30)
        mirror = {
            "job-id": "m",
            "device": "src",
            "target": "tgt",
            "sync": sync,
            "granularity": 65536,
            "buf-size": MIB,
            "copy-mode": mode,
        }
        assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
        wait_job(d, "m", "ready")
        writer.wait_for(30)  # dirtied again while ready
        before_complete = writer.count
        assert d.cmd("job-complete", {"id": "m"}) == {"return": {}}
        wait_job(d, "m", None)
        writer.wait_for(30)  # now landing on the target
        written = writer.finish()
        assert written >= before_complete + 30  # wait_for(30) may stop at exactly 30
        events = [e["event"] for e in d.events()]
        assert "BLOCK_JOB_READY" in events and "BLOCK_JOB_COMPLETED" in events
        model = model_after(initial, 42, written)
        assert read_export(uri, size) == model
        exports = d.cmd("query-block-exports")["return"]
        assert exports[0]["node-name"] == "tgt"
    finally:
        if writer is not None and writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait()
        d.close()
    (tmp_path / "model.img").write_bytes(model)
    check = qemu_img("check", str(tmp_path / "tgt.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr
    same = qemu_img(
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        str(tmp_path / "model.img"),
        str(tmp_path / "tgt.qcow2"),
    )
    assert same.returncode == 0, same.stdout + same.stderr


def test_soft_cancel_in_ready_leaves_source_and_target_equal(tmp_path: Path) -> None:
    """Writes while the copy runs, then a cancel in ready: no pivot (the export stays on the
    source), and qemu-img compare finds source and target equal."""
    size = 4 * MIB
    initial = random.Random(3).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    (tmp_path / "tgt.img").write_bytes(bytes(size))
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        export = {"type": "nbd", "id": "e", "node-name": "src", "name": "d", "writable": True}
        assert d.cmd("block-export-add", export) == {"return": {}}
        uri = f"nbd+unix:///d?socket={sock}"
        writer = Writer(uri, 5, tmp_path / "stop")
        try:
            writer.wait_for(20)
            mirror = {
                "job-id": "m",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "speed": 8 * MIB,
            }
            assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
            assert d.cmd("block-job-pause", {"device": "m"}) == {"return": {}}
            wait_job(d, "m", "paused")
            writer.wait_for(20)  # dirtying a paused job
            assert d.cmd("block-job-resume", {"device": "m"}) == {"return": {}}
            # The writer goes on: ready waits for a pass that ends with nothing dirty.
            wait_job(d, "m", "ready", timeout=90)
            written = writer.finish()
        finally:
            if writer.proc.poll() is None:
                writer.proc.kill()
                writer.proc.wait()
        assert d.cmd("block-job-cancel", {"device": "m"}) == {"return": {}}
        wait_job(d, "m", None)
        events = [e["event"] for e in d.events()]
        assert events[-3:-1] == ["BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE"]
        assert d.cmd("query-block-exports")["return"][0]["node-name"] == "src"
        assert read_export(uri, size) == model_after(initial, 5, written)
    finally:
        d.close()
    same = qemu_img(
        "compare", "-f", "raw", "-F", "raw", str(tmp_path / "src.img"), str(tmp_path / "tgt.img")
    )
    assert same.returncode == 0, same.stdout + same.stderr


# --- errors -----------------------------------------------------------------------------------
def test_full_target_file_system(tmp_path: Path, tiny_tmpfs: Any) -> None:
    """A target on a 1 MiB tmpfs: on-target-error stop pauses the job (BLOCK_JOB_ERROR,
    io-status nospace), a resume once there is room finishes the copy; report fails a job
    with the error."""
    mnt = tiny_tmpfs.path
    d = None
    try:
        size = 4 * MIB
        (tmp_path / "src.img").write_bytes(random.Random(1).randbytes(size))
        with open(mnt / "tgt.img", "wb") as f:
            f.truncate(size)
        d = Daemon(tmp_path, real=False)
        for name, path in (("src", "src.img"), ("tgt", str(mnt / "tgt.img"))):
            args = {"driver": "file", "filename": path, "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        mirror = {
            "job-id": "m",
            "device": "src",
            "target": "tgt",
            "sync": "full",
            "on-target-error": "stop",
        }
        assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
        wait_job(d, "m", "paused")
        info = d.cmd("query-block-jobs")["return"][0]
        assert info["io-status"] == "nospace" and info["paused"] is True
        errors = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_ERROR"]
        assert errors[0] == {"device": "m", "operation": "write", "action": "stop"}
        # room again: resume retries the copy and the mirror gets ready
        tiny_tmpfs.resize("8m")
        assert d.cmd("block-job-resume", {"device": "m"}) == {"return": {}}
        wait_job(d, "m", "ready")
        assert d.cmd("query-block-jobs")["return"][0]["io-status"] == "ok"
        assert d.cmd("block-job-cancel", {"device": "m"}) == {"return": {}}
        wait_job(d, "m", None)
        same = qemu_img(
            "compare", "-f", "raw", "-F", "raw", str(tmp_path / "src.img"), str(mnt / "tgt.img")
        )
        assert same.returncode == 0, same.stdout + same.stderr
        with open(mnt / "tgt.img", "wb") as f:  # empty and sparse again, and no room
            f.truncate(size)
        tiny_tmpfs.resize("1m")
        mirror = {"job-id": "m2", "device": "src", "target": "tgt", "sync": "full"}
        assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
        wait_job(d, "m2", None)
        done_events = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done_events[-1]["error"] == os.strerror(28)
    finally:
        if d is not None:
            d.close()


def test_null_target_of_another_size(tmp_path: Path) -> None:
    (tmp_path / "src.img").write_bytes(bytes(MIB))
    d = Daemon(tmp_path, real=False)
    try:
        assert d.cmd(
            "blockdev-add", {"driver": "file", "filename": "src.img", "node-name": "src"}
        ) == {"return": {}}
        assert d.cmd("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 4096}) == {
            "return": {}
        }
        mirror = {"job-id": "m", "device": "src", "target": "nul", "sync": "full"}
        assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
        wait_job(d, "m", None)
        ev = [e for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"][0]
        assert ev["data"]["error"] == "Source and target image have different sizes"
        assert d.cmd("query-named-block-nodes")["return"]  # both nodes still there
        assert d.cmd("blockdev-del", {"node-name": "nul"}) == {"return": {}}
    finally:
        d.close()


def test_writable_fuse_export_refuses_a_mirror(tmp_path: Path) -> None:
    """QEMU's text: the export's resize permission against the job's filter node."""
    for name in ("src", "tgt"):
        (tmp_path / f"{name}.img").write_bytes(bytes(MIB))
    mnt = tmp_path / "mnt"
    mnt.touch()
    d = Daemon(tmp_path, real=False)
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        export = {
            "type": "fuse",
            "id": "e",
            "node-name": "src",
            "mountpoint": str(mnt),
            "writable": True,
        }
        assert d.cmd("block-export-add", export) == {"return": {}}
        d.events()
        reply = d.cmd(
            "blockdev-mirror", {"job-id": "x", "device": "src", "target": "tgt", "sync": "full"}
        )
        desc = reply["error"]["desc"]
        pattern = (
            r"Permission conflict on node '(#block\d+)': permissions 'resize' are both "
            r"required by an unnamed block device \(uses node '\1' as 'root' child\) and "
            r"unshared by mirror job 'x' \(uses node '\1' as 'main node' child\)\."
        )
        assert re.fullmatch(pattern, desc), desc
        assert [(e["event"], e["data"]["status"]) for e in d.events()] == [
            ("JOB_STATUS_CHANGE", "created"),
            ("JOB_STATUS_CHANGE", "null"),
        ]
        assert d.cmd("block-export-del", {"id": "e"}) == {"return": {}}
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_quit_while_a_mirror_runs(tmp_path: Path) -> None:
    """``quit`` cancels the job: the daemon exits cleanly, the source is untouched and the
    qcow2 target is consistent."""
    size = 4 * MIB
    initial = random.Random(9).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    assert (
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), str(size)).returncode
        == 0
    )
    d = Daemon(tmp_path, real=False)
    try:
        assert d.cmd(
            "blockdev-add", {"driver": "file", "filename": "src.img", "node-name": "src"}
        ) == {"return": {}}
        assert d.cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "tgt",
                "file": {"driver": "file", "filename": "t.qcow2"},
            },
        ) == {"return": {}}
        mirror = {"job-id": "m", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}
        assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
        wait_job(d, "m", "running")
        time.sleep(0.3)
        assert d.cmd("query-jobs")["return"][0]["status"] == "running"
        assert d.cmd("quit") == {"return": {}}
        assert d.proc.wait(20) == 0
    finally:
        d.close()
    assert (tmp_path / "src.img").read_bytes() == initial
    check = qemu_img("check", str(tmp_path / "t.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr


def test_read_only_fuse_and_nbd_exports_follow_the_pivot(tmp_path: Path) -> None:
    """A read-only FUSE export (/dev/fuse queues) and a writable NBD export of the source:
    after the pivot a write through NBD (now on the target) is what the FUSE file shows, and
    the source no longer changes."""
    size = 2 * MIB
    initial = random.Random(4).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    (tmp_path / "tgt.img").write_bytes(bytes(size))
    mnt = tmp_path / "mnt"
    mnt.touch()
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        fuse = {"type": "fuse", "id": "f", "node-name": "src", "mountpoint": str(mnt)}
        assert d.cmd("block-export-add", fuse) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        nbd = {"type": "nbd", "id": "e", "node-name": "src", "name": "d", "writable": True}
        assert d.cmd("block-export-add", nbd) == {"return": {}}
        mirror = {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}
        assert d.cmd("blockdev-mirror", mirror) == {"return": {}}
        wait_job(d, "m", "ready")
        assert d.cmd("job-complete", {"id": "m"}) == {"return": {}}
        wait_job(d, "m", None)
        nodes = {e["id"]: e["node-name"] for e in d.cmd("query-block-exports")["return"]}
        assert nodes == {"f": "tgt", "e": "tgt"}
        uri = f"nbd+unix:///d?socket={sock}"
        writer = Writer(uri, 8, tmp_path / "stop")
        writer.wait_for(20)
        written = writer.finish()
        model = model_after(initial, 8, written)
        assert mnt.read_bytes() == model
        assert (tmp_path / "src.img").read_bytes() == initial
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_full_mirror_len_is_qemus(tmp_path: Path) -> None:
    """``sync`` full counts only what the source holds onto a target reading as zeroes (len
    0 for a fresh qcow2), everything onto null-co or a target with data: QEMU 11.1's
    numbers."""
    import mirror_len_script

    want = json.loads(mirror_len_script.DATA.read_text())
    assert mirror_len_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_full_mirror_len_live_against_qemu() -> None:
    import mirror_len_script
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("mirror-len-live") as work:
        real = mirror_len_script.run_script(True, work)
        assert mirror_len_script.run_script(False, work) == real
