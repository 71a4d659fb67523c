"""The READ/WRITE fast path of both transports (no Task per request): which node chains
take it, and that it keeps the engine's semantics (EOF, windows, O_DIRECT alignment,
growing, null-co) with real I/O checked against the backing image."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from uring_support import (
    FIO_VERIFY_32M,
    UringServer,
    pread_direct,
    pwrite_direct,
    run_fio,
    uring_totals,
)

from qsd_py.export.fuse import fastpath

MiB = 1 << 20


KINDS = {name: kind for kind, name in fastpath.KIND_NAMES.items()}


def _queues(exp) -> list[dict[str, Any]]:
    """The export's serving queues as x-query-fuse-queues reports them."""
    return exp.stats()["uring-queues" if exp.uring is not None else "queues"]


def _plans(exp) -> set[int | None]:
    return {KINDS.get(q["fast-path"]) for q in _queues(exp)}


def _totals(exp) -> dict[str, int]:
    st = exp.stats()
    if exp.uring is not None:
        return uring_totals(st)
    keys = ("bytes-read", "bytes-written", "in-flight")
    return {k: sum(q[k] for q in st["queues"]) for k in keys}


def _graph_add(userver: UringServer, spec: dict):
    return userver.run(userver.daemon.graph.add(spec))


def _file(image: Path, **opts) -> dict:
    return {"driver": "file", "filename": str(image), **opts}


AIO = {"io_uring": fastpath.URING, "threads": fastpath.THREADS}


def _expected_plan(aio: str, uring: bool) -> int:
    """FUSE-over-io_uring queues do a file's I/O on their ring whatever its aio mode."""
    return fastpath.URING if uring else AIO[aio]


def test_plan_by_chain(userver: UringServer, tmp_path: Path):
    ring = userver.node(userver.image(MiB), aio="io_uring")
    pool = userver.node(userver.image(MiB, name="b.raw"))  # aio=threads
    slow = _graph_add(
        userver, {"driver": "null-co", "node-name": "lat", "size": MiB, "latency-ns": 1000}
    )
    e1 = userver.export(ring, tmp_path / "m1", writable=True, io_uring=True)
    e2 = userver.export(pool, tmp_path / "m2", writable=True, io_uring=True)
    e3 = userver.export(slow, tmp_path / "m3", writable=True, io_uring=True)
    e4 = userver.export(pool, tmp_path / "m4", writable=True, io_uring=False)
    assert _plans(e1) == {fastpath.URING}
    assert _plans(e2) == {fastpath.URING}  # aio=threads, yet the queue's ring does the I/O
    assert _plans(e3) == {None}
    assert _plans(e4) == {fastpath.THREADS}  # /dev/fuse keeps the pool
    assert len(pread_direct(tmp_path / "m3", 0, 4096)) == 4096  # the engine path serves it


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
@pytest.mark.parametrize("aio", AIO)
def test_fio_verify_direct_file(userver: UringServer, tmp_path: Path, aio: str, uring: bool):
    img = userver.image(32 * MiB)
    node = userver.node(img, aio=aio, cache={"direct": True})
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=uring)
    assert _plans(exp) == {_expected_plan(aio, uring)}
    out = run_fio(mnt, *FIO_VERIFY_32M, "--group_reporting")
    assert out.returncode == 0, out.stdout + out.stderr
    totals = _totals(exp)
    assert totals["bytes-written"] >= 32 * MiB
    assert totals["bytes-read"] >= 32 * MiB
    assert totals["in-flight"] == 0
    if uring:  # reads went as a read SQE linked to their commit, none had to be redone
        queues = exp.stats()["uring-queues"]
        assert sum(q["linked-reads"] for q in queues) >= 32 * MiB // 4096
        assert sum(q["link-breaks"] for q in queues) == 0
    # what went through the ring is in the image
    off = 5 * MiB + 4096
    assert pread_direct(mnt, off, 65536) == img.read_bytes()[off : off + 65536]


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
@pytest.mark.parametrize("aio", AIO)
def test_raw_window(userver: UringServer, tmp_path: Path, aio: str, uring: bool):
    data = os.urandom(8 * MiB)
    img = userver.image(8 * MiB, data)
    spec = {"driver": "raw", "node-name": "w", "offset": MiB, "size": 2 * MiB}
    node = _graph_add(userver, {**spec, "file": _file(img, aio=aio)})
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=uring)
    assert _plans(exp) == {_expected_plan(aio, uring)}
    assert pread_direct(mnt, 0, 8192) == data[MiB : MiB + 8192]
    assert pread_direct(mnt, 2 * MiB - 4096, 65536) == data[3 * MiB - 4096 : 3 * MiB]  # EOF
    assert pread_direct(mnt, 2 * MiB, 4096) == b""
    new = os.urandom(8192)
    pwrite_direct(mnt, 4096, new)
    assert img.read_bytes()[MiB + 4096 : MiB + 4096 + 8192] == new
    # a write crossing the window's end is cut there; one past it writes nothing
    fd = os.open(mnt, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"z" * 8192, 2 * MiB - 4096) == 4096
        assert os.pwrite(fd, b"z" * 4096, 2 * MiB) == 0
    finally:
        os.close(fd)
    image = img.read_bytes()
    assert image[3 * MiB - 4096 : 3 * MiB] == b"z" * 4096
    assert image[3 * MiB : 3 * MiB + 4096] == data[3 * MiB : 3 * MiB + 4096]


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
@pytest.mark.parametrize("aio", AIO)
def test_unaligned_direct_falls_back(userver: UringServer, tmp_path: Path, aio: str, uring: bool):
    """O_DIRECT node, requests not aligned to its sectors: the node's bounce path serves."""
    data = os.urandom(2 * MiB)
    img = userver.image(2 * MiB, data)
    node = userver.node(img, aio=aio, cache={"direct": True})
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=uring)
    assert _plans(exp) == {_expected_plan(aio, uring)}
    fd = os.open(mnt, os.O_RDWR)  # no O_DIRECT here: FUSE passes the odd offsets through
    try:
        assert os.pread(fd, 300, 100) == data[100:400]
        assert os.pwrite(fd, b"q" * 777, 1000) == 777
        assert os.pread(fd, 4096, 0) == data[:1000] + b"q" * 777 + data[1777:4096]
    finally:
        os.close(fd)
    assert img.read_bytes()[1000:1777] == b"q" * 777


