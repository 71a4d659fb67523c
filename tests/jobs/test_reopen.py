"""blockdev-reopen and blockdev-set-active: QEMU 11.1's replies and graph, and what the
changes do to the image lock, to the data a guest reads through an export, and to the file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import reopen_script
from conversation import Daemon
from test_mirror import qemu_img, read_export

KIB, MIB = 1 << 10, 1 << 20


def test_transcripts_are_qemus(tmp_path: Path) -> None:
    want = json.loads(reopen_script.DATA.read_text())
    assert reopen_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcripts_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("reopen-live") as work:
        real = reopen_script.run_script(True, work)
        assert reopen_script.run_script(False, work) == real


def _daemon(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path, real=False)


def _locked(img: Path) -> bool:
    """Whether another process is kept from opening the image (qemu-img's lock check)."""
    done = qemu_img("info", str(img))
    return done.returncode != 0 and "lock" in done.stderr


def _qcow2(node: str, file: str, **more: object) -> dict:
    return {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": file}, **more}  # fmt: skip


def _nbd(d: Daemon, sock: Path, node: str, writable: bool) -> str:
    addr = {"type": "unix", "data": {"path": str(sock)}}
    assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
    exp = {"type": "nbd", "id": "e", "node-name": node, "name": "x", "writable": writable}
    assert d.cmd("block-export-add", exp) == {"return": {}}
    return f"nbd+unix:///x?socket={sock}"


def test_read_only_and_back_moves_the_lock_and_writes_land(tmp_path: Path) -> None:
    """Read-write: another process cannot open the image; reopened read-only it can (the
    node's caches were written back: qemu-img check is clean then); read-write again, the
    lock is back and a guest's writes through a new writable export land in the image."""
    img = tmp_path / "d.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(img), "1M").returncode == 0
    d = _daemon(tmp_path)
    try:
        f = {"driver": "file", "node-name": "f", "filename": "d.qcow2"}
        assert d.cmd("blockdev-add", f) == {"return": {}}
        node = {"driver": "qcow2", "node-name": "d", "file": "f"}
        assert d.cmd("blockdev-add", node) == {"return": {}}
        assert _locked(img)
        ro = {"options": [{**node, "read-only": True}]}
        assert d.cmd("blockdev-reopen", ro) == {"return": {}}
        assert not _locked(img)
        assert qemu_img("check", "-U", str(img)).returncode == 0
        rw = {"options": [{**node, "read-only": False}]}
        assert d.cmd("blockdev-reopen", rw) == {"return": {}}
        assert _locked(img)
        uri = _nbd(d, tmp_path / "nbd.sock", "d", True)
        subprocess.run(["/usr/bin/python3", "-c", _WRITE, uri], check=True, timeout=30)
    finally:
        d.close()
    assert qemu_img("check", str(img)).returncode == 0
    out = tmp_path / "out.raw"
    assert qemu_img("convert", "-O", "raw", str(img), str(out)).returncode == 0
    assert out.read_bytes() == b"\x5a" * (64 * KIB) + bytes(MIB - 64 * KIB)


_WRITE = (
    "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
    "h.pwrite(b'\\x5a' * 65536, 0)\nh.flush()\nh.shutdown()\n"
)


def test_a_new_backing_node_is_read_through_at_once(tmp_path: Path) -> None:
    """An exported qcow2 node without a backing node reads zeroes (the export's fast path
    learned that); reopened with a backing node it reads the backing data, and with backing
    null zeroes again."""
    img = tmp_path / "d.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(img), "1M").returncode == 0
    pattern = bytes(range(256)) * (MIB // 256)
    (tmp_path / "b.raw").write_bytes(pattern)
    d = _daemon(tmp_path)
    try:
        assert d.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                      "filename": "d.qcow2"}) == {"return": {}}  # fmt: skip
        node = {"driver": "qcow2", "node-name": "d", "file": "f"}
        assert d.cmd("blockdev-add", node) == {"return": {}}
        back = {"driver": "raw", "node-name": "b", "read-only": True,
                "file": {"driver": "file", "filename": "b.raw"}}  # fmt: skip
        assert d.cmd("blockdev-add", back) == {"return": {}}
        uri = _nbd(d, tmp_path / "nbd.sock", "d", False)
        assert read_export(uri, MIB) == bytes(MIB)
        reply = d.cmd("blockdev-reopen", {"options": [{**node, "backing": "b"}]})
        assert reply == {"return": {}}
        assert read_export(uri, MIB) == pattern
        reply = d.cmd("blockdev-reopen", {"options": [{**node, "backing": None}]})
        assert reply == {"return": {}}
        assert read_export(uri, MIB) == bytes(MIB)
    finally:
        d.close()


def test_inactive_node_lets_another_process_write_and_sees_it_after(tmp_path: Path) -> None:
    """Inactive, the image is unlocked: another process (qemu-io) writes it; active again,
    the lock is back and a guest reads what that process wrote (the tables read anew)."""
    img = tmp_path / "d.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(img), "1M").returncode == 0
    d = _daemon(tmp_path)
    try:
        assert d.cmd("blockdev-add", _qcow2("d", "d.qcow2")) == {"return": {}}
        uri = _nbd(d, tmp_path / "nbd.sock", "d", False)
        assert read_export(uri, MIB) == bytes(MIB)
        assert _locked(img)
        assert d.cmd("blockdev-set-active", {"active": False}) == {"return": {}}
        assert not _locked(img)
        io = subprocess.run(["qemu-io", "-c", "write -P 7 0 128k", str(img)],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
        assert io.returncode == 0 and "error" not in io.stdout.lower(), io.stdout + io.stderr
        assert d.cmd("blockdev-set-active", {"active": True}) == {"return": {}}
        assert _locked(img)
        assert read_export(uri, MIB) == b"\x07" * (128 * KIB) + bytes(MIB - 128 * KIB)
    finally:
        d.close()
    assert qemu_img("check", str(img)).returncode == 0


def _io(uri: str, cmd: str) -> None:
    done = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, uri], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout


def test_file_child_swapped_under_an_export_writes_land_in_the_new_file(tmp_path: Path) -> None:
    """A qcow2 node reopened over another file node holding a copy of its image, under a
    writable NBD export: a write through the export lands in the new file, reads back so,
    and the old file does not get it; both images stay consistent."""
    img, copy = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(img), "1M").returncode == 0
    d = _daemon(tmp_path)
    try:
        for node, name in (("fa", "a.qcow2"), ("fb", "b.qcow2")):
            if name == "b.qcow2":
                copy.write_bytes(img.read_bytes())  # the image as it is now, header included
            f = {"driver": "file", "node-name": node, "filename": name}
            assert d.cmd("blockdev-add", f) == {"return": {}}
            if node == "fa":
                q = {"driver": "qcow2", "node-name": "q", "file": "fa"}
                assert d.cmd("blockdev-add", q) == {"return": {}}
        uri = _nbd(d, tmp_path / "nbd.sock", "q", True)
        reopen = {"options": [{"driver": "qcow2", "node-name": "q", "file": "fb"}]}
        assert d.cmd("blockdev-reopen", reopen) == {"return": {}}
        _io(uri, "write -P 9 64k 64k")
        assert read_export(uri, 1 << 20)[64 << 10 : 128 << 10] == b"\x09" * (64 << 10)
        nodes = {n["node-name"]: n for n in d.cmd("query-named-block-nodes")["return"]}
        assert nodes["q"]["file"] == "b.qcow2"
        assert d.cmd("blockdev-del", {"node-name": "fa"}) == {"return": {}}  # unused now
    finally:
        d.close()
    for path, want in ((copy, b"\x09"), (img, b"\x00")):
        assert qemu_img("check", str(path)).returncode == 0
        out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -v 65536 16", str(path)],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        assert f" {want.hex()} {want.hex()}" in out, out
