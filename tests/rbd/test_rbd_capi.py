"""The ctypes layer over librados/librbd (qsd_py/block/rbd/capi.py) on the session's
cluster: librbd.h's constants as Ceph's own binding has them, writes from every kind of
buffer the nodes above hand down, a cancelled read that librbd still owns, and requests of
two loops (an iothread's and the main one) on one image at once."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import threading
from collections.abc import Iterator

import pytest

from qsd_py.block.rbd import capi

MiB = 1 << 20


@pytest.fixture
def opened(ceph) -> Iterator[tuple[str, capi.Image]]:
    """A fresh 1 MiB image of 0x11 bytes, opened through the C API."""
    name = ceph.import_image(b"\x11" * MiB)
    cluster = capi.Cluster(None)
    cluster.conf_read_file(str(ceph.conf))
    cluster.connect()
    ioctx = cluster.open_ioctx("rbd")
    image = capi.Image(ioctx, name, None, False)
    try:
        yield name, image
    finally:
        image.close()
        ioctx.close()
        cluster.shutdown()


def test_constants_are_the_bindings(tmp_path) -> None:
    """Asked of Debian's /usr/bin/python3 (here ``rbd`` is this test package)."""
    names = ("FEATURE_FAST_DIFF", "FLAG_FAST_DIFF_INVALID", "WRITE_ZEROES_FLAG_THICK_PROVISION")
    code = f"import rbd; print([getattr(rbd, 'RBD_' + n) for n in {names!r}])"
    out = subprocess.run(
        ["/usr/bin/python3", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str([getattr(capi, n) for n in names])


def test_writes_from_every_kind_of_buffer(ceph, opened) -> None:
    """bytes as they are, a read-only view (copied), a view into the middle of a bytearray
    (in place): each lands at its offset, with its own bytes."""
    name, image = opened
    backing = bytearray(b"\x00" * 100 + b"\x44" * 4096 + b"\x00" * 100)
    writes = [
        (0, b"\x22" * 4096),
        (8192, memoryview(b"\x00" + b"\x33" * 4096)[1:]),
        (16384, memoryview(backing)[100:4196]),
    ]

    async def run() -> None:
        for offset, data in writes:
            addr, keep = capi.buffer_address(data)
            n = len(data)
            assert await image.io(image.lib.rbd_aio_write, offset, n, addr, keep=keep) == 0
        assert await image.io(image.lib.rbd_aio_flush) == 0

    asyncio.run(run())
    got = ceph.export(name)
    assert got[:4096] == b"\x22" * 4096
    assert got[4096:8192] == b"\x11" * 4096
    assert got[8192:12288] == b"\x33" * 4096
    assert got[16384:20480] == b"\x44" * 4096
    assert got[20480:] == b"\x11" * (MiB - 20480)


def test_cancelled_read_still_waits_for_librbd(opened) -> None:
    """librbd writes into the caller's buffer until the request completes, so a waiter
    cancelled in flight returns only after that: the buffer is final and nothing is left
    pending."""
    _name, image = opened
    buf = bytearray(64 * 1024)

    async def run() -> None:
        addr, keep = capi.buffer_address(buf)
        task = asyncio.ensure_future(image.io(image.lib.rbd_aio_read, 0, len(buf), addr, keep=keep))
        await asyncio.sleep(0)  # submitted, not completed
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert image._pending == {}
        assert bytes(buf) == b"\x11" * len(buf)

    asyncio.run(run())


def test_two_loops_share_the_image(opened) -> None:
    """The loop that did I/O first watches the event socket; the other loop's requests,
    in flight at the same time, are handed over to it and all complete with their data."""
    _name, image = opened
    lib = image.lib

    async def reads(count: int) -> list[bytes]:
        async def one(i: int) -> bytes:
            buf = bytearray(4096)
            addr, keep = capi.buffer_address(buf)
            assert await image.io(lib.rbd_aio_read, (i % 256) * 4096, 4096, addr, keep=keep) == 4096
            return bytes(buf)

        return await asyncio.gather(*(one(i) for i in range(count)))

    async def first() -> None:
        await reads(1)  # this thread's loop now watches the event socket
        started.set()
        results["thread"] = await reads(200)

    results: dict[str, list[bytes]] = {}
    started = threading.Event()
    other = threading.Thread(target=lambda: asyncio.run(first()))
    other.start()
    assert started.wait(30)
    results["main"] = asyncio.run(reads(200))
    other.join(60)
    assert not other.is_alive()
    for key in ("thread", "main"):
        assert results[key] == [b"\x11" * 4096] * 200
    assert image._pending == {}


def test_transfers_call_back_without_a_task(ceph) -> None:
    """The exports' fast road (capi.Transfer): a write reports all its bytes, a read
    across the image's end (an image of 1 MiB + 100 bytes) reports the whole length with
    the bytes past the end zeroed, and a read at a place librbd refuses reports -errno;
    each through the callback on the loop that made the transfer."""
    name = ceph.import_image(b"\x22" * (MiB + 100))
    cluster = capi.Cluster(None)
    cluster.conf_read_file(str(ceph.conf))
    cluster.connect()
    ioctx = cluster.open_ioctx("rbd")
    image = capi.Image(ioctx, name, None, False)
    buf = ctypes.create_string_buffer(b"\x33" * 4096, 4096)
    addr = ctypes.addressof(buf)

    async def one(start: str, offset: int) -> int:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        xfer = image.transfer(done.set_result)
        getattr(xfer, start)(-1, addr, 4096, offset)
        return await done

    async def run() -> list[int]:
        wrote = await one("write", 8192)
        ctypes.memset(addr, 0x44, 4096)
        read_back = await one("read", 8192)
        assert buf.raw == b"\x33" * 4096
        tail = await one("read", MiB)
        assert buf.raw == b"\x22" * 100 + bytes(4096 - 100)
        beyond = await one("read", 4 * MiB)
        return [wrote, read_back, tail, beyond]

    try:
        got = asyncio.run(run())
    finally:
        image.close()
        ioctx.close()
        cluster.shutdown()
    assert got[:3] == [4096, 4096, 4096] and got[3] < 0
    assert ceph.export(name)[8192 : 8192 + 4096] == b"\x33" * 4096
