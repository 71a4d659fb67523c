"""Load: fio with verification through the ring, teardown under load, add/del cycles."""

from __future__ import annotations

import gc
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import fuse_mounts_under, umount_all_under
from uring_support import (
    FIO_VERIFY_32M,
    UringServer,
    fio_argv,
    fuse_fds,
    pread_direct,
    run_fio,
    uring_totals,
)


@pytest.mark.parametrize("iothreads", [0, 2])
def test_fio_randwrite_verify(userver: UringServer, tmp_path: Path, iothreads: int):
    """4k randwrite QD16 x 2 jobs (each on its own half), then crc32c verification."""
    names = [f"io{i}" for i in range(iothreads)]
    for name in names:
        userver.iothread(name)
    img = userver.image(32 << 20)
    opts = {"iothread": names} if names else {}
    exp = userver.export(userver.node(img), tmp_path / "mnt", writable=True, io_uring=True, **opts)
    res = run_fio(tmp_path / "mnt", *FIO_VERIFY_32M, "--output-format=json", timeout=120)
    assert res.returncode == 0, res.stderr
    jobs = json.loads(res.stdout[res.stdout.index("{") :])["jobs"]
    assert all(j["error"] == 0 for j in jobs)
    totals = uring_totals(exp.stats())
    assert totals["bytes-written"] == 32 << 20
    assert totals["bytes-read"] >= 32 << 20  # the verify pass
    assert totals["errors"] == 0
    devfuse = exp.stats()["queues"][0]
    assert devfuse["bytes-read"] == devfuse["bytes-written"] == 0


