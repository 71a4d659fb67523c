"""AsyncRing on a real asyncio loop: awaitable file I/O, callbacks, eventfd wake-ups, batching."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qsd_py.uring import abi
from qsd_py.uring.aio import (
    AsyncRing,
    buffer_address,
    close_loop_ring,
    ring_for_loop,
    uring_unavailable_reason,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@pytest.fixture
async def aring() -> AsyncIterator[AsyncRing]:
    r = AsyncRing(entries=16)
    yield r
    r.close()


@pytest.fixture
def fd(tmp_path: Path):
    f = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(f, bytes(range(256)) * 256)  # 64 KiB
    yield f
    os.close(f)


def test_available() -> None:
    assert uring_unavailable_reason() is None


async def test_nop(aring: AsyncRing) -> None:
    assert await aring.nop() == 0
    assert aring.inflight == 0


async def test_read_into_memoryview_slice(aring: AsyncRing, fd: int) -> None:
    buf = bytearray(8192)
    n = await aring.read(fd, memoryview(buf)[100:4196], 1000)
    assert n == 4096
    assert buf[100:4196] == os.pread(fd, 4096, 1000)
    assert buf[:100] == bytes(100) and buf[4196:] == bytes(8192 - 4196)


async def test_read_at_eof_is_short(aring: AsyncRing, fd: int) -> None:
    buf = bytearray(4096)
    assert await aring.read(fd, buf, 65536 - 10) == 10
    assert await aring.read(fd, buf, 1 << 20) == 0


async def test_write_then_read_back(aring: AsyncRing, fd: int) -> None:
    data = os.urandom(12345)
    assert await aring.write(fd, data, 777) == len(data)  # bytes: a read-only buffer
    assert await aring.write(fd, memoryview(data)[5:10], 50000) == 5
    assert os.pread(fd, len(data), 777) == data
    assert os.pread(fd, 5, 50000) == data[5:10]


async def test_readv_writev(aring: AsyncRing, fd: int) -> None:
    parts = [b"a" * 3, bytearray(b"b" * 4096), memoryview(b"c" * 100)]
    assert await aring.writev(fd, parts, 4096) == 4199
    bufs = [bytearray(3), bytearray(4096), bytearray(100)]
    assert await aring.readv(fd, bufs, 4096) == 4199
    assert [bytes(b) for b in bufs] == [bytes(p) for p in parts]


async def test_readv_short_at_eof(aring: AsyncRing, fd: int) -> None:
    bufs = [bytearray(8), bytearray(8)]
    assert await aring.readv(fd, bufs, 65536 - 12) == 12
    assert bytes(bufs[0]) == bytes(range(244, 252))
    assert bytes(bufs[1][:4]) == bytes(range(252, 256))


async def test_fsync_and_fallocate(aring: AsyncRing, fd: int) -> None:
    await aring.fsync(fd)
    await aring.fsync(fd, datasync=True)
    await aring.fallocate(fd, 0, 0, 1 << 20)
    assert os.fstat(fd).st_size == 1 << 20
    await aring.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    assert os.pread(fd, 4096, 0) == bytes(4096)
    assert os.fstat(fd).st_size == 1 << 20


async def test_errors_raise_oserror_with_errno(aring: AsyncRing, fd: int, tmp_path: Path) -> None:
    with pytest.raises(OSError) as e:
        await aring.read(12345, bytearray(10), 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        await aring.fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)  # punch needs KEEP_SIZE
    assert e.value.errno == errno.EOPNOTSUPP
    ro = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            await aring.write(ro, b"x", 0)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(ro)
    with pytest.raises(TypeError):
        await aring.read(fd, b"read-only", 0)
    assert aring.inflight == 0


async def test_uring_cmd_callback_gets_eopnotsupp(aring: AsyncRing, fd: int) -> None:
    got = asyncio.get_running_loop().create_future()
    off = aring.submit_uring_cmd(fd, 1, None, 0, 0, got.set_result)
    aring.ring.sqes[off : off + 24] = bytes(24)
    assert await asyncio.wait_for(got, 5) == -errno.EOPNOTSUPP


async def test_eventfd_wakes_loop_for_async_completion(aring: AsyncRing) -> None:
    """A pipe read completes only when another thread writes: only the eventfd can wake us."""
    r, w = os.pipe()
    try:
        buf = bytearray(5)
        task = asyncio.ensure_future(aring.read(r, buf, abi.OFF_CURRENT))
        await asyncio.sleep(0.05)
        assert not task.done()
        wakeups = aring.stats["wakeups"]
        threading.Timer(0.05, os.write, (w, b"hello")).start()
        assert await asyncio.wait_for(task, 5) == 5
        assert buf == b"hello"
        assert aring.stats["wakeups"] > wakeups
    finally:
        os.close(r)
        os.close(w)


async def test_out_of_order_completion(aring: AsyncRing) -> None:
    """Requests complete in the order the data arrives, not the order they were made."""
    pipes = [os.pipe() for _ in range(20)]
    try:
        order: list[int] = []

        async def one(i: int) -> None:
            buf = bytearray(1)
            await aring.read(pipes[i][0], buf, abi.OFF_CURRENT)
            assert buf[0] == i
            order.append(i)

        tasks = [asyncio.ensure_future(one(i)) for i in range(20)]
        await asyncio.sleep(0.02)
        for i in reversed(range(20)):
            os.write(pipes[i][1], bytes([i]))
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert order == list(reversed(range(20)))
    finally:
        for a, b in pipes:
            os.close(a)
            os.close(b)


async def test_many_concurrent_ops_more_than_sq_and_cq(aring: AsyncRing, fd: int) -> None:
    n = 1000  # SQ has 16 entries, CQ 64 and the slot table starts at 64
    bufs = [bytearray(64) for _ in range(n)]
    results = await asyncio.gather(*[aring.read(fd, bufs[i], i * 64) for i in range(n)])
    assert results == [64] * n
    whole = os.pread(fd, n * 64, 0)
    assert b"".join(bufs) == whole
    assert aring.inflight == 0


async def test_submissions_are_batched_per_loop_turn(aring: AsyncRing) -> None:
    before = aring.stats["submit_calls"]
    await asyncio.gather(*[aring.nop() for _ in range(10)])
    assert aring.stats["submit_calls"] - before == 1


async def test_claimed_flush_submits_in_the_callers_turn(aring: AsyncRing, fd: int) -> None:
    """SQEs queued under claim_flush go out at release_flush, without a scheduled flush;
    a callback's after_dispatch work runs right after that dispatch, not a loop turn later."""
    order: list[str] = []

    def cb(res: int) -> None:
        order.append(f"cqe {res}")
        assert aring.after_dispatch(lambda: order.append("after"))

    assert aring.claim_flush()
    before = aring.stats["submit_calls"]
    buf = bytearray(4096)
    aring.submit_rw(abi.OP_READ, fd, buffer_address(buf, True), 4096, 0, cb)
    assert not aring.claim_flush()  # one claim (or scheduled flush) at a time
    while not order:
        aring.release_flush()  # the read may need a second enter to complete
        assert aring.stats["submit_calls"] > before
        if not order:
            await asyncio.sleep(0.01)
            assert aring.claim_flush() or order
    assert order == ["cqe 4096", "after"]
    assert buf == os.pread(fd, 4096, 0)
    assert not aring.after_dispatch(lambda: None)  # outside a dispatch: refused
    calls = aring.stats["submit_calls"]
    assert aring.claim_flush()
    aring.release_flush()  # nothing queued, nothing done: no system call
    assert aring.stats["submit_calls"] == calls


