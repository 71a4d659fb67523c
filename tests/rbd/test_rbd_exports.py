"""An RBD image served through every export (NBD, FUSE over /dev/fuse and io_uring): what a
client writes is what ``rbd export`` reads from the cluster, and the reverse."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import Qsd

MiB = 1 << 20
OBJECT = 4 * MiB  # rbd create's default object size


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def _quit(daemon: Qsd) -> None:
    """Quit over QMP (the node is flushed and closed) and wait for the exit."""
    qmp = daemon.qmp()
    try:
        qmp.cmd("quit")
    except EOFError:
        pass
    assert daemon.wait() == 0


def test_nbd_export_writes_reach_the_image(ceph, qsd, tmp_path: Path) -> None:
    """Under ``raw``, exported from an iothread (librbd's completions go to that loop),
    with nbdcopy's many requests in flight."""
    image = ceph.new_image(8 * MiB)
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--object", "iothread,id=io0",
        "--blockdev", ceph.blockdev("r0", image),
        "--blockdev", "driver=raw,node-name=d0,file=r0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=d0,iothread=io0,writable=on",
    )  # fmt: skip
    uri = f"nbd+unix:///d0?socket={sock}"
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(MiB) + _pattern(2 * MiB, 3) + bytes(5 * MiB))
    subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=60)
    got = tmp_path / "got.raw"
    subprocess.run(["nbdcopy", uri, str(got)], check=True, timeout=60)
    assert got.read_bytes() == src.read_bytes()
    _quit(daemon)
    assert ceph.export(image) == src.read_bytes()


