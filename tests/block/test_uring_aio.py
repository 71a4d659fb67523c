"""aio=io_uring: the file driver through real io_uring rings, on real files.

Checks that requests really go through the awaiting loop's ring (its completion counter moves),
that iothreads use their own ring and close it when they stop, the callback fast path, error
mapping, fd hygiene, and the QEMU error when the kernel refuses io_uring (a subprocess with a
seccomp filter, not a mock).
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import extent, skip_or_fail

from qsd_py.block import aio
from qsd_py.block.drivers.file import FileNode
from qsd_py.block.graph import BlockGraph
from qsd_py.block.uring_aio import UNAVAILABLE, IoUringBackend, UringTransfer
from qsd_py.objects.iothread import IOThread
from qsd_py.uring.aio import AsyncRing, buffer_address, close_loop_ring, ring_for_loop
from qsd_py.uring.ring import check_available

MiB = 1 << 20


@pytest.fixture(autouse=True)
async def _uring() -> AsyncIterator[None]:
    """Skip only when the kernel truly lacks io_uring; close this test loop's ring after."""
    reason = check_available()
    if reason is not None:
        skip_or_fail(reason)
    try:
        yield
    finally:
        close_loop_ring()


def backend() -> IoUringBackend:
    b = aio.get_backend("io_uring")
    assert isinstance(b, IoUringBackend)
    return b


async def add_file(graph: BlockGraph, path: Path, name: str = "f0", **extra: Any) -> FileNode:
    opts = {"driver": "file", "node-name": name, "filename": str(path), "aio": "io_uring"}
    node = await graph.add(opts | extra)
    assert isinstance(node, FileNode)
    assert node.backend is backend()
    return node


def completions() -> int:
    return ring_for_loop().stats["completions"]


# --- the IOBackend on real files ------------------------------------------------------------
async def test_read_write_flush_go_through_the_ring(graph: BlockGraph, image) -> None:
    path = image(MiB)
    node = await add_file(graph, path)
    before = completions()
    payload = os.urandom(100_000)
    await node.write(12345, payload)
    await node.flush()
    assert path.read_bytes()[12345 : 12345 + len(payload)] == payload
    backing = bytearray(b"?" * (len(payload) + 20))
    view = memoryview(backing)[5:-5]  # read in place into a slice of the caller's buffer
    await node.read(12340, view)
    assert backing[:5] == b"?????" and backing[-5:] == b"?????"
    assert view[:5] == bytes(5) and view[5:-5] == payload
    assert completions() - before >= 3  # write, fdatasync, read: all SQEs


async def test_read_past_eof_reads_zeroes(graph: BlockGraph, image) -> None:
    path = image(4096, data=b"x" * 4096)
    node = await add_file(graph, path)
    buf = bytearray(b"?" * 100)
    await node.read(4096 - 10, memoryview(buf))
    assert buf == b"x" * 10 + bytes(90)


async def test_write_zeroes_block_status_truncate(graph: BlockGraph, image) -> None:
    path = image(4 * MiB)
    node = await add_file(graph, path, discard="unmap")
    await node.write(MiB, b"d" * (2 * MiB))
    is_data, n = extent(await node.block_status(MiB, 2 * MiB))
    assert is_data and n == 2 * MiB
    before = completions()
    await node.write_zeroes(MiB, MiB, unmap=True)  # PUNCH_HOLE through IORING_OP_FALLOCATE
    await node.write_zeroes(2 * MiB + 100, 1000)  # ZERO_RANGE (data stays allocated)
    assert completions() - before == 2
    assert extent(await node.block_status(0, 4 * MiB)) == (False, 2 * MiB)
    data = path.read_bytes()
    assert data[MiB : 2 * MiB] == bytes(MiB)
    assert data[2 * MiB : 2 * MiB + 100] == b"d" * 100
    assert data[2 * MiB + 100 : 2 * MiB + 1100] == bytes(1000)
    assert data[2 * MiB + 1100 : 3 * MiB] == b"d" * (MiB - 1100)
    await node.truncate(5 * MiB + 7)
    assert path.stat().st_size == 5 * MiB + 7
    assert node.length() == 5 * MiB + 512  # whole sectors
    await node.truncate(MiB)
    assert path.stat().st_size == MiB


