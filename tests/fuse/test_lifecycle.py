"""Export lifecycle over a real mount: deletion modes, start-up failures, dead mounts,
interrupts, multi-queue iothreads and add/del cycles."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from memnode import MemNode
from support import fuse_mounts_under

from qsd_py.errors import QMPError
from qsd_py.export.fuse import mount as fmount

MiB = 1 << 20


def _reader(path: Path, offset: int, result: list) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        result.append(err.errno)
        return
    try:
        result.append(os.pread(fd, 4096, offset))
    except OSError as err:
        result.append(err.errno)
    try:
        os.close(fd)  # FLUSH fails with ENOTCONN once the export is gone
    except OSError:
        pass


def _serving(exp) -> list:
    """The queues that serve requests: the io_uring queues, else the /dev/fuse ones."""
    return exp.uring.queues if exp.uring is not None else exp.queues


def _in_flight(exp) -> int:
    """Requests in flight on the serving queues, as x-query-fuse-queues counts them (queue
    worker processes included)."""
    st = exp.stats()
    return sum(q["in-flight"] for q in st["uring-queues"] or st["queues"])


def _wait_in_flight(exp, n: int = 1, timeout: float = 5.0) -> None:
    """Until ``n`` requests stay in flight for 50 ms: the slow READs, not the OPEN or
    GETATTR before them (a queue worker sends those to the daemon, which takes a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "request never reached the export"
        if _in_flight(exp) >= n:
            time.sleep(0.05)
            if _in_flight(exp) >= n:
                return
        time.sleep(0.01)


def test_del_with_file_open_gives_enotconn(server, mounted, tmp_path):
    node, mnt, exp = mounted(MiB, writable=True)
    fd = os.open(mnt, os.O_RDWR)
    try:
        server.delete(exp, "safe")
        assert not fuse_mounts_under(tmp_path)
        with pytest.raises(OSError) as info:
            os.pread(fd, 10, 0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        with pytest.raises(OSError):  # FLUSH on close fails the same way; the fd is gone
            os.close(fd)
    assert node.users == {}


def test_safe_del_refused_in_flight_then_hard_aborts(server, mounted, tmp_path):
    node = MemNode(MiB, delay=2.0)
    node, mnt, exp = mounted(node=node)
    result: list = []
    t = threading.Thread(target=_reader, args=(mnt, 0, result))
    t.start()
    try:
        _wait_in_flight(exp)
        with pytest.raises(QMPError) as info:
            server.run(exp.stop("safe"))
        assert info.value.desc == f"export '{exp.id}' still in use"
        assert fuse_mounts_under(tmp_path)  # still there
        t0 = time.monotonic()
        server.delete(exp, "hard")
        t.join(5)
        assert not t.is_alive()
        assert time.monotonic() - t0 < 1.5  # did not wait for the 2 s backend I/O
        assert result == [errno.ECONNABORTED] or result == [errno.ENOTCONN]
        assert not fuse_mounts_under(tmp_path)
        assert node.users == {}
    finally:
        t.join(5)


def test_interrupted_request_does_not_leak(server, mounted):
    node = MemNode(MiB, delay=0.5)
    node, mnt, exp = mounted(node=node)
    code = f"import os; fd = os.open({str(mnt)!r}, os.O_RDONLY); os.pread(fd, 4096, 0)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        _wait_in_flight(exp)
        proc.send_signal(signal.SIGINT)  # the kernel sends FUSE_INTERRUPT
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while exp.in_use():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert sum(q.stats.interrupts for q in exp.queues) >= 1
    node.delay = 0
    assert open(mnt, "rb").read(4) == bytes(4)  # still serving
    server.delete(exp, "safe")  # not stuck "in use" (QEMU's leak)


# --- start-up failures ------------------------------------------------------------------------
def _start_fails(server, node, mountpoint, **opts) -> str:
    from qsd_py.export.fuse.export import FuseExport

    full = {
        "type": "fuse",
        "id": "bad",
        "node-name": node.node_name,
        "mountpoint": str(mountpoint),
        **opts,
    }
    exp = FuseExport(server.daemon, full, node)
    with pytest.raises(QMPError) as info:
        server.run(exp.start())
    assert node.users == {}
    return info.value.desc


def test_startup_failures_leave_nothing(server, mounted, tmp_path):
    node = MemNode(MiB)
    missing = tmp_path / "missing"
    assert _start_fails(server, node, missing) == (
        f"Failed to stat '{missing}': No such file or directory"
    )
    assert _start_fails(server, node, tmp_path) == f"'{tmp_path}' is not a regular file"
    (tmp_path / "f").touch()
    assert _start_fails(server, node, tmp_path / "f", iothread=[]) == (
        "The set of I/O threads must not be empty"
    )
    assert _start_fails(server, node, tmp_path / "f", iothread="nope") == (
        'iothread "nope" not found'
    )
    server.daemon.objects.add({"qom-type": "iothread", "id": "io0"})
    assert (
        _start_fails(server, node, tmp_path / "f", iothread=["io0"], **{"fixed-iothread": True})
        == "Cannot use fixed-iothread for a multi-threaded export"
    )
    assert not fuse_mounts_under(tmp_path)
    _, mnt, _ = mounted(MiB)
    other = MemNode(MiB)
    assert _start_fails(server, other, mnt) == f"There already is a FUSE export on '{mnt}'"
    assert fuse_mounts_under(tmp_path) == [str(mnt)]


def test_read_only_node_refuses_writable_export(server, tmp_path):
    (tmp_path / "f").touch()
    node = MemNode(MiB, read_only=True)
    assert _start_fails(server, node, tmp_path / "f", writable=True) == "Block node is read-only"
    assert not fuse_mounts_under(tmp_path)


def test_dead_mount_is_cleaned(server, tmp_path, caplog):
    mnt = tmp_path / "mnt"
    mnt.touch()
    dead = fmount.mount(str(mnt), read_only=True, allow_other="off", max_read=MiB)
    os.close(dead.fd)  # the "daemon" dies before serving: ENOTCONN from now on
    with pytest.raises(OSError) as info:
        os.stat(mnt)
    assert info.value.errno == errno.ENOTCONN
    with caplog.at_level(logging.WARNING, logger="qsd_py.export.fuse"):
        server.export(MemNode(MiB), mnt, writable=True)
    assert "dead FUSE mount" in caplog.text
    assert os.stat(mnt).st_size == MiB
    assert fuse_mounts_under(tmp_path) == [str(mnt)]


# --- multi-queue --------------------------------------------------------------------------------
def test_iothread_queues_share_the_load(server, mounted):
    for name in ("io0", "io1"):
        server.daemon.objects.add({"qom-type": "iothread", "id": name})
    node = MemNode(4 * MiB, delay=0.002)
    node, mnt, exp = mounted(node=node, writable=True, iothread=["io0", "io1"])
    assert len(_serving(exp)) == (2 if exp.uring is None else os.sysconf("SC_NPROCESSORS_CONF"))
    assert {q.loop for q in _serving(exp)} == {
        server.daemon.objects.iothread(n).loop for n in ("io0", "io1")
    }
    pattern = os.urandom(4 * MiB)

    def worker(k: int) -> None:
        fd = os.open(mnt, os.O_RDWR)
        try:
            for i in range(k, 1024, 8):
                os.pwrite(fd, pattern[i * 4096 : (i + 1) * 4096], i * 4096)
            for i in range(k, 1024, 8):
                assert os.pread(fd, 4096, i * 4096) == pattern[i * 4096 : (i + 1) * 4096]
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert node.data == pattern
    served = [q.stats.requests for q in _serving(exp)]
    assert all(n > 0 for n in served), served
    server.delete(exp, "safe")


# --- add/del cycles -------------------------------------------------------------------------------
def test_add_del_cycles_do_not_leak(server, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.touch()
    node = MemNode(
        MiB,
    )

    def cycle() -> None:
        exp = server.export(node, mnt, writable=True)
        with open(mnt, "r+b") as f:
            f.write(b"x")
        server.delete(exp, "safe")

    for _ in range(5):
        cycle()
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(200):
        cycle()
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert threading.active_count() <= threads
    assert not fuse_mounts_under(tmp_path)
