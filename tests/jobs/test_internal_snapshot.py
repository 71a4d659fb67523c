"""Internal qcow2 snapshots (blockdev-snapshot-internal-sync, -delete-internal-sync): QEMU
11.1's replies and image bytes, the data of each snapshot as QEMU's tools read it, and no
write after a snapshot reaching a shared cluster, through any export's fast path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import internal_snapshot_script as script
import pytest
from conversation import Daemon
from test_mirror import qemu_img

KIB, MIB = 1 << 10, 1 << 20


@pytest.mark.parametrize("variant", [None, *script.VARIANTS])
def test_transcript_is_qemus(tmp_path: Path, variant: str | None) -> None:
    """Errors, replies, and then qemu-img check, snapshot list, every snapshot's data and
    the file's bytes (dates masked): QEMU 11.1's daemon's, recorded (the default image, one
    with extended L2 entries, a version 2 image)."""
    want = json.loads(script.data_file(variant).read_text())
    assert script.run_script(False, tmp_path, variant) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    """The same live, and QEMU 11.1's own qemu-img check on qsd-py's image."""
    from realqsd_support import require_real_qsd, shared_dir

    tool = require_real_qsd()
    with shared_dir("isnap-live") as work:
        for variant in (None, *script.VARIANTS):
            real = script.run_script(True, work, variant)
            assert script.run_script(False, work, variant) == real
            check = subprocess.run(
                [str(tool), "run", "qemu-img", "check", str(work / "d.qcow2")],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert check.returncode == 0, check.stdout + check.stderr
            assert "No errors were found" in check.stdout
            listing = subprocess.run(
                [str(tool), "run", "qemu-img", "snapshot", "-l", str(work / "d.qcow2")],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            names = [line.split()[:2] for line in listing.stdout.splitlines()[2:]]
            assert names == [[i, n] for i, n, _ in real[-1]["images"]["snapshots"]]


def _model(writes: list[tuple[int, int, int]], size: int = 4 * MIB) -> bytes:
    """The prefill of script.make_images, then ``writes``."""
    data = bytearray(size)
    for off, n, byte in [(0, MIB, 1), (MIB, 64 * KIB, 7), (3 * MIB, 4 * KIB, 11), *writes]:
        data[off : off + n] = bytes([byte]) * n
    return bytes(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_each_snapshot_reads_as_the_data_at_its_time(tmp_path: Path) -> None:
    """qemu-img (convert -l, and snapshot -a on a copy) reads every snapshot as the guest
    data when it was taken, the active image as all writes; qemu-img check is clean."""
    facts = script.run_script(False, tmp_path)[-1]["images"]
    assert facts["check"][0] == 0, facts["check"]
    assert facts["data s1"] == _sha(_model([]))
    assert facts["data s3"] == _sha(_model(script.WRITES_1 + script.WRITES_2))
    everything = _model(script.WRITES_1 + script.WRITES_2 + script.WRITES_3)
    assert facts["data s4"] == _sha(everything)
    zeroed = [(off, n, 0) for off, n, _ in script.ZEROES_4]  # a discard reads zeroes too
    assert facts["data active"] == _sha(
        _model(script.WRITES_1 + script.WRITES_2 + script.WRITES_3 + zeroed)
    )
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes((tmp_path / "d.qcow2").read_bytes())
    done = qemu_img("snapshot", "-a", "s1", str(copy))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.raw"
    assert qemu_img("convert", "-O", "raw", str(copy), str(out)).returncode == 0
    assert out.read_bytes() == _model([])


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
def test_no_fast_path_write_reaches_a_shared_cluster(
    tmp_path: Path, uring: bool, request: pytest.FixtureRequest
) -> None:
    """Through a writable FUSE export (io_uring queue workers, or /dev/fuse queues): data
    written twice (the second write goes in place, the queues' fast path), a snapshot, then
    the same clusters written again. Had a queue kept a mapping that still says "writable
    in place", the snapshot would read the new data: it must read the old, the image the
    new, and qemu-img check must be clean."""
    if uring:
        request.getfixturevalue("uring_knob")
    img = tmp_path / "d.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(img), "4M").returncode == 0
    mnt = tmp_path / "mnt"
    mnt.touch()
    d = Daemon(tmp_path, real=False)
    try:
        node = {"driver": "qcow2", "node-name": "d",
                "file": {"driver": "file", "filename": "d.qcow2"}}  # fmt: skip
        assert d.cmd("blockdev-add", node) == {"return": {}}
        fuse = {"type": "fuse", "id": "f", "node-name": "d", "mountpoint": str(mnt),
                "writable": True, "io-uring": uring}  # fmt: skip
        assert d.cmd("block-export-add", fuse) == {"return": {}}
        _pwrite(mnt, 0, b"\x01" * MIB)
        _pwrite(mnt, 0, b"\x02" * MIB)  # in place now
        snap = {"device": "d", "name": "before"}
        assert d.cmd("blockdev-snapshot-internal-sync", snap) == {"return": {}}
        for off in range(0, MIB, 64 * KIB):  # every cluster once, part of it only
            _pwrite(mnt, off + 4 * KIB, b"\x03" * (8 * KIB))
        _pwrite(mnt, 0, b"\x04" * (4 * KIB))
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    check = qemu_img("check", str(img))
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "out.raw"
    conv = qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", str(img), str(out))
    assert conv.returncode == 0, conv.stderr
    assert out.read_bytes() == b"\x02" * MIB + bytes(3 * MIB)
    assert qemu_img("convert", "-O", "raw", str(img), str(out)).returncode == 0
    want = bytearray(b"\x02" * MIB + bytes(3 * MIB))
    for off in range(0, MIB, 64 * KIB):
        want[off + 4 * KIB : off + 12 * KIB] = b"\x03" * (8 * KIB)
    want[: 4 * KIB] = b"\x04" * (4 * KIB)
    assert out.read_bytes() == bytes(want)


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    """Write through the mount with O_DIRECT (each write a FUSE request, no page cache)."""
    import mmap

    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def test_snapshots_under_nbd_load(tmp_path: Path) -> None:
    """Snapshots taken while a guest writes through NBD without pause: each snapshot reads
    as the data after some prefix of the writes (in order), the image as all of them, and
    qemu-img check is clean."""
    from test_mirror import Writer, model_after

    size = 2 * MIB
    img = tmp_path / "d.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(img), str(size)).returncode == 0
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    try:
        node = {"driver": "qcow2", "node-name": "d",
                "file": {"driver": "file", "filename": "d.qcow2"}}  # fmt: skip
        assert d.cmd("blockdev-add", node) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        nbd = {"type": "nbd", "id": "e", "node-name": "d", "name": "d", "writable": True}
        assert d.cmd("block-export-add", nbd) == {"return": {}}
        writer = Writer(f"nbd+unix:///d?socket={sock}", 21, tmp_path / "stop")
        bounds = []
        for name in ("a", "b", "c"):
            writer.wait_for(25)
            low = writer.count
            snap = {"device": "d", "name": name}
            assert d.cmd("blockdev-snapshot-internal-sync", snap) == {"return": {}}
            bounds.append((name, low))
        written = writer.finish()
    finally:
        d.close()
    check = qemu_img("check", str(img))
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "out.raw"
    seen = {}
    for name, _low in bounds:
        conv = qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
        assert conv.returncode == 0, conv.stderr
        seen[name] = out.read_bytes()
    prefixes = _prefixes_matching(size, 21, written, seen)
    order = [prefixes.get(name) for name, _ in bounds]
    assert None not in order, f"a snapshot is no prefix of the writes: {order}"
    assert all(p >= low for p, (_, low) in zip(order, bounds, strict=True)), (order, bounds)
    assert order == sorted(order)
    assert qemu_img("convert", "-O", "raw", str(img), str(out)).returncode == 0
    assert out.read_bytes() == model_after(bytes(size), 21, written)


def _prefixes_matching(size: int, seed: int, writes: int, images: dict) -> dict:
    """For each image, the first n such that it equals the data after n of the writer's
    writes (replayed one by one)."""
    import random

    from test_mirror import pick  # type: ignore[attr-defined]

    rng = random.Random(seed)
    data = bytearray(size)
    found: dict = {}
    for n in range(writes + 1):
        for name, image in images.items():
            if name not in found and image == data:
                found[name] = n
        if n < writes:
            off, length, byte = pick(rng, size)
            data[off : off + length] = bytes([byte]) * length
    return found