async def test_direct_io_unaligned_requests(graph: BlockGraph, image) -> None:
    path = image(MiB + 1000)
    node = await add_file(graph, path, cache={"direct": True})
    assert node.align >= 512
    ref = bytearray(MiB + 1000)
    for offset, length in [(0, 4096), (1, 10), (511, 514), (4000, 70000), (MiB + 900, 100)]:
        data = os.urandom(length)
        await node.write(offset, data)
        ref[offset : offset + length] = data
    odd = memoryview(bytearray(8193))[1:]  # an odd address: bounced through the pool
    await node.read(0, odd)
    assert odd == ref[:8192]
    with mmap.mmap(-1, 65536) as m:  # aligned in every way: an O_DIRECT SQE
        before = completions()
        view = memoryview(m)
        try:
            await node.read(8192, view)
            assert view == ref[8192 : 8192 + 65536]
            view[:] = os.urandom(65536)
            await node.write(65536, view)
            ref[65536 : 2 * 65536] = view
        finally:
            view.release()
        assert completions() - before == 2
    assert path.stat().st_size == MiB + 1000
    assert path.read_bytes() == ref


# --- loops and threads -------------------------------------------------------------------------
async def test_iothread_uses_its_own_ring_and_closes_it(graph: BlockGraph, image) -> None:
    path = image(MiB)
    node = await add_file(graph, path)
    main_ring = ring_for_loop()
    thread = IOThread("io0")
    try:

        async def on_iothread() -> tuple[AsyncRing, bytes, int]:
            await node.write(4096, b"from the iothread")
            buf = bytearray(17)
            await node.read(4096, memoryview(buf))
            await node.flush()
            ring = backend().ring()
            assert ring is not None
            return ring, bytes(buf), ring.stats["completions"]

        ring, data, done = await thread.run(on_iothread())
        assert ring is not main_ring and ring.loop is thread.loop
        assert data == b"from the iothread" and done >= 3
        assert path.read_bytes()[4096 : 4096 + 17] == data
    finally:
        thread.stop()
    assert ring.closed  # IOThread.stop closed it on its own thread
    assert not main_ring.closed


async def test_many_concurrent_requests(graph: BlockGraph, image) -> None:
    count = 1500  # more than the ring's SQ (256) and its initial slots (1024)
    path = image(count * 4096)
    node = await add_file(graph, path)
    blocks = [bytes([i % 251]) * 4096 for i in range(count)]
    await asyncio.gather(*(node.write(i * 4096, b) for i, b in enumerate(blocks)))
    assert path.read_bytes() == b"".join(blocks)
    bufs = [bytearray(4096) for _ in range(count)]
    order = list(range(count))[::-1]
    await asyncio.gather(*(node.read(i * 4096, memoryview(bufs[i])) for i in order))
    assert bufs == [bytearray(b) for b in blocks]
    assert ring_for_loop().inflight == 0


# --- errors and fds ----------------------------------------------------------------------------
async def test_errors_carry_errno(graph: BlockGraph, image) -> None:
    path = image(MiB)
    node = await add_file(graph, path)
    fd = node.fd
    await graph.delete("f0")
    buf = memoryview(bytearray(4096))
    with pytest.raises(OSError) as exc:
        await node.read(0, buf)  # closed node: fd -1
    assert exc.value.errno == errno.EBADF
    assert exc.value.strerror == os.strerror(errno.EBADF)
    with pytest.raises(OSError) as exc:
        await backend().read(fd, buf, 0)  # the old fd number, now closed
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        await backend().fdatasync(fd)
    assert exc.value.errno == errno.EBADF
    ro = await add_file(graph, path, "ro", **{"read-only": True})
    with pytest.raises(OSError) as exc:
        await backend().write(ro.fd, memoryview(b"x"), 0)  # O_RDONLY fd
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        await backend().fallocate(ro.fd, aio.FALLOC_FL_ZERO_RANGE, 0, 4096)
    assert exc.value.errno == errno.EBADF


