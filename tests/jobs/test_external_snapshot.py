"""External snapshots (blockdev-snapshot, blockdev-snapshot-sync): QEMU 11.1's replies and
overlay headers, and exports that keep serving through the overlay while a guest writes."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import snapshot_script
from conversation import Daemon
from test_mirror import Writer, model_after, pick, qemu_img  # type: ignore[attr-defined]

MIB = 1 << 20


def test_transcript_is_qemus(tmp_path: Path) -> None:
    """Errors, exports, the graph and the overlays' header bytes: QEMU 11.1's, recorded."""
    want = json.loads(snapshot_script.DATA.read_text())
    assert snapshot_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("snapshot-live") as work:
        real = snapshot_script.run_script(True, work)
        assert snapshot_script.run_script(False, work) == real


def _start(tmp_path: Path, initial: bytes, fuse: dict | None) -> tuple[Daemon, str]:
    """A daemon with base.img (raw ``initial``) as node ``base``, a writable NBD export of
    it, and the FUSE export ``fuse`` if given."""
    (tmp_path / "base.img").write_bytes(initial)
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    try:
        base = {"driver": "file", "filename": "base.img", "node-name": "base"}
        assert d.cmd("blockdev-add", base) == {"return": {}}
        if fuse is not None:
            assert d.cmd("block-export-add", fuse) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        nbd = {"type": "nbd", "id": "e", "node-name": "base", "name": "d", "writable": True}
        assert d.cmd("block-export-add", nbd) == {"return": {}}
    except BaseException:
        d.close()
        if fuse is not None:
            subprocess.run(["umount", "-l", fuse["mountpoint"]], capture_output=True, check=False)
        raise
    return d, f"nbd+unix:///d?socket={sock}"


def test_exports_follow_a_snapshot_under_load(tmp_path: Path) -> None:
    """A guest writes through NBD without pause while blockdev-snapshot-sync puts an overlay
    over the exported image: every write is kept (the overlay over the frozen base reads as
    the model of all writes), a read-only FUSE export (/dev/fuse queues) shows the same,
    the base is frozen at some point of the write sequence, and qemu-img check is clean."""
    size = 2 * MIB
    initial = random.Random(5).randbytes(size)
    mnt = tmp_path / "mnt"
    mnt.touch()
    fuse = {"type": "fuse", "id": "f", "node-name": "base", "mountpoint": str(mnt)}
    d, uri = _start(tmp_path, initial, fuse)
    try:
        writer = Writer(uri, 11, tmp_path / "stop")
        writer.wait_for(30)
        before = writer.count
        sync = {"node-name": "base", "snapshot-file": "s.qcow2", "snapshot-node-name": "s"}
        assert d.cmd("blockdev-snapshot-sync", sync) == {"return": {}}
        written = writer.finish()
        # A second guest, surely after the snapshot: its writes must not reach the base.
        after = Writer(uri, 12, tmp_path / "stop2")
        after.wait_for(20)
        written2 = after.finish()
        nodes = {e["id"]: e["node-name"] for e in d.cmd("query-block-exports")["return"]}
        assert nodes == {"f": "s", "e": "s"}
        model = model_after(model_after(initial, 11, written), 12, written2)
        assert mnt.read_bytes() == model
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    frozen = (tmp_path / "base.img").read_bytes()
    at = _prefix_length(initial, 11, written, frozen)
    assert at is not None and at >= before, "the base changed after the snapshot"
    check = qemu_img("check", str(tmp_path / "s.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "out.img"
    conv = qemu_img("convert", "-O", "raw", str(tmp_path / "s.qcow2"), str(out))
    assert conv.returncode == 0, conv.stderr
    assert out.read_bytes() == model
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "s.qcow2")).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.img", "file")


def _prefix_length(initial: bytes, seed: int, writes: int, image: bytes) -> int | None:
    """The last n <= ``writes`` such that ``image`` is the data after n of the writer's
    writes (replayed one by one), or None."""
    rng = random.Random(seed)
    data = bytearray(initial)
    found = None
    for n in range(writes + 1):
        if data == image:
            found = n
        if n < writes:
            off, length, byte = pick(rng, len(data))
            data[off : off + length] = bytes([byte]) * length
    return found


def test_blockdev_snapshot_moves_the_export_to_the_overlay(tmp_path: Path) -> None:
    """blockdev-snapshot with an overlay added by the user: writes after it land in the
    overlay, the base keeps what it had, the export reads through the overlay."""
    size = MIB
    initial = random.Random(6).randbytes(size)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "o.qcow2"), "1M"],
                   check=True, capture_output=True)  # fmt: skip
    d, uri = _start(tmp_path, initial, None)
    try:
        ovl = {"driver": "qcow2", "node-name": "o", "backing": None,
               "file": {"driver": "file", "filename": "o.qcow2"}}  # fmt: skip
        assert d.cmd("blockdev-add", ovl) == {"return": {}}
        assert d.cmd("blockdev-snapshot", {"node": "base", "overlay": "o"}) == {"return": {}}
        writer = Writer(uri, 12, tmp_path / "stop")
        writer.wait_for(20)
        written = writer.finish()
        nodes = {n["node-name"]: n["ro"] for n in d.cmd("query-named-block-nodes")["return"]}
        assert nodes["base"] is True and nodes["o"] is False
    finally:
        d.close()
    assert (tmp_path / "base.img").read_bytes() == initial
    out = tmp_path / "out.img"
    # the header names no backing file (QEMU writes none): give it to qemu-img
    src = ("json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": "
           f"\"{tmp_path}/o.qcow2\"}}, \"backing\": {{\"driver\": \"raw\", \"file\": "
           f"{{\"driver\": \"file\", \"filename\": \"{tmp_path}/base.img\"}}}}}}")  # fmt: skip
    conv = qemu_img("convert", "-O", "raw", src, str(out))
    assert conv.returncode == 0, conv.stderr
    assert out.read_bytes() == model_after(initial, 12, written)


def test_fuse_io_uring_export_follows_or_refuses_never_stays_behind(
    tmp_path: Path, uring_knob: Path
) -> None:
    """A writable FUSE-over-io_uring export of the image: either its queue workers follow
    the snapshot (a write through the mount lands in the overlay, the image keeps its data)
    or, where they cannot follow a pivot yet, the snapshot is refused and the image and its
    export stay as they were. Never does a writer stay on the image that became the
    snapshot. (QEMU moves every export.)"""
    initial = random.Random(7).randbytes(MIB)
    mnt = tmp_path / "mnt"
    mnt.touch()
    fuse = {"type": "fuse", "id": "f", "node-name": "base", "mountpoint": str(mnt),
            "writable": True, "io-uring": True}  # fmt: skip
    (tmp_path / "base.img").write_bytes(initial)
    d = Daemon(tmp_path, real=False)
    try:
        base = {"driver": "file", "filename": "base.img", "node-name": "base"}
        assert d.cmd("blockdev-add", base) == {"return": {}}
        assert d.cmd("block-export-add", fuse) == {"return": {}}
        sync = {"node-name": "base", "snapshot-file": "s.qcow2", "snapshot-node-name": "s"}
        reply = d.cmd("blockdev-snapshot-sync", sync)
        followed = "error" not in reply
        if not followed:
            assert reply["error"]["desc"] == "Node 'base' is used by 'f', which cannot follow"
            nodes = {n["node-name"]: n["ro"] for n in d.cmd("query-named-block-nodes")["return"]}
            assert nodes == {"base": False}
        exports = {e["id"]: e["node-name"] for e in d.cmd("query-block-exports")["return"]}
        assert exports == {"f": "s" if followed else "base"}
        with open(mnt, "r+b") as f:
            f.write(b"\x5a" * 4096)
            f.flush()
            os.fsync(f.fileno())
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    want = b"\x5a" * 4096 + initial[4096:]
    if followed:
        assert (tmp_path / "base.img").read_bytes() == initial
        out = tmp_path / "out.img"
        conv = qemu_img("convert", "-O", "raw", str(tmp_path / "s.qcow2"), str(out))
        assert conv.returncode == 0, conv.stderr
        assert out.read_bytes() == want
    else:
        assert (tmp_path / "base.img").read_bytes() == want