async def test_callbacks_dispatch_by_slot(aring: AsyncRing, fd: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    seen: dict[int, int] = {}

    def make(i: int):
        def cb(res: int) -> None:
            seen[i] = res
            if len(seen) == 50:
                done.set_result(None)

        return cb

    for i in range(50):
        aring.submit_rw(abi.OP_NOP if i % 2 else abi.OP_FSYNC, fd, 0, 0, 0, make(i))
    await asyncio.wait_for(done, 5)
    assert seen == {i: 0 for i in range(50)}


async def test_close_cancels_inflight(fd: int) -> None:
    r, w = os.pipe()
    ring = AsyncRing(entries=8)
    try:
        cb_res: list[int] = []
        one = bytearray(1)
        ring.submit_rw(abi.OP_READ, r, buffer_address(one), 1, abi.OFF_CURRENT, cb_res.append)
        task = asyncio.ensure_future(ring.read(r, bytearray(4), abi.OFF_CURRENT))
        await asyncio.sleep(0.05)
        assert ring.inflight == 2
        ring.close()
        with pytest.raises(OSError) as e:
            await task
        assert e.value.errno in (errno.ECANCELED, errno.EINTR)
        assert cb_res and cb_res[0] in (-errno.ECANCELED, -errno.EINTR)
        with pytest.raises(OSError):
            await ring.nop()
    finally:
        os.close(r)
        os.close(w)


async def test_ring_for_loop_is_per_loop() -> None:
    a = ring_for_loop()
    assert ring_for_loop() is a
    other: list[AsyncRing] = []

    async def in_thread() -> None:
        ring = ring_for_loop()
        other.append(ring)
        assert await ring.nop() == 0
        close_loop_ring()
        assert ring.closed

    t = threading.Thread(target=asyncio.run, args=(in_thread(),))
    t.start()
    t.join(10)
    assert other and other[0] is not a
    close_loop_ring()
    assert a.closed and ring_for_loop() is not a
    close_loop_ring()


async def test_close_releases_fds() -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    AsyncRing(entries=4).close()
    before = fds()
    for _ in range(200):
        r = AsyncRing(entries=8)
        await r.nop()
        r.close()
    assert fds() == before


def _prebuilt_read(fd: int, addr: int, length: int, user_data: int) -> bytes:
    """A whole IORING_OP_READ SQE (read at the current position) carrying ``user_data``."""
    return abi.SQE.pack(
        abi.OP_READ, 0, 0, fd, abi.OFF_CURRENT, addr, length, 0, user_data, 0, 0, 0, 0, 0
    )


async def test_pinned_request_resubmitted_from_a_prebuilt_sqe(aring: AsyncRing) -> None:
    """One pinned user_data carries a request again and again from one prebuilt SQE; its
    callback runs at each completion, and close() ends one still in the kernel."""
    r, w = os.pipe()
    buf = bytearray(4)
    got: list[int] = []
    ud = aring.pin(got.append)
    sqe = _prebuilt_read(r, buffer_address(buf, True), 4, ud)
    try:
        for word in (b"one!", b"two!"):
            os.write(w, word)
            aring.submit_prebuilt(sqe, ud)
            for _ in range(100):
                await asyncio.sleep(0.005)
                if len(got) == (1 if word == b"one!" else 2):
                    break
            assert buf == word
        assert got == [4, 4]
        assert aring.inflight == 0
        aring.submit_prebuilt(sqe, ud)  # nothing to read: stays in the kernel
        await asyncio.sleep(0.02)
        assert aring.inflight == 1 and got == [4, 4]
        aring.close()
        assert got == [4, 4, -errno.ECANCELED]
        other = AsyncRing(entries=4)
        try:  # an unpinned user_data is handed out again
            first = other.pin(got.append)
            other.unpin(first)
            assert other.pin(got.append) == first
        finally:
            other.close()
    finally:
        os.close(r)
        os.close(w)


async def test_link_rw_starts_the_next_request_only_after_a_full_transfer(
    aring: AsyncRing, tmp_path: Path
) -> None:
    """A linked read reports to its pinned callback; the SQE queued after it runs only once
    the read moved every byte asked for, and completes -ECANCELED after a short one."""
    path = tmp_path / "short"
    path.write_bytes(b"x" * 1000)
    f = os.open(path, os.O_RDONLY)
    buf = bytearray(4096)
    reads: list[int] = []
    ud = aring.pin(reads.append)
    try:
        for length, then in ((512, 0), (4096, -errno.ECANCELED)):
            nxt = asyncio.get_running_loop().create_future()
            aring.link_rw(abi.OP_READ, f, buffer_address(buf, True), length, 0, ud)
            aring.submit_rw(abi.OP_NOP, -1, 0, 0, 0, nxt.set_result)
            assert await asyncio.wait_for(nxt, 5) == then
        assert reads == [512, 1000]
        assert buf[:1000] == b"x" * 1000
        assert aring.inflight == 0
    finally:
        os.close(f)


async def test_polling_gives_way_to_another_threads_ring(aring: AsyncRing) -> None:
    """A spinning ring holds the GIL: it stops as soon as another thread's polling ring has
    completions waiting (that thread cannot take them while the spin goes on), and it still
    catches its own completions while the other has none."""
    from qsd_py.objects.iothread import IOThread

    async def make_ring() -> AsyncRing:
        ring = AsyncRing(entries=16)
        ring.enable_polling(1_000_000)
        return ring

    thread = IOThread("poll-peer")
    try:
        peer = await thread.run(make_ring())
        aring.enable_polling(2_000_000_000)  # a 2 s budget: only a completion ends it early
        waiting = 0
        asked: list[int] = []

        def peer_ready() -> int:
            asked.append(waiting)
            return waiting

        peer.ring.cq_ready = peer_ready  # type: ignore[method-assign]
        waiting = 1  # as if the peer's thread were held up with a CQE in its ring
        assert aring._poll() is False
        assert asked == [1] and aring.stats["polled"] == 0
        waiting = 0
        aring.ring.prep_nop(7)  # a completion of its own: the spin catches it
        aring.ring.submit()
        assert aring._poll() is True
        assert aring.stats["polled"] == 1
        aring.ring.reap(lambda *_: None)
    finally:
        thread.stop()