@pytest.mark.parametrize("aio", AIO)
def test_linked_read_short_at_file_end(userver: UringServer, tmp_path: Path, aio: str):
    """A file of 1000 bytes is a 1024-byte node (whole sectors, as QEMU): the linked read of
    the last sector comes up short, the kernel cancels the commit linked to it, and the
    read is redone and zero-filled before the reply; the next reads link again."""
    data = os.urandom(1000)
    img = userver.image(1000, data)
    node = userver.node(img, aio=aio)
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=True)
    assert pread_direct(mnt, 0, 4096) == data + bytes(24)
    assert pread_direct(mnt, 0, 512) == data[:512]  # whole: stays linked
    queues = exp.stats()["uring-queues"]
    assert sum(q["link-breaks"] for q in queues) == 1
    assert sum(q["linked-reads"] for q in queues) == 2
    assert sum(q["bytes-read"] for q in queues) == 1024 + 512
    assert sum(q["in-flight"] for q in queues) == 0


def test_growable_write_grows(userver: UringServer, tmp_path: Path):
    img = userver.image(MiB)
    node = userver.node(img, aio="io_uring")
    mnt = tmp_path / "mnt"
    userver.export(node, mnt, writable=True, growable=True, io_uring=True)
    tail = os.urandom(4096)
    pwrite_direct(mnt, 2 * MiB, tail)
    assert os.path.getsize(img) == 2 * MiB + 4096
    assert img.read_bytes()[2 * MiB :] == tail


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
@pytest.mark.parametrize("read_zeroes", [True, False])
def test_null_co_inline(userver: UringServer, tmp_path: Path, read_zeroes: bool, uring: bool):
    node = _graph_add(
        userver,
        {"driver": "null-co", "node-name": "z", "size": 4 * MiB, "read-zeroes": read_zeroes},
    )
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=uring)
    assert _plans(exp) == {fastpath.NULL}
    before = _totals(exp)
    for _ in range(8):  # leave data in the entries' payloads
        pwrite_direct(mnt, 0, b"\xee" * 65536)
    got = pread_direct(mnt, 0, 65536)
    assert len(got) == 65536
    if read_zeroes:
        assert got == bytes(65536)
    tail = pread_direct(mnt, 4 * MiB - 4096, 65536)  # short at EOF
    assert len(tail) == 4096
    if read_zeroes:
        assert tail == bytes(4096)
    after = _totals(exp)
    assert after["bytes-written"] - before["bytes-written"] == 8 * 65536
    assert after["bytes-read"] - before["bytes-read"] >= 65536 + 4096