async def test_no_fd_leak_over_open_close_cycles(graph: BlockGraph, image) -> None:
    path = image(MiB)
    ring_for_loop()  # the loop's ring is made once, before counting
    before = sorted(os.listdir("/proc/self/fd"))
    for i in range(100):
        node = await add_file(graph, path, f"n{i}")
        await node.write(i * 512, b"z" * 512)
        await node.read(0, memoryview(bytearray(512)))
        await graph.delete(f"n{i}")
    assert sorted(os.listdir("/proc/self/fd")) == before


# --- the callback fast path --------------------------------------------------------------------
async def test_submit_read_write_callbacks(graph: BlockGraph, image) -> None:
    path = image(8192, data=b"a" * 8192)
    node = await add_file(graph, path)
    results: list[int] = []
    finished = asyncio.Event()

    def done(res: int) -> None:
        results.append(res)
        if len(results) == 3:
            finished.set()

    b = backend()
    b.submit_write(node.fd, memoryview(b"hello"), 100, done)
    buf = bytearray(b"?" * 50)
    b.submit_read(node.fd, memoryview(buf), 8192 - 20, done)  # crosses EOF
    b.submit_read(-1, memoryview(bytearray(10)), 0, done)
    assert results == []  # never called synchronously
    await asyncio.wait_for(finished.wait(), 5)
    assert sorted(results) == sorted([5, 20, -errno.EBADF])
    assert buf == b"a" * 20 + bytes(30)
    assert path.read_bytes()[100:105] == b"hello"


async def test_reusable_transfer_allocates_per_slot_not_per_request(image) -> None:
    path = image(64 * 4096, data=b"".join(bytes([i]) * 4096 for i in range(64)))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        page = bytearray(4096)
        addr = buffer_address(page, True)
        seen: list[int] = []
        finished = asyncio.get_running_loop().create_future()

        def on_done(res: int) -> None:  # chains the next read from the completion
            assert res == 4096
            seen.append(page[0])
            if len(seen) == 64:
                finished.set_result(None)
            else:
                t.read(fd, addr, 4096, len(seen) * 4096)

        t = backend().transfer(on_done)
        assert isinstance(t, UringTransfer)
        t.read(fd, addr, 4096, 0)
        await asyncio.wait_for(finished, 5)
        assert seen == list(range(64))
    finally:
        os.close(fd)


# --- shutdown and unusable io_uring ------------------------------------------------------------
async def test_daemon_close_closes_main_ring(image) -> None:
    from qsd_py.daemon import Daemon
    from qsd_py.export.registry import ExportRegistry
    from qsd_py.jobs.registry import JobRegistry
    from qsd_py.objects.registry import ObjectRegistry
    from qsd_py.qmp.char_registry import ChardevRegistry

    # Only the state close() touches (Daemon() also loads every QMP handler module).
    daemon = Daemon.__new__(Daemon)
    daemon.graph = BlockGraph()
    daemon.exports = ExportRegistry(daemon)
    daemon.jobs = JobRegistry(lambda name, data: None)
    daemon.objects = ObjectRegistry()
    daemon.chardevs = ChardevRegistry(daemon.objects)
    daemon.closers = []
    daemon.nbd_server = None
    node = await add_file(daemon.graph, image(MiB), "d0")
    await node.write(0, b"q" * 512)
    ring = ring_for_loop()
    await daemon.close()
    assert ring.closed and len(daemon.graph) == 0


_SECCOMP_NO_URING = textwrap.dedent(
    """
    import ctypes, struct

    def forbid_io_uring_setup(err):
        # seccomp: io_uring_setup (425 on every architecture) fails with ``err``; threads
        # started afterwards inherit the filter.
        ins = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
        prog = (ins(0x20, 0) + ins(0x15, 425, 0, 1) + ins(0x06, 0x00050000 | err)
                + ins(0x06, 0x7FFF0000))
        buf = ctypes.create_string_buffer(prog)
        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
    """
)