def test_nbd_block_status_follows_the_objects(ceph, qsd, tmp_path: Path) -> None:
    """Allocation comes from librbd's diff iterate, whole objects: one written 4 KiB makes
    its 4 MiB object data, the objects never written are holes reading as zeroes."""
    image = ceph.import_image(_pattern(4096, 2) + bytes(16 * MiB - 4096))  # import is sparse
    sock = tmp_path / "nbd.sock"
    qsd(
        "--blockdev", ceph.blockdev("r0", image, **{"read-only": "on"}),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=r0",
    )  # fmt: skip
    out = subprocess.run(
        ["nbdinfo", "--map", f"nbd+unix:///r0?socket={sock}"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    rows = [line.split()[:3] for line in out.splitlines()]
    assert rows == [["0", str(OBJECT), "0"], [str(OBJECT), str(12 * MiB), "3"]]


def test_fuse_export_over_dev_fuse(ceph, qsd, tmp_path: Path) -> None:
    image = ceph.new_image(12 * MiB)
    mnt = tmp_path / "mnt"
    mnt.touch()
    daemon = qsd(
        "--blockdev", ceph.blockdev("r0", image),
        "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={mnt},writable=on",
    )  # fmt: skip
    data = _pattern(MiB, 9)
    fd = os.open(mnt, os.O_RDWR)
    try:
        os.pwrite(fd, data, 8 * MiB + 4096)
        os.fsync(fd)
        assert os.pread(fd, len(data), 8 * MiB + 4096) == data
        # SEEK_DATA/SEEK_HOLE by whole objects: only the third object is allocated
        assert os.lseek(fd, 0, os.SEEK_DATA) == 8 * MiB
        assert os.lseek(fd, 8 * MiB, os.SEEK_HOLE) == 12 * MiB
    finally:
        os.close(fd)
    _quit(daemon)
    want = bytearray(12 * MiB)
    want[8 * MiB + 4096 : 8 * MiB + 4096 + len(data)] = data
    assert ceph.export(image) == bytes(want)


def test_fuse_export_over_io_uring(ceph, qsd, uring_knob, tmp_path: Path) -> None:
    """An RBD node's fast road is the daemon's alone (librbd's handle), so its io_uring
    queues are served on the daemon's main loop rather than by worker processes, READ and
    WRITE going to librbd without the engine; the bytes land in the image."""
    before = _pattern(2 * MiB, 1)
    image = ceph.import_image(before + bytes(6 * MiB))
    mnt = tmp_path / "mnt"
    mnt.touch()
    daemon = qsd(
        "--blockdev", ceph.blockdev("r0", image),
        "--export",
        f"type=fuse,id=e0,node-name=r0,mountpoint={mnt},writable=on,io_uring=on",
    )  # fmt: skip
    data = _pattern(MiB, 5)
    fd = os.open(mnt, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pread(fd, 2 * MiB, 0) == before
        os.pwrite(fd, data, 4 * MiB)
        os.fsync(fd)
        assert os.pread(fd, MiB, 4 * MiB) == data
    finally:
        os.close(fd)
    qmp = daemon.qmp()
    (info,) = qmp.cmd("x-query-fuse-queues")
    queues = info["uring-queues"]
    assert {q["fast-path"] for q in queues} == {"rbd"}
    assert all(q["name"].endswith("@main") for q in queues)
    assert not _children(daemon.proc.pid)  # no queue worker was forked
    assert sum(q["bytes-read"] for q in queues) >= 3 * MiB
    # the reads and writes took the fast road (the engine: lookups, opens, fsync...)
    engine = sum(q["engine-requests"] for q in queues)
    assert engine < sum(q["requests"] for q in queues) - 4
    assert sum(q["errors"] for q in queues) == 0
    qmp.close()
    _quit(daemon)
    assert ceph.export(image) == before + bytes(2 * MiB) + data + bytes(3 * MiB)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (queue workers are the daemon's children)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _fio(cwd: Path, filename: Path, *extra: str) -> str:
    args = [
        "fio", "--name=verify", f"--filename={filename}", "--rw=randwrite", "--bs=4k",
        "--numjobs=2", "--size=8M", "--offset_increment=8M", "--verify=crc32c",
        "--verify_fatal=1", "--group_reporting", *extra,
    ]  # fmt: skip
    # fio leaves its verify state files in the cwd
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_fio_at_depth_through_io_uring_queues(ceph, qsd, uring_knob, tmp_path: Path) -> None:
    """Many requests in flight (two fio jobs at depth 16, through the io_uring queues to
    librbd's aio calls): fio's checksums verify through the mount, and again
    on what ``rbd export`` reads from the cluster afterwards."""
    image = ceph.new_image(16 * MiB)
    mnt = tmp_path / "mnt"
    mnt.touch()
    daemon = qsd(
        "--blockdev", ceph.blockdev("r0", image),
        "--export",
        f"type=fuse,id=e0,node-name=r0,mountpoint={mnt},writable=on,io_uring=on",
    )  # fmt: skip
    out = _fio(tmp_path, mnt, "--direct=1", "--ioengine=io_uring", "--iodepth=16",
               "--do_verify=1")  # fmt: skip
    assert "err= 0" in out
    _quit(daemon)
    exported = tmp_path / "exported.raw"
    exported.write_bytes(ceph.export(image))
    _fio(tmp_path, exported, "--verify_only")


def test_fio_at_depth_through_nbd(ceph, qsd, tmp_path: Path) -> None:
    """NBD's fast road to librbd (a Transfer per request, completed from the image's event
    socket): 4 KiB writes at depth verify through the export and in the cluster, and
    every node of the chain counts them."""
    image = ceph.new_image(16 * MiB)
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--blockdev", ceph.blockdev("r0", image),
        "--blockdev", "driver=raw,node-name=d0,file=r0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=d0,writable=on",
    )  # fmt: skip
    uri = f"nbd+unix:///d0?socket={sock}"
    out = _fio(tmp_path, Path("d0"), "--ioengine=nbd", f"--uri={uri}", "--iodepth=16",
               "--do_verify=1")  # fmt: skip
    assert "err= 0" in out
    qmp = daemon.qmp()
    entries = qmp.cmd("query-blockstats", **{"query-nodes": True})
    (stats,) = [s for s in entries if s.get("node-name") == "r0"]
    assert stats["stats"]["wr_operations"] >= 4096  # the fast road counts on every node
    qmp.close()
    _quit(daemon)
    exported = tmp_path / "exported.raw"
    exported.write_bytes(ceph.export(image))
    _fio(tmp_path, exported, "--verify_only")


def _map(uri: str) -> list[list[str]]:
    out = subprocess.run(["nbdinfo", "--map", uri], check=True, capture_output=True,
                         text=True, timeout=60).stdout  # fmt: skip
    return [line.split()[:3] for line in out.splitlines()]


def test_block_status_learns_and_forgets_allocation(ceph, qsd, tmp_path: Path) -> None:
    """Objects found allocated are answered from memory afterwards (node's cache), yet a
    write that allocates another object shows at once, and a discard of a known one
    makes it a hole again."""
    image = ceph.import_image(_pattern(4096, 4) + bytes(16 * MiB - 4096))
    sock = tmp_path / "nbd.sock"
    qsd(
        "--blockdev", ceph.blockdev("r0", image, discard="unmap"),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=r0,writable=on",
    )  # fmt: skip
    uri = f"nbd+unix:///r0?socket={sock}"
    assert _map(uri) == [["0", str(OBJECT), "0"], [str(OBJECT), str(12 * MiB), "3"]]
    fio = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--size=4k"]
    subprocess.run([*fio, "--rw=write", f"--offset={8 * MiB}"], check=True, timeout=60,
                   capture_output=True, cwd=tmp_path)  # fmt: skip
    assert _map(uri) == [
        ["0", str(OBJECT), "0"],
        [str(OBJECT), str(OBJECT), "3"],
        [str(2 * OBJECT), str(OBJECT), "0"],
        [str(3 * OBJECT), str(OBJECT), "3"],
    ]
    subprocess.run([*fio[:-2], f"--bs={OBJECT}", f"--size={OBJECT}", "--rw=trim"],
                   check=True, timeout=60, capture_output=True, cwd=tmp_path)  # fmt: skip
    assert _map(uri) == [
        ["0", str(2 * OBJECT), "3"],
        [str(2 * OBJECT), str(OBJECT), "0"],
        [str(3 * OBJECT), str(OBJECT), "3"],
    ]
