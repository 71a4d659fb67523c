"""Queue worker processes (FUSE-over-io_uring without an iothread list): one per CPU, bound
to it; they see the node's length change however it changes, answer every request the
daemon's engine answers, die with the daemon, and one that dies takes the connection with it
instead of leaving its queue hanging."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from support import fuse_mounts_under, raw_image
from uring_support import UringServer, aligned, pread_direct, pwrite_direct

MiB = 1 << 20
KiB = 1 << 10


def _workers(stats: dict) -> dict[int, int]:
    """qid -> the pid of the worker serving it (x-query-fuse-queues' thread-id)."""
    return {q["qid"]: q["thread-id"] for q in stats["uring-queues"]}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers still alive: {pids}"
        time.sleep(0.02)


def _pread_fd(fd: int, offset: int, size: int = 4096) -> bytes:
    buf = aligned(size)
    n = os.preadv(fd, [memoryview(buf)[:size]], offset)
    return bytes(buf[:n])


@pytest.mark.parametrize("values", [(1 << 30,), (1 << 30, (1 << 40) - 512)])
def test_shared_length_is_never_seen_half_written(values: tuple[int, ...]):
    """A forked process publishes the length over and over (the same one, as the daemon
    does after every command, or two in turn) while this one reads it as a worker does:
    every read is one of the published values. With struct.pack_into a reader saw 0 in
    about a third of its reads."""
    from qsd_py.export.fuse.shared_length import SharedLength

    shared = SharedLength()
    shared.publish(values[0])
    pid = os.fork()
    if pid == 0:  # the publisher
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for v in values:
                shared.publish(v)
        os._exit(0)
    seen: dict[int, int] = {}
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for _ in range(1000):
                v = shared.read()
                seen[v] = seen.get(v, 0) + 1
    finally:
        os.waitpid(pid, 0)
        shared.close()
    assert set(seen) <= set(values), seen
    assert sum(seen.values()) > 10_000


def test_one_worker_process_per_cpu(userver: UringServer, tmp_path: Path):
    data = os.urandom(MiB)
    exp = userver.export(userver.node(userver.image(MiB, data)), tmp_path / "mnt", io_uring=True)
    pids = _workers(exp.stats())
    cpus = sorted(os.sched_getaffinity(0))
    assert len(set(pids.values())) == len(cpus)
    for cpu in cpus:
        pid = pids[cpu]
        assert os.sched_getaffinity(pid) == {cpu}
        with open(f"/proc/{pid}/status") as f:
            ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        assert ppid == os.getpid() and pid != os.getpid()
    assert pread_direct(tmp_path / "mnt", 4096, 4096) == data[4096:8192]
    userver.delete(exp)
    _wait_gone(set(pids.values()), timeout=1)


def test_requests_the_workers_forward(userver: UringServer, tmp_path: Path):
    """Everything but READ/WRITE on the fast path is answered by the daemon's engine: a
    growing write, truncation, fsync, lseek and fallocate all behave as over /dev/fuse."""
    img = userver.image(MiB)
    mnt = tmp_path / "mnt"
    exp = userver.export(userver.node(img), mnt, io_uring=True, writable=True, growable=True)
    pwrite_direct(mnt, MiB, b"\x5a" * 4096)  # past the end: forwarded, the node grows
    assert os.stat(mnt).st_size == MiB + 4096
    os.truncate(mnt, 2 * MiB)
    assert os.stat(mnt).st_size == 2 * MiB
    fd = os.open(mnt, os.O_RDWR)
    try:
        os.fsync(fd)
        assert os.lseek(fd, 0, os.SEEK_DATA) >= 0
        os.posix_fallocate(fd, 0, 8192)
    finally:
        os.close(fd)
    assert img.stat().st_size == 2 * MiB
    assert img.read_bytes()[MiB : MiB + 4096] == b"\x5a" * 4096
    errors = sum(q["errors"] for q in exp.stats()["uring-queues"])
    assert errors == 0
    userver.delete(exp)


def test_fast_path_sees_a_truncate_through_the_mount(userver: UringServer, tmp_path: Path):
    """A truncate goes to the daemon; the worker's next READ must clip at the new length,
    not at the length it had (here: a read past the old end returns data, not EOF)."""
    mnt = tmp_path / "mnt"
    userver.export(
        userver.node(userver.image(MiB)), mnt, io_uring=True, writable=True, growable=True
    )
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)  # open first: only READs come afterwards
    try:
        assert _pread_fd(fd, MiB + 512 * KiB) == b""
        os.truncate(mnt, 2 * MiB)
        assert _pread_fd(fd, MiB + 512 * KiB) == bytes(4096)
        os.truncate(mnt, 512 * KiB)
        assert _pread_fd(fd, 768 * KiB) == b""
    finally:
        os.close(fd)