def run_script(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (after the seccomp helper) in a fresh interpreter; its last stdout line
    is JSON."""
    script = _SECCOMP_NO_URING + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc


_OPEN_FAILS = """
    import asyncio, json, os, sys
    from qsd_py.block.graph import BlockGraph
    from qsd_py.errors import QMPError

    forbid_io_uring_setup(int(sys.argv[2]))

    async def main():
        graph = BlockGraph()
        before = sorted(os.listdir("/proc/self/fd"))
        args = {"driver": "file", "node-name": "u", "filename": sys.argv[1], "aio": "io_uring"}
        try:
            await graph.add(args)
            desc = None
        except QMPError as e:
            desc = e.desc
        after = sorted(os.listdir("/proc/self/fd"))
        node = await graph.add(args | {"aio": "threads"})  # the same file still opens
        await node.write(0, b"ok")
        await graph.close_all()
        print(json.dumps({"desc": desc, "leaked": len(after) - len(before), "nodes": len(graph)}))

    asyncio.run(main())
"""


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_unusable_io_uring_fails_blockdev_add(image, err: int) -> None:
    proc = run_script(_OPEN_FAILS, str(image(MiB)), str(err))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"desc": UNAVAILABLE, "leaked": 0, "nodes": 0}
    # The precise cause goes to the log (stderr).
    causes = ("not permitted", "io_uring_disabled") if err == errno.EPERM else ("kernel lacks",)
    assert any(c in proc.stderr for c in causes), proc.stderr


_IOTHREAD_FALLS_BACK = """
    import asyncio, errno, json, sys
    from qsd_py.block.graph import BlockGraph
    from qsd_py.objects.iothread import IOThread

    async def main():
        graph = BlockGraph()
        args = {"driver": "file", "node-name": "u", "filename": sys.argv[1], "aio": "io_uring"}
        node = await graph.add(args)  # the main loop's ring is made here
        forbid_io_uring_setup(errno.EPERM)
        thread = IOThread("io0")  # inherits the filter: its loop gets no ring

        async def io():
            await node.write(512, b"pool")
            buf = bytearray(4)
            await node.read(512, memoryview(buf))
            await node.flush()
            await node.write_zeroes(0, 512)
            return bytes(buf), node.backend.ring() is None

        data, fell_back = await thread.run(io())
        thread.stop()
        await node.write(1024, b"main")  # the main loop keeps its ring
        main_ring = node.backend.ring() is not None
        await graph.close_all()
        print(json.dumps({"data": data.decode(), "fell_back": fell_back, "main": main_ring}))

    asyncio.run(main())
"""


def test_loop_without_ring_falls_back_to_thread_pool(image) -> None:
    path = image(MiB, data=b"x" * 2048)
    proc = run_script(_IOTHREAD_FALLS_BACK, str(path))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"data": "pool", "fell_back": True, "main": True}
    assert "falling back to thread pool" in proc.stderr
    data = path.read_bytes()
    assert data[:512] == bytes(512) and data[512:516] == b"pool" and data[1024:1028] == b"main"


# --- short transfers ---------------------------------------------------------------------------
async def test_short_reads_are_continued() -> None:
    r, w = os.pipe()  # a pipe hands out what is there: the first completion is short
    try:
        buf = bytearray(b"?" * 10)
        task = asyncio.ensure_future(backend().read(r, memoryview(buf), 0))
        await asyncio.sleep(0.05)
        os.write(w, b"abcd")
        await asyncio.sleep(0.05)
        assert not task.done()  # 4 of 10 bytes: the read was resubmitted for the rest
        os.write(w, b"efghij")
        await asyncio.wait_for(task, 5)
        assert buf == b"abcdefghij"
        os.close(w)
        w = -1
        await backend().read(r, memoryview(buf), 0)  # EOF at once: all zeroes
        assert buf == bytes(10)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


_SHORT_WRITE = """
    import asyncio, json, os, resource, signal, sys
    from qsd_py.block import aio

    async def main():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10000, resource.RLIM_INFINITY))
        fd = os.open(sys.argv[1], os.O_RDWR)
        try:
            await aio.get_backend("io_uring").write(fd, memoryview(b"w" * 16384), 0)
            err = None
        except OSError as e:
            err = e.errno
        print(json.dumps({"errno": err, "size": os.fstat(fd).st_size}))

    asyncio.run(main())
"""


def test_short_write_is_continued_then_fails_with_errno(image) -> None:
    path = image(0)
    proc = run_script(_SHORT_WRITE, str(path))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The first SQE wrote up to the 10000-byte limit; the continuation got EFBIG.
    assert out == {"errno": errno.EFBIG, "size": 10000}
    assert path.read_bytes() == b"w" * 10000