def _start_load(mnt: Path, seconds: int = 30) -> subprocess.Popen[str]:
    return subprocess.Popen(
        fio_argv(
            mnt,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--time_based",
            f"--runtime={seconds}",
            "--size=16M",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=mnt.parent,
    )


def _wait_for_requests(exp, minimum: int = 1000, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while uring_totals(exp.stats())["requests"] < minimum:
        assert time.monotonic() < deadline, "the load never reached the ring"
        time.sleep(0.05)


@pytest.mark.parametrize("in_memory", [False, True], ids=["disk", "tmpfs"])
@pytest.mark.parametrize("iothreads", [0, 2])
def test_hard_delete_under_load(
    userver: UringServer, tmp_path: Path, tmpfs: Callable[[str], Path], iothreads: int,
    in_memory: bool,
):  # fmt: skip
    """A hard delete while fio hammers the export ends it at once; on tmpfs the requests are
    copied inline, on the disk they go through the ring."""
    names = [f"io{i}" for i in range(iothreads)]
    for name in names:
        userver.iothread(name)
    if in_memory:
        tmpfs("32M")
    img = userver.image(16 << 20, name="shm0/img.raw" if in_memory else None)
    opts = {"iothread": names} if names else {}
    mnt = tmp_path / "mnt"
    exp = userver.export(userver.node(img), mnt, writable=True, io_uring=True, **opts)
    assert {bool(q["inline-max"]) for q in exp.stats()["uring-queues"]} == {in_memory}
    load = _start_load(mnt)
    try:
        _wait_for_requests(exp)
        t0 = time.monotonic()
        userver.delete(exp, "hard", timeout=20)
        assert time.monotonic() - t0 < 10
        load.wait(20)  # fio ends (its I/O fails with ENOTCONN/ECONNABORTED), never hangs
        assert not fuse_mounts_under(tmp_path)
        assert exp.uring is None and exp.mounted is None
    finally:
        if load.poll() is None:
            load.kill()
        load.wait()
    # The mountpoint is reusable at once, and the new export serves.
    exp2 = userver.export(userver.node(img), mnt, writable=True, io_uring=True)
    assert len(pread_direct(mnt, 0, 4096)) == 4096
    assert exp2.stats()["transport"] == "io_uring"


def test_safe_delete_refuses_while_busy_then_hard(userver: UringServer, tmp_path: Path):
    """``safe`` either refuses (requests in flight) or succeeds; never hangs."""
    img = userver.image(16 << 20)
    mnt = tmp_path / "mnt"
    exp = userver.export(userver.node(img), mnt, writable=True, io_uring=True)
    load = _start_load(mnt)
    try:
        _wait_for_requests(exp)
        from qsd_py.errors import QMPError

        try:
            userver.delete(exp, "safe", timeout=20)
        except QMPError as err:
            assert err.desc == f"export '{exp.id}' still in use"
            userver.delete(exp, "hard", timeout=20)
        load.wait(20)
        assert not fuse_mounts_under(tmp_path)
    finally:
        if load.poll() is None:
            load.kill()
        load.wait()


def test_safe_delete_refuses_while_a_linked_read_runs(qsd, userver: UringServer, tmp_path: Path):
    """A READ served as a read SQE linked to its commit is in flight until the read itself
    completed. The backing file here is a FUSE export of another qsd-py whose null-co node
    takes 300 ms per request, so the read is surely still running when ``safe`` deletion is
    asked: it must be refused, the reader must get its data, and then ``safe`` succeeds."""
    from qsd_py.errors import QMPError

    slow = tmp_path / "slow.raw"
    slow.touch()
    qsd(
        "--blockdev",
        "driver=null-co,node-name=z,size=16777216,read-zeroes=on,latency-ns=300000000",
        "--export",
        f"type=fuse,id=s,node-name=z,mountpoint={slow},writable=on",
        qmp=False,
    )
    mnt = tmp_path / "mnt"
    exp = userver.export(userver.node(slow), mnt, writable=True, io_uring=True)
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)  # opened first: only READs come now
    bufs = [mmap.mmap(-1, 4096) for _ in range(2)]
    try:
        assert os.preadv(fd, [bufs[0]], 0) == 4096  # warm-up: the first READ and its GETATTRs
        reader = threading.Thread(target=os.preadv, args=(fd, [bufs[1]], 4096))
        reader.start()
        try:
            deadline = time.monotonic() + 10
            while uring_totals(exp.stats())["in-flight"] == 0:
                assert time.monotonic() < deadline, "the read never reached the ring"
                time.sleep(0.002)
            with pytest.raises(QMPError) as err:
                userver.delete(exp, "safe")
            assert err.value.desc == f"export '{exp.id}' still in use"
        finally:
            reader.join(20)
        assert bufs[1][:] == bytes(4096)
    finally:
        os.close(fd)
    queues = exp.stats()["uring-queues"]
    assert sum(q["linked-reads"] for q in queues) == 2
    assert sum(q["link-breaks"] for q in queues) == 0
    assert uring_totals(exp.stats())["in-flight"] == 0
    userver.delete(exp, "safe")
    assert not exp.mounted


def test_add_del_cycles_leak_no_fds(userver: UringServer, tmp_path: Path):
    img = userver.image(1 << 20, b"cycle" * 100)
    node = userver.node(img)
    mnt = tmp_path / "mnt"
    exp = userver.export(node, mnt, io_uring=True)  # warm-up: the loop's ring now exists
    userver.delete(exp)
    gc.collect()
    fds = fuse_fds()
    for i in range(100):
        exp = userver.export(node, mnt, io_uring=True)
        if i % 10 == 0:
            assert pread_direct(mnt, 0, 4096)[:500] == b"cycle" * 100
        userver.delete(exp)
    gc.collect()
    assert fuse_fds() <= fds
    assert not fuse_mounts_under(tmp_path)
    assert not node.users
    from qsd_py.export.fuse import uring

    assert uring._KERNEL_OWNED == []  # every entry came back from the kernel


def _serve_in_subprocess(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    img = tmp_path / "img.raw"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    mnt, ready = tmp_path / "mnt", tmp_path / "ready"
    mnt.touch()
    helper = Path(__file__).with_name("serve_export.py")
    proc = subprocess.Popen(
        [sys.executable, str(helper), str(img), str(mnt), str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the export never came up"
        time.sleep(0.02)
    return proc, mnt


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_under_load(uring_knob, tmp_path: Path, sig: int):
    """SIGTERM: clean teardown, exit 0, no mount. SIGKILL: the kernel ends the connection
    with the process; the load fails instead of hanging."""
    proc, mnt = _serve_in_subprocess(tmp_path)
    load = _start_load(mnt)
    try:
        time.sleep(1)
        assert load.poll() is None, load.communicate()[1]
        proc.send_signal(sig)
        status = proc.wait(20)
        load.wait(20)
        if sig == signal.SIGTERM:
            assert status == 0, proc.communicate()[1]
            assert not fuse_mounts_under(tmp_path)
    finally:
        for p in (proc, load):
            if p.poll() is None:
                p.kill()
            p.wait()
        umount_all_under(tmp_path)
