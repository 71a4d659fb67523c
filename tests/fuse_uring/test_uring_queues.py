"""Queues: requests from every CPU are served by that CPU's queue, queues spread over
iothreads, and a shallow queue never hangs a deeper load (queue worker processes:
test_uring_workers.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from uring_support import UringServer, pread_direct, uring_totals

NCPU = os.sysconf("SC_NPROCESSORS_CONF")


def _pinned_reads(mnt: Path, image: bytes, cpus: list[int], count: int = 50) -> list[str]:
    """One thread per CPU, pinned with sched_setaffinity, each reading and checking blocks."""
    errors: list[str] = []

    def reader(cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # 0 = this thread
            for i in range(count):
                off = ((cpu * count + i) * 4096) % (len(image) - 4096)
                if pread_direct(mnt, off, 4096) != image[off : off + 4096]:
                    errors.append(f"cpu {cpu}: data mismatch at {off}")
        except Exception as err:  # noqa: BLE001 - reported to the test thread
            errors.append(f"cpu {cpu}: {err!r}")

    threads = [threading.Thread(target=reader, args=(c,)) for c in cpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a pinned reader hung"
    return errors


def _online_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.fixture
def image_data() -> bytes:
    return os.urandom(4 << 20)


def test_every_cpu_is_served_by_its_queue(userver: UringServer, tmp_path: Path, image_data):
    cpus = _online_cpus()  # every CPU this test may run on (2 on the CI machines)
    img = userver.image(len(image_data), image_data)
    exp = userver.export(userver.node(img), tmp_path / "mnt", io_uring=True)
    before = {q["qid"]: q["requests"] for q in exp.stats()["uring-queues"]}
    assert _pinned_reads(tmp_path / "mnt", image_data, cpus) == []
    after = {q["qid"]: q["requests"] for q in exp.stats()["uring-queues"]}
    for cpu in cpus:
        assert after[cpu] - before[cpu] >= 50, f"queue {cpu} did not serve CPU {cpu}"


def test_queues_spread_over_iothreads(userver: UringServer, tmp_path: Path, image_data):
    userver.iothread("io0")
    userver.iothread("io1")
    img = userver.image(len(image_data), image_data)
    exp = userver.export(
        userver.node(img), tmp_path / "mnt", io_uring=True, iothread=["io0", "io1"]
    )
    queues = exp.stats()["uring-queues"]
    assert [q["name"].rsplit("@", 1)[1] for q in queues] == [
        ("io0", "io1")[qid % 2] for qid in range(NCPU)
    ]
    iothreads = [userver.daemon.objects.iothread(n).thread.native_id for n in ("io0", "io1")]
    assert [q["thread-id"] for q in queues] == [iothreads[qid % 2] for qid in range(NCPU)]
    assert len(exp.stats()["queues"]) == 1  # one /dev/fuse reader, for FORGET/INTERRUPT
    assert _pinned_reads(tmp_path / "mnt", image_data, _online_cpus()) == []
    assert uring_totals(exp.stats())["bytes-read"] >= 50 * 4096 * len(_online_cpus())
    userver.delete(exp)


def test_depth_one_serves_many_concurrent_readers(userver: UringServer, tmp_path: Path, image_data):
    """More requests than entries wait in the kernel for an entry; none hangs."""
    img = userver.image(len(image_data), image_data)
    exp = userver.export(userver.node(img), tmp_path / "mnt", io_uring=True, **{"queue-depth": 1})
    assert all(q["depth"] == 1 for q in exp.stats()["uring-queues"])
    cpus = _online_cpus() * 4  # 4 readers per CPU against 1 entry per queue
    assert _pinned_reads(tmp_path / "mnt", image_data, cpus, count=25) == []