def test_block_resize_reaches_the_workers(qsd, uring_knob, tmp_path: Path):
    """A QMP block_resize changes the length under the workers without any FUSE request in
    between: the next fast-path READ past the new end must see EOF, not zeroes."""
    image, mnt, args = raw_image(tmp_path)
    daemon = qsd(
        *args,
        "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={mnt},writable=on,io_uring=on",
    )  # fmt: skip
    qmp = daemon.qmp()
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
    try:
        assert _pread_fd(fd, 768 * KiB) == b"\xa5" * 4096
        qmp.cmd("block_resize", **{"node-name": "d0", "size": 512 * KiB})
        assert image.stat().st_size == 512 * KiB
        assert _pread_fd(fd, 768 * KiB) == b""  # the kernel still believes 1 MiB
        assert _pread_fd(fd, 0) == b"\xa5" * 4096
    finally:
        os.close(fd)
    qmp.cmd("quit")
    with contextlib.suppress(EOFError):  # the daemon may hang up first, as QEMU does
        qmp.close()
    daemon.wait()


def test_a_worker_that_dies_ends_the_connection(
    userver: UringServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """SIGKILL one worker: the daemon aborts the connection, so a caller gets an error (not
    a hang on the dead worker's queue) and the mount goes; the host goes on, the export can
    be deleted and leaves no process behind."""
    mnt = tmp_path / "mnt"
    exp = userver.export(userver.node(userver.image(MiB)), mnt, io_uring=True)
    pids = _workers(exp.stats())
    victim_cpu = sorted(os.sched_getaffinity(0))[0]
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)  # opened while all is well
    result: list[object] = []

    def reader() -> None:
        os.sched_setaffinity(0, {victim_cpu})  # its requests go to the dead worker's queue
        try:
            result.append(_pread_fd(fd, 0))
        except OSError as err:
            result.append(err.errno)

    try:
        with caplog.at_level(logging.ERROR, logger="qsd_py.export.fuse"):
            os.kill(pids[victim_cpu], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while "queue worker" not in caplog.text:
                assert time.monotonic() < deadline, "the daemon did not notice the dead worker"
                time.sleep(0.01)
            t = threading.Thread(target=reader)
            t.start()
            t.join(10)
        assert not t.is_alive(), "a read hung on the dead worker's queue"
        assert result and result[0] in (errno.ENOTCONN, errno.ECONNABORTED), result
    finally:
        with contextlib.suppress(OSError):  # its FLUSH fails: the connection is gone
            os.close(fd)
    assert f"queue worker {pids[victim_cpu]} (CPU {victim_cpu}) ended" in caplog.text
    assert not fuse_mounts_under(tmp_path)  # fusectl's abort, or a forced unmount
    userver.delete(exp, "hard")
    assert "entries still held" not in caplog.text
    _wait_gone(set(pids.values()))


def _read_on_cpu(fd: int, cpu: int, offset: int) -> bytes:
    """pread from a thread bound to ``cpu``: the request goes to that CPU's queue."""
    out: list[bytes] = []

    def reader() -> None:
        os.sched_setaffinity(0, {cpu})
        out.append(_pread_fd(fd, offset))

    t = threading.Thread(target=reader)
    t.start()
    t.join(10)
    assert out, "the read did not come back"
    return out[0]


def test_counters_of_a_stopped_worker(userver: UringServer, tmp_path: Path):
    """A worker that cannot answer (SIGSTOP) costs a counter query its timeout once, for
    all workers together, and the query answers with the counters last known; once the
    worker runs again, the next query has its current counters, not the late answer to
    the query that timed out."""
    from qsd_py.export.fuse.workers import STATS_TIMEOUT_S

    data = os.urandom(MiB)
    mnt = tmp_path / "mnt"
    exp = userver.export(userver.node(userver.image(MiB, data)), mnt, io_uring=True)
    pids = _workers(exp.stats())
    cpu = sorted(os.sched_getaffinity(0))[0]
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
    try:
        assert _read_on_cpu(fd, cpu, 0) == data[:4096]
        before = exp.stats()["uring-queues"][cpu]["bytes-read"]
        os.kill(pids[cpu], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            stale = exp.stats()["uring-queues"]
            waited = time.monotonic() - t0
        finally:
            os.kill(pids[cpu], signal.SIGCONT)
        assert STATS_TIMEOUT_S * 0.9 < waited < STATS_TIMEOUT_S + 1.5
        assert [q["qid"] for q in stale] == sorted(pids)
        assert stale[cpu]["bytes-read"] == before
        assert _read_on_cpu(fd, cpu, 8192) == data[8192:12288]
        t0 = time.monotonic()
        fresh = exp.stats()["uring-queues"]
        assert time.monotonic() - t0 < STATS_TIMEOUT_S * 0.9
        assert fresh[cpu]["bytes-read"] == before + 4096
    finally:
        os.close(fd)
    userver.delete(exp)


def test_a_refused_register_fails_the_export(
    userver: UringServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A worker whose REGISTER the kernel refuses (here: one queue id past the last CPU's)
    makes block-export-add fail with the kernel's answer, and nothing is left behind: no
    mount, no worker process, no user of the node."""
    from qsd_py.errors import QMPError
    from qsd_py.export.fuse import uring_checks, workers

    start = workers.WorkerTransport.start
    forked: list[int] = []

    async def start_with_a_bad_queue(self: workers.WorkerTransport) -> None:
        self.workers[-1].qids.append(uring_checks.possible_cpus())
        try:
            await start(self)
        finally:
            forked.extend(w.pid for w in self.workers)

    monkeypatch.setattr(workers.WorkerTransport, "start", start_with_a_bad_queue)
    node = userver.node(userver.image(MiB))
    with pytest.raises(QMPError) as err:
        userver.export(node, tmp_path / "mnt", io_uring=True)
    bad = uring_checks.possible_cpus()
    assert err.value.desc == (
        f"FUSE-over-io_uring: registering queue {bad} failed: {os.strerror(errno.EINVAL)}"
    )
    assert not fuse_mounts_under(tmp_path)
    assert not userver.exports and not node.users
    assert forked and all(forked)
    _wait_gone(set(forked))


def test_workers_die_with_the_daemon(qsd, uring_knob, tmp_path: Path):
    mnt = tmp_path / "null.raw"
    mnt.touch()
    daemon = qsd(
        "--blockdev", "driver=null-co,node-name=n0,size=1048576",
        "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={mnt},io_uring=on",
    )  # fmt: skip
    qmp = daemon.qmp()
    (info,) = qmp.cmd("x-query-fuse-queues")
    pids = set(_workers(info).values())
    assert pids and daemon.proc.pid not in pids
    daemon.proc.kill()
    daemon.proc.wait()
    with contextlib.suppress(EOFError, OSError):
        qmp.close()
    _wait_gone(pids)


def test_worker_death_with_a_relative_mountpoint(qsd, uring_knob, tmp_path: Path):
    """The daemon finds the mount to abort by its absolute path (mountinfo has no other),
    also when the user named the mountpoint relative to the daemon's directory."""
    (tmp_path / "rel.raw").touch()
    daemon = qsd(
        "--blockdev", "driver=null-co,node-name=n0,size=1048576",
        "--export", "type=fuse,id=e0,node-name=n0,mountpoint=rel.raw,io_uring=on",
    )  # fmt: skip
    qmp = daemon.qmp()
    (info,) = qmp.cmd("x-query-fuse-queues")
    pids = _workers(info)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while fuse_mounts_under(tmp_path):
        assert time.monotonic() < deadline, "the connection of a dead worker was not ended"
        time.sleep(0.02)
    qmp.cmd("block-export-del", id="e0", mode="hard")
    _wait_gone(set(pids.values()))
    qmp.cmd("quit")
    with contextlib.suppress(EOFError):
        qmp.close()
    assert daemon.wait() == 0
    assert "ended (status -9): aborting the FUSE connection" in daemon.stderr()
