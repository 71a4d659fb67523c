"""OFD locks at QEMU's byte offsets: qsd-py graphs and QEMU's tools lock each other out.

Two graphs stand for two daemons (each file node has its own open file description, as a
second process would). qemu-io (Debian's qemu-utils) checks interoperability with QEMU.
"""

from __future__ import annotations

import fcntl
import subprocess
import time
from pathlib import Path

import pytest

from qsd_py.block.drivers.file import F_OFD_GETLK, FLOCK
from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError


def locked_bytes(path: Path) -> set[int]:
    """Which of QEMU's lock bytes someone holds, seen from a fresh descriptor."""
    held = set()
    with open(path, "rb") as f:
        for byte in [*range(100, 104), *range(200, 204)]:
            res = fcntl.fcntl(f.fileno(), F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
            if FLOCK.unpack(res)[0] != fcntl.F_UNLCK:
                held.add(byte)
    return held


def file_opts(path: Path, name: str = "f0", **extra: object) -> dict[str, object]:
    return {"driver": "file", "node-name": name, "filename": str(path), **extra}


@pytest.fixture
async def other() -> BlockGraph:
    g = BlockGraph()
    yield g
    await g.close_all()


async def test_lock_bytes_follow_users(graph: BlockGraph, image) -> None:
    path = image()
    await graph.add(file_opts(path))
    await graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    assert locked_bytes(path) == set()  # no users, no locks (as QEMU)
    raw = graph.lookup("r0")
    raw.add_user("ro-export", write=False)
    assert locked_bytes(path) == {100}
    raw.add_user("rw-export", write=True)
    assert locked_bytes(path) == {100, 101, 103}
    raw.remove_user("rw-export")
    raw.remove_user("ro-export")
    assert locked_bytes(path) == set()
    await graph.add({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 512})
    assert locked_bytes(path) == {203}  # a window never shares resize


async def test_window_blocks_other_writer(graph: BlockGraph, other: BlockGraph, image) -> None:
    path = image()
    await graph.add({"driver": "raw", "node-name": "r0", "offset": 512, "file": file_opts(path)})
    await other.add(file_opts(path))
    with pytest.raises(QMPError, match='^Failed to get "resize" lock$'):
        other.lookup("f0").add_user("e0", write=True)
    assert not other.lookup("f0").users
    other.lookup("f0").add_user("e1", write=False)  # a reader is fine


async def test_writer_blocks_other_window(graph: BlockGraph, other: BlockGraph, image) -> None:
    path = image()
    await graph.add(file_opts(path))
    graph.lookup("f0").add_user("e0", write=True)
    with pytest.raises(QMPError, match='^Failed to get shared "resize" lock$'):
        await other.add(
            {"driver": "raw", "node-name": "r0", "offset": 512, "file": file_opts(path)}
        )
    assert len(other) == 0
    assert locked_bytes(path) == {100, 101, 103}  # the failed attempt left nothing behind


async def test_two_writers_share_like_qemu_exports(
    graph: BlockGraph, other: BlockGraph, image
) -> None:
    """QEMU's exports share every permission, so two of them may write one image."""
    path = image()
    await graph.add(file_opts(path))
    await other.add(file_opts(path))
    graph.lookup("f0").add_user("e0", write=True)
    other.lookup("f0").add_user("e0", write=True)


async def test_locking_off(graph: BlockGraph, other: BlockGraph, image) -> None:
    path = image()
    await graph.add({"driver": "raw", "node-name": "r0", "offset": 512, "file": file_opts(path)})
    await other.add(file_opts(path, locking="off"))
    other.lookup("f0").add_user("e0", write=True)
    assert locked_bytes(path) == {203}


async def test_qemu_img_refused_while_we_write(graph: BlockGraph, image) -> None:
    """qemu-img convert reads a consistent image: it does not share write."""
    path = image()
    await graph.add(file_opts(path))
    graph.lookup("f0").add_user("e0", write=True)
    convert = ["qemu-img", "convert", "-O", "raw", str(path), str(path.with_name("copy"))]
    res = subprocess.run(convert, capture_output=True, text=True)
    assert res.returncode != 0
    assert 'Failed to get shared "write" lock' in res.stderr
    graph.lookup("f0").remove_user("e0")
    res = subprocess.run(convert, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


async def test_we_are_refused_while_qemu_io_holds_a_window(graph: BlockGraph, image) -> None:
    """qemu-io on a raw window holds write and unshares resize, as our raw node does."""
    path = image()
    await graph.add(file_opts(path))
    spec = f'json:{{"driver":"raw","offset":512,"file":{{"driver":"file","filename":"{path}"}}}}'
    proc = subprocess.Popen(
        ["qemu-io", "-c", "sleep 5000", spec], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while 203 not in locked_bytes(path):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-io did not lock"
            time.sleep(0.02)
        with pytest.raises(QMPError, match='^Failed to get "resize" lock$'):
            graph.lookup("f0").add_user("e0", write=True)
        graph.lookup("f0").add_user("e1", write=False)
    finally:
        proc.kill()
        proc.wait()
