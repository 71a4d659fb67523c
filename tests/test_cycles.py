"""Many block-export-add/del cycles through a real daemon leave no fds, threads or memory
behind, over both transports."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Qsd, fuse_mounts_under, raw_image

MiB = 1 << 20


def process_usage(pid: int) -> dict[str, int]:
    """Open fds, threads and resident memory (KiB) of a process."""
    usage = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS"):
                usage[key] = int(value.split()[0])
    return usage


def thread_names(pid: int) -> list[str]:
    """The names of a process's threads (for the message of a failed assertion)."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return sorted(names)


@pytest.fixture(params=["dev-fuse", "io_uring"])
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "io_uring":
        request.getfixturevalue("uring_knob")
    return request.param


def test_200_export_cycles_do_not_grow(
    qsd: Callable[..., Qsd], tmp_path: Path, transport: str
) -> None:
    image, mnt, nodes = raw_image(tmp_path)
    daemon = qsd(*nodes)
    qmp = daemon.qmp()
    args = {"type": "fuse", "id": "e0", "node-name": "d0", "mountpoint": str(mnt),
            "writable": True, "io_uring": transport == "io_uring"}  # fmt: skip

    def cycle(i: int) -> None:
        qmp.cmd("block-export-add", **args)
        fd = os.open(mnt, os.O_RDWR)
        try:
            os.pwrite(fd, i.to_bytes(4, "little"), 4096)
            assert os.pread(fd, 4, 4096) == i.to_bytes(4, "little")
        finally:
            os.close(fd)
        qmp.cmd("block-export-del", id="e0")
        assert not fuse_mounts_under(tmp_path)

    for i in range(20):  # warm up: thread pools, rings, allocator arenas
        cycle(i)
    before = process_usage(daemon.proc.pid)
    names_before = thread_names(daemon.proc.pid)
    for i in range(200):
        cycle(i)
    after = process_usage(daemon.proc.pid)
    assert after["fds"] <= before["fds"], (before, after)
    names_after = thread_names(daemon.proc.pid)
    assert after["Threads"] <= before["Threads"], (names_before, names_after)
    assert after["VmRSS"] - before["VmRSS"] < 4 * 1024, (before, after)  # KiB
    qmp.cmd("quit")
    with contextlib.suppress(EOFError):  # the daemon may hang up first, as QEMU does
        qmp.close()
    assert daemon.wait() == 0
    assert image.read_bytes()[4096:4100] == (199).to_bytes(4, "little")