# --- files held in memory (tmpfs): small requests are copied on the loop ----------------------
def _fs_type(path: Path) -> str:
    """The file system's name as coreutils' stat sees it (not our own probe)."""
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def _inline_max(exp) -> set[int]:
    return {q["inline-max"] for q in _queues(exp)}


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
def test_inline_only_for_files_in_memory(
    userver: UringServer, tmp_path: Path, tmpfs: Callable[[str], Path], uring: bool
):
    """A file on tmpfs gets small requests served inline, a file on the disk never does; the
    data moves either way."""
    shm = tmpfs("2M")
    data = os.urandom(MiB)
    on_disk = userver.node(userver.image(MiB, data), aio="io_uring", cache={"direct": True})
    in_memory = userver.node(userver.image(MiB, data, name="shm0/m.raw"), cache={"direct": True})
    e1 = userver.export(on_disk, tmp_path / "m1", writable=True, io_uring=uring)
    e2 = userver.export(in_memory, tmp_path / "m2", writable=True, io_uring=uring)
    assert _fs_type(shm) == "tmpfs"
    assert _inline_max(e1) == {0 if _fs_type(tmp_path) != "tmpfs" else fastpath.INLINE_MAX}
    assert _inline_max(e2) == {fastpath.INLINE_MAX}
    for mnt in (tmp_path / "m1", tmp_path / "m2"):
        assert pread_direct(mnt, 4096, 8192) == data[4096 : 4096 + 8192]
        new = os.urandom(65536)
        pwrite_direct(mnt, 65536, new)
        assert pread_direct(mnt, 65536, 65536) == new
    assert (shm / "m.raw").read_bytes()[65536 : 2 * 65536] == new


def test_inline_reads_skip_the_ring_big_ones_do_not(
    userver: UringServer, tmp_path: Path, tmpfs: Callable[[str], Path]
):
    """On tmpfs, fio's verified 4 KiB I/O is served inline (no read SQE is linked), while a
    request above INLINE_MAX still goes through the ring."""
    tmpfs("2M")
    img = userver.image(MiB + 512 * 1024, name="shm0/m.raw")
    node = userver.node(img, cache={"direct": True})
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=True)
    out = run_fio(
        mnt, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=1M", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    queues = exp.stats()["uring-queues"]
    assert sum(q["linked-reads"] for q in queues) == 0
    assert sum(q["bytes-read"] for q in queues) >= MiB
    big = fastpath.INLINE_MAX * 2
    assert pread_direct(mnt, 0, big) == img.read_bytes()[:big]
    queues = exp.stats()["uring-queues"]
    assert sum(q["linked-reads"] for q in queues) >= 1


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
def test_inline_read_short_at_file_end(
    userver: UringServer, tmp_path: Path, tmpfs: Callable[[str], Path], uring: bool
):
    """A 1000-byte file on tmpfs is a 1024-byte node: the inline read of the last sector
    stops at the file's end and the rest is zeroes."""
    tmpfs("2M")
    data = os.urandom(1000)
    node = userver.node(userver.image(1000, data, name="shm0/m.raw"))
    mnt = tmp_path / "mnt"
    userver.export(node, mnt, writable=True, io_uring=uring)
    assert pread_direct(mnt, 0, 4096) == data + bytes(24)


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "dev-fuse"])
def test_inline_write_to_full_tmpfs(
    userver: UringServer, tmp_path: Path, tmpfs: Callable[[str], Path], uring: bool
):
    """A sparse 8 MiB image on a 2 MiB tmpfs: writes past what fits fail with ENOSPC, what
    was written stays readable, and the export keeps serving."""
    tmpfs("2M")
    img = userver.image(8 * MiB, name="shm0/m.raw")
    node = userver.node(img)
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, writable=True, io_uring=uring)
    chunk = os.urandom(65536)
    written = 0
    with pytest.raises(OSError) as err:
        for off in range(0, 8 * MiB, len(chunk)):
            pwrite_direct(mnt, off, chunk)
            written = off + len(chunk)
    assert err.value.errno == errno.ENOSPC
    assert MiB <= written <= 2 * MiB
    assert pread_direct(mnt, written - len(chunk), len(chunk)) == chunk
    assert pread_direct(mnt, 6 * MiB, 4096) == bytes(4096)  # a hole: still served
    errors = exp.stats()["uring-queues" if uring else "queues"]
    assert sum(q["errors"] for q in errors) >= 1
    assert sum(q["in-flight"] for q in errors) == 0
