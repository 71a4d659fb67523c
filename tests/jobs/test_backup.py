"""blockdev-backup/drive-backup and image fleecing: QEMU 11.1's transcript, a backup under
NBD write load that keeps the point in time, cancel, target errors, and the fleecing recipe
(copy-before-write + snapshot-access exported over NBD) read while the source is written."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import backup_script
import pytest
from conversation import Daemon
from test_mirror import SYSTEM_PYTHON, Writer, model_after, qemu_img, read_export, wait_job

MIB = 1 << 20


def test_transcript_is_qemus(tmp_path: Path) -> None:
    """Errors, event order and replies of the recorded conversation (QEMU 11.1's)."""
    want = json.loads(backup_script.DATA.read_text())
    assert backup_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("backup-live") as work:
        real = backup_script.run_script(True, work)
        made = {name: (work / name).read_bytes() for name in backup_script.MADE}
        assert backup_script.run_script(False, work) == real
        # drive-backup's new images (a qcow2 one, a raw one): the same files
        assert {name: (work / name).read_bytes() for name in backup_script.MADE} == made


def _start_nbd(
    d: Daemon, sock: Path, node: str, name: str, writable: bool, iothread: str | None = None
) -> str:
    if not any(e["id"] for e in d.cmd("query-block-exports")["return"]):
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable}
    if iothread is not None:
        export["iothread"] = iothread
    assert d.cmd("block-export-add", export) == {"return": {}}
    return f"nbd+unix:///{name}?socket={sock}"


def _stop(writer: Writer | None) -> None:
    if writer is not None and writer.proc.poll() is None:
        writer.proc.kill()
        writer.proc.wait()


def mixed_bytes(size: int, seed: int) -> bytes:
    """Random 64 KiB chunks (which do not compress) between repeated patterns (which do)."""
    rng = random.Random(seed)
    chunk = 65536
    parts = [
        rng.randbytes(chunk) if i % 2 else bytes([i % 251 + 1]) * chunk
        for i in range(size // chunk)
    ]
    return b"".join(parts)


@pytest.mark.parametrize(("compress", "iothread"), [(False, False), (True, False), (False, True)])
def test_backup_under_nbd_load_keeps_the_point_in_time(
    tmp_path: Path, compress: bool, iothread: bool
) -> None:
    """Writes through a writable NBD export (on the main loop, or an iothread's) while a
    speed-limited backup runs: the qcow2 target ends up equal to the source as it was when
    the job started (with ``compress``: compressed clusters where they shrink), the export
    serves every write, and the job's filter node is there only while the job runs."""
    size = 8 * MIB
    initial = mixed_bytes(size, 11)
    (tmp_path / "src.img").write_bytes(initial)
    assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), "8M").returncode == 0
    d = Daemon(tmp_path, real=False)
    before = after = None
    try:
        assert d.cmd("blockdev-add", {"driver": "file", "filename": "src.img", "node-name": "src"})
        tgt = {
            "driver": "qcow2",
            "node-name": "tgt",
            "file": {"driver": "file", "filename": "t.qcow2"},
        }
        assert d.cmd("blockdev-add", tgt) == {"return": {}}
        if iothread:
            assert d.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
        uri = _start_nbd(d, tmp_path / "nbd.sock", "src", "d", True, "io0" if iothread else None)
        before = Writer(uri, 1, tmp_path / "stop1")
        before.wait_for(30)
        at_start = model_after(initial, 1, before.finish())
        backup = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 4 * MIB}
        if compress:
            backup["compress"] = True
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        exports = d.cmd("query-block-exports")["return"]
        assert exports[0]["node-name"].startswith("#block")  # the export is above the filter
        after = Writer(uri, 2, tmp_path / "stop2")
        after.wait_for(40)
        assert d.cmd("query-jobs")["return"][0]["status"] == "running"  # writes met the job
        wait_job(d, "b", None)
        written = after.finish()
        events = [e for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert events and "error" not in events[0]["data"]
        assert d.cmd("query-block-exports")["return"][0]["node-name"] == "src"
        drivers = {n["drv"] for n in d.cmd("query-named-block-nodes")["return"]}
        assert "copy-before-write" not in drivers
        assert read_export(uri, size) == model_after(at_start, 2, written)
    finally:
        _stop(before)
        _stop(after)
        d.close()
    (tmp_path / "start.img").write_bytes(at_start)
    check = qemu_img("check", str(tmp_path / "t.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert ("0.00% compressed clusters" not in check.stdout) is compress, check.stdout
    same = qemu_img(
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        str(tmp_path / "start.img"),
        str(tmp_path / "t.qcow2"),
    )
    assert same.returncode == 0, same.stdout + same.stderr


def test_cancel_takes_the_filter_away(tmp_path: Path) -> None:
    """A cancelled backup: BLOCK_JOB_CANCELLED, the export back on the source, no filter
    node left, both nodes deletable, the source unchanged."""
    size = 4 * MIB
    initial = random.Random(5).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    (tmp_path / "tgt.img").write_bytes(bytes(size))
    d = Daemon(tmp_path, real=False)
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        uri = _start_nbd(d, tmp_path / "nbd.sock", "src", "d", False)
        backup = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        nodes = {n["node-name"]: n["drv"] for n in d.cmd("query-named-block-nodes")["return"]}
        assert sorted(nodes.values()) == ["copy-before-write", "file", "file"]
        assert d.cmd("block-job-cancel", {"device": "b"}) == {"return": {}}
        wait_job(d, "b", None)
        names = [e["event"] for e in d.events()]
        assert "BLOCK_JOB_CANCELLED" in names and "BLOCK_JOB_COMPLETED" not in names
        assert d.cmd("query-block-exports")["return"][0]["node-name"] == "src"
        nodes = {n["node-name"]: n["drv"] for n in d.cmd("query-named-block-nodes")["return"]}
        assert nodes == {"tgt": "file", "src": "file"}
        assert read_export(uri, size) == initial
        assert d.cmd("block-export-del", {"id": "d"}) == {"return": {}}
        wait_export_gone(d)
        for name in ("tgt", "src"):
            assert d.cmd("blockdev-del", {"node-name": name}) == {"return": {}}
    finally:
        d.close()


def test_daemon_answers_after_a_target_error(tmp_path: Path) -> None:
    """A backup that fails on its target's injected write error (blkdebug under qcow2)
    leaves the daemon answering: the commands after it, which list the blkdebug node with
    its armed rule, get their replies within a timeout (a hang fails, not stalls, the
    test), and the node is reported active, as QEMU reports every node."""
    (tmp_path / "src.img").write_bytes(random.Random(7).randbytes(2 * MIB))
    assert qemu_img("create", "-f", "qcow2", str(tmp_path / "bad.qcow2"), "2M").returncode == 0
    d = Daemon(tmp_path, real=False)
    try:
        d.qmp.settimeout(10)
        src = {"driver": "file", "filename": "src.img", "node-name": "src"}
        assert d.cmd("blockdev-add", src) == {"return": {}}
        rule = {"event": "write_aio", "iotype": "write"}
        file = {"driver": "blkdebug", "node-name": "dbg", "inject-error": [rule],
                "image": {"driver": "file", "filename": "bad.qcow2"}}  # fmt: skip
        bad = {"driver": "qcow2", "node-name": "bad", "file": file}
        assert d.cmd("blockdev-add", bad) == {"return": {}}
        backup = {"job-id": "b", "device": "src", "target": "bad", "sync": "full"}
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        names = [e["event"] for e in d.settle("b", timeout=10)]
        assert "BLOCK_JOB_ERROR" in names and "BLOCK_JOB_COMPLETED" in names
        nodes = {n["node-name"]: n for n in d.cmd("query-named-block-nodes")["return"]}
        assert nodes["dbg"]["active"] is True and nodes["bad"]["active"] is True
        assert d.cmd("query-jobs") == {"return": []}
        assert d.cmd("blockdev-del", {"node-name": "bad"}) == {"return": {}}
    finally:
        d.close()


def wait_export_gone(d: Daemon, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while d.cmd("query-block-exports")["return"]:
        assert time.monotonic() < deadline, "export still there"
        time.sleep(0.01)


def test_full_target_file_system(tmp_path: Path, tiny_tmpfs: Any) -> None:
    """A target on a 1 MiB tmpfs: on-target-error stop pauses the job (BLOCK_JOB_ERROR,
    io-status nospace), a resume once there is room finishes the copy; report fails the
    job with the error."""
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
        backup = {
            "job-id": "b",
            "device": "src",
            "target": "tgt",
            "sync": "full",
            "on-target-error": "stop",
        }
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        wait_job(d, "b", "paused")
        info = d.cmd("query-block-jobs")["return"][0]
        assert info["io-status"] == "nospace" and info["paused"] is True
        errors = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_ERROR"]
        assert errors[0] == {"device": "b", "operation": "write", "action": "stop"}
        tiny_tmpfs.resize("8m")
        assert d.cmd("block-job-resume", {"device": "b"}) == {"return": {}}
        wait_job(d, "b", None)
        same = qemu_img(
            "compare", "-f", "raw", "-F", "raw", str(tmp_path / "src.img"), str(mnt / "tgt.img")
        )
        assert same.returncode == 0, same.stdout + same.stderr
        with open(mnt / "tgt.img", "wb") as f:  # empty and sparse again, and no room
            f.truncate(size)
        tiny_tmpfs.resize("1m")
        backup = {"job-id": "b2", "device": "src", "target": "tgt", "sync": "full"}
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        wait_job(d, "b2", None)
        done_events = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done_events[-1]["error"] == os.strerror(28)
    finally:
        if d is not None:
            d.close()


def test_fleecing_reads_the_point_in_time_while_the_source_is_written(tmp_path: Path) -> None:
    """QEMU's fleecing recipe: a qcow2 temp target backed by the source, a copy-before-write
    node over the source (the writable export's node), snapshot-access on top exported
    read-only. Reads of the snapshot while writes land see the source as it was; the writes
    all reach the source; a discard through the snapshot export drops what was read."""
    size = 4 * MIB
    initial = random.Random(21).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    assert (
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "tmp.qcow2"), "4M").returncode == 0
    )
    d = Daemon(tmp_path, real=False)
    writer = None
    try:
        for args in (
            {"driver": "file", "filename": "src.img", "node-name": "src"},
            {
                "driver": "qcow2",
                "node-name": "tmp",
                "file": {"driver": "file", "filename": "tmp.qcow2"},
                "backing": "src",
            },
            {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tmp"},
            {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"},
        ):
            assert d.cmd("blockdev-add", args) == {"return": {}}
        sock = tmp_path / "nbd.sock"
        live = _start_nbd(d, sock, "cbw", "live", True)
        snap = _start_nbd(d, sock, "acc", "snap", False)
        writer = Writer(live, 3, tmp_path / "stop")
        writer.wait_for(20)
        assert read_export(snap, size) == initial  # while writes go on
        writer.wait_for(20)
        assert read_export(snap, size) == initial
        written = writer.finish()
        assert written >= 40
        assert read_export(live, size) == model_after(initial, 3, written)
        assert read_export(snap, size) == initial
        for export in ("snap", "live"):
            assert d.cmd("block-export-del", {"id": export}) == {"return": {}}
        wait_export_gone(d)
        for node in ("acc", "cbw", "tmp", "src"):
            assert d.cmd("blockdev-del", {"node-name": node}) == {"return": {}}
    finally:
        _stop(writer)
        d.close()
    assert (tmp_path / "src.img").read_bytes() == model_after(initial, 3, written)
    check = qemu_img("check", str(tmp_path / "tmp.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.realqsd
def test_compressed_target_is_byte_for_byte_qemus() -> None:
    """The same compressed backup by both daemons (one copy at a time, as QEMU with
    x-perf max-workers 1: its parallel copies would place clusters in any order) gives the
    same qcow2 file, with compressed, normal and zero clusters and a short last cluster."""
    from conversation import Daemon as Either
    from conversation import run
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    images = {}
    with shared_dir("backup-compress") as work:
        for real in (True, False):
            (work / "src.img").write_bytes(mixed_bytes(MIB, 3) + bytes(MIB) + b"tail" * 128)
            target = work / "t.qcow2"
            target.unlink(missing_ok=True)
            size = str((work / "src.img").stat().st_size)
            assert qemu_img("create", "-q", "-f", "qcow2", str(target), size).returncode == 0
            d = Either(work, real)
            try:
                script = [
                    ["blockdev-add", {"driver": "file", "filename": "src.img", "node-name": "s"}],
                    ["blockdev-add", {"driver": "qcow2", "node-name": "t",
                                      "file": {"driver": "file", "filename": "t.qcow2"}}],
                    ["blockdev-backup", {"job-id": "b", "device": "s", "target": "t",
                                         "sync": "full", "compress": True,
                                         "x-perf": {"max-workers": 1}}],
                    ["settle-gone", "b"],
                ]  # fmt: skip
                run(d, script)
            finally:
                d.close()
            images[real] = target.read_bytes()
    assert images[False] == images[True]


@pytest.mark.parametrize("queues", ["workers", "iothread"])
def test_fuse_io_uring_writes_are_copied_first(
    tmp_path: Path, uring_knob: Path, queues: str
) -> None:
    """A writable FUSE export over io_uring stays on the source (its queues do not follow a
    graph change), so its writes must leave the fast path while the job's filter is in
    (queue worker processes learn it from a shared page, queues in an iothread from their
    plan): written during the backup, the target still holds the source as it was."""
    size = 4 * MIB
    initial = random.Random(8).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    (tmp_path / "tgt.img").write_bytes(bytes(size))
    mnt = tmp_path / "mnt"
    mnt.touch()
    d = Daemon(tmp_path, real=False)
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        export = {
            "type": "fuse",
            "id": "f",
            "node-name": "src",
            "mountpoint": str(mnt),
            "writable": True,
            "io_uring": True,
        }
        if queues == "iothread":
            assert d.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
            export["iothread"] = "io0"
        assert d.cmd("block-export-add", export) == {"return": {}}
        backup = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        model = bytearray(initial)
        rng = random.Random(9)
        fd = os.open(mnt, os.O_WRONLY)
        try:
            for _ in range(64):
                off = rng.randrange(0, size // 4096) * 4096
                data = rng.randbytes(4096)
                os.pwrite(fd, data, off)
                os.fsync(fd)
                model[off : off + 4096] = data
        finally:
            os.close(fd)
        assert d.cmd("query-jobs")["return"][0]["status"] == "running"  # the writes met it
        assert d.cmd("block-job-set-speed", {"device": "b", "speed": 0}) == {"return": {}}
        wait_job(d, "b", None)
        assert mnt.read_bytes() == bytes(model)
        assert (tmp_path / "tgt.img").read_bytes() == initial
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
        wait_export_gone(d)
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    assert (tmp_path / "src.img").read_bytes() == bytes(model)


# A client of both fleecing exports: 16 writes of 64 KiB to distinct clusters through the
# filter, then a read of the snapshot (and, with a writable snapshot export, a discard of a
# range of it and a read there); one result line each.
FLEECE_CLIENT = r"""
import nbd, sys
sock = sys.argv[1]
live = nbd.NBD(); live.connect_uri(f"nbd+unix:///cbw?socket={sock}")
snap = nbd.NBD(); snap.connect_uri(f"nbd+unix:///acc?socket={sock}")
for i in range(16):
    try:
        live.pwrite(b"x" * 65536, i * 131072)
        print("write ok")
    except nbd.Error as e:
        print("write", e.errno)
def read(off):
    try:
        return "read " + snap.pread(4096, off).hex()
    except nbd.Error as e:
        return "read failed"
print(read(0))
if snap.can_trim():
    snap.trim(262144, 3 << 20)
    print(read(0))
    print(read(3 << 20))  # a failed read hangs up (QEMU's structured reads do): the last
"""


@pytest.mark.parametrize("on_error", ["break-guest-write", "break-snapshot", None])
def test_fleecing_copy_errors_and_discard(tmp_path: Path, on_error: str | None) -> None:
    """The temp target on a 512 KiB tmpfs: ``break-guest-write`` fails the writes whose old
    data finds no room (ENOSPC) and keeps the snapshot whole; ``break-snapshot`` lets every
    write through and fails snapshot reads from then on. With room (None, a writable snapshot
    export): a discard through snapshot-access drops the range, whose reads then fail, while
    the rest still reads as the point in time."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    room = "size=512k" if on_error else "size=8m"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", room, "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs: {done.stderr}")
    size = 4 * MIB
    initial = random.Random(31).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    assert qemu_img("create", "-q", "-f", "qcow2", str(mnt / "tmp.qcow2"), "4M").returncode == 0
    d = None
    try:
        d = Daemon(tmp_path, real=False)
        cbw = {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tmp"}
        if on_error:
            cbw["on-cbw-error"] = on_error
        for args in (
            {"driver": "file", "filename": "src.img", "node-name": "src"},
            {
                "driver": "qcow2",
                "node-name": "tmp",
                "file": {"driver": "file", "filename": str(mnt / "tmp.qcow2")},
                "backing": "src",
            },
            cbw,
            {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"},
        ):
            assert d.cmd("blockdev-add", args) == {"return": {}}
        sock = tmp_path / "nbd.sock"
        _start_nbd(d, sock, "cbw", "cbw", True)
        _start_nbd(d, sock, "acc", "acc", on_error is None)
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", FLEECE_CLIENT, str(sock)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split("\n")
        writes, reads = lines[:16], [x for x in lines[16:] if x]
        first = "read " + initial[:4096].hex()
        if on_error == "break-guest-write":
            assert writes[0] == "write ok" and writes[-1] == "write ENOSPC", writes
            assert reads == [first]
        elif on_error == "break-snapshot":
            assert writes == ["write ok"] * 16
            assert reads == ["read failed"]
        else:
            assert writes == ["write ok"] * 16
            assert reads == [first, first, "read failed"]
    finally:
        if d is not None:
            d.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_quit_while_a_backup_runs(tmp_path: Path) -> None:
    """``quit`` cancels the job: the daemon exits cleanly, the source is untouched and the
    qcow2 target is consistent."""
    size = 4 * MIB
    initial = random.Random(13).randbytes(size)
    (tmp_path / "src.img").write_bytes(initial)
    assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), "4M").returncode == 0
    d = Daemon(tmp_path, real=False)
    try:
        src = {"driver": "file", "filename": "src.img", "node-name": "src"}
        assert d.cmd("blockdev-add", src) == {"return": {}}
        tgt = {
            "driver": "qcow2",
            "node-name": "tgt",
            "file": {"driver": "file", "filename": "t.qcow2"},
        }
        assert d.cmd("blockdev-add", tgt) == {"return": {}}
        backup = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        time.sleep(0.3)
        assert d.cmd("query-jobs")["return"][0]["status"] == "running"
        assert d.cmd("quit") == {"return": {}}
        assert d.proc.wait(20) == 0
    finally:
        d.close()
    assert (tmp_path / "src.img").read_bytes() == initial
    check = qemu_img("check", str(tmp_path / "t.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr


def test_discard_source_frees_what_was_copied(tmp_path: Path) -> None:
    """``discard-source`` on a source opened with discard=unmap: the copied ranges are
    discarded (the file keeps no blocks), the target holds the data (QEMU 11.1 alike)."""
    initial = random.Random(17).randbytes(MIB)
    (tmp_path / "src.img").write_bytes(initial)
    (tmp_path / "tgt.img").write_bytes(bytes(MIB))
    d = Daemon(tmp_path, real=False)
    try:
        src = {"driver": "file", "filename": "src.img", "node-name": "src", "discard": "unmap"}
        assert d.cmd("blockdev-add", src) == {"return": {}}
        tgt = {"driver": "file", "filename": "tgt.img", "node-name": "tgt"}
        assert d.cmd("blockdev-add", tgt) == {"return": {}}
        backup = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}
        assert d.cmd("blockdev-backup", {**backup, "discard-source": True}) == {"return": {}}
        wait_job(d, "b", None)
    finally:
        d.close()
    assert (tmp_path / "tgt.img").read_bytes() == initial
    assert os.stat(tmp_path / "src.img").st_blocks == 0


CHAIN = """
qemu-img create -q -f qcow2 base.qcow2 4M
qemu-io -c "write -P 1 0 2M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-io -c "write -P 2 1M 512k" -c "write -z 3M 64k" -c "write -P 3 3584k 100k" top.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 tgt.qcow2
qemu-img create -q -f qcow2 full.qcow2 4M
"""


@pytest.mark.realqsd
def test_top_and_full_targets_are_byte_for_byte_qemus() -> None:
    """sync top into a qcow2 target over the same base, and sync full, from a qcow2 overlay
    with data, zeroes and unallocated ranges, and drive-backup's new images for top (backed
    by the base) and none (backed by the source): both daemons write the same files."""
    from conversation import Daemon as Either
    from conversation import run
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    files: dict[bool, tuple[bytes, ...]] = {}
    perf = {"max-workers": 1}
    script = [
        ["blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": "top.qcow2"}}],
        ["blockdev-add", {"driver": "qcow2", "node-name": "tgt", "backing": None,
                          "file": {"driver": "file", "filename": "tgt.qcow2"}}],
        ["blockdev-add", {"driver": "qcow2", "node-name": "full",
                          "file": {"driver": "file", "filename": "full.qcow2"}}],
        ["blockdev-backup", {"job-id": "b", "device": "top", "target": "tgt", "sync": "top",
                             "x-perf": perf}],
        ["settle-gone", "b"],
        ["blockdev-backup", {"job-id": "c", "device": "top", "target": "full", "sync": "full",
                             "x-perf": perf}],
        ["settle-gone", "c"],
        ["drive-backup", {"job-id": "d", "device": "top", "target": "new.qcow2", "sync": "top",
                          "x-perf": perf}],
        ["settle-gone", "d"],
        ["drive-backup", {"job-id": "n", "device": "top", "target": "none.qcow2",
                          "sync": "none"}],
        ["block-job-cancel", {"device": "n"}],
        ["settle-gone", "n"],
    ]  # fmt: skip
    made = ("tgt", "full", "new", "none")
    with shared_dir("backup-chain") as work:
        for real in (True, False):
            for name in ("base", "top", *made):
                (work / f"{name}.qcow2").unlink(missing_ok=True)
            subprocess.run(["sh", "-ec", CHAIN], cwd=work, check=True)
            d = Either(work, real)
            try:
                run(d, script)
            finally:
                d.close()
            files[real] = tuple((work / f"{name}.qcow2").read_bytes() for name in made)
    assert files[False] == files[True]


def test_sync_top_copies_only_the_top_layer(tmp_path: Path) -> None:
    """sync top from a qcow2 overlay into a qcow2 target over the same base: the target
    reads as the overlay and holds only what the overlay's own layer holds."""
    subprocess.run(["sh", "-ec", CHAIN], cwd=tmp_path, check=True)
    d = Daemon(tmp_path, real=False)
    try:
        for name, backing in (("top", {}), ("tgt", {"backing": None})):
            args = {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": f"{name}.qcow2"},
                **backing,
            }
            assert d.cmd("blockdev-add", args) == {"return": {}}
        backup = {"job-id": "b", "device": "top", "target": "tgt", "sync": "top"}
        assert d.cmd("blockdev-backup", backup) == {"return": {}}
        wait_job(d, "b", None)
    finally:
        d.close()
    same = qemu_img("compare", str(tmp_path / "top.qcow2"), str(tmp_path / "tgt.qcow2"))
    assert same.returncode == 0, same.stdout + same.stderr
    maps = [
        [(m["start"], m["length"], m["depth"], m["zero"]) for m in json.loads(out.stdout)]
        for out in (
            qemu_img("map", "--output=json", str(tmp_path / f"{name}.qcow2"))
            for name in ("top", "tgt")
        )
    ]
    assert maps[0] == maps[1]


TIMEOUT_CLIENT = r"""
import nbd, sys
sock = sys.argv[1]
live = nbd.NBD(); live.connect_uri(f"nbd+unix:///cbw?socket={sock}")
for i in range(3):
    try:
        live.pwrite(b"x" * 4096, i * 65536)
        print("write ok")
    except nbd.Error as e:
        print("write", e.errno)
"""


def _cbw_timeout_writes(work: Path, real: bool) -> list[str]:
    """Writes through a cbw node whose target is throttled to 16 KiB/s, cbw-timeout 1 s."""
    (work / "src.img").write_bytes(random.Random(41).randbytes(MIB))
    (work / "t.img").write_bytes(bytes(MIB))
    d = Daemon(work, real)
    try:
        group = {"qom-type": "throttle-group", "id": "tg", "limits": {"bps-write": 16384}}
        assert d.cmd("object-add", group) == {"return": {}}
        for args in (
            {"driver": "file", "filename": "src.img", "node-name": "src"},
            {
                "driver": "throttle",
                "node-name": "tgt",
                "throttle-group": "tg",
                "file": {"driver": "file", "filename": "t.img"},
            },
            {
                "driver": "copy-before-write",
                "node-name": "cbw",
                "file": "src",
                "target": "tgt",
                "cbw-timeout": 1,
            },
        ):
            assert d.cmd("blockdev-add", args) == {"return": {}}
        _start_nbd(d, work / "nbd.sock", "cbw", "cbw", True)
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", TIMEOUT_CLIENT, str(work / "nbd.sock")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()
    finally:
        d.close()


def test_cbw_timeout_fails_a_slow_copy(tmp_path: Path) -> None:
    """A copy slower than ``cbw-timeout`` fails the write (break-guest-write; ETIMEDOUT,
    which NBD carries as EINVAL), as in QEMU 11.1: the throttle's burst lets the first
    cluster through, the next ones wait longer than a second."""
    assert " ".join(_cbw_timeout_writes(tmp_path, False)) == ("write ok write EINVAL write EINVAL")


@pytest.mark.realqsd
def test_cbw_timeout_is_qemus() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("backup-cbw-timeout") as work:
        assert _cbw_timeout_writes(work, True) == _cbw_timeout_writes(work, False)
