"""FUSE exports of real image files (the ``file`` driver): fio's crc32c verification,
punch-hole against the file's real allocation, and a qcow2 file used through the export by
qemu-img/qemu-io as QEMU's own tests do. The export is served from a thread of the test
process; the tools run as subprocesses."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qsd_py.block.graph import BlockGraph

MiB = 1 << 20


@pytest.fixture
def file_export(server, tmp_path: Path):
    graph = BlockGraph()

    def make(image: Path, node_opts: dict[str, Any] | None = None, **opts: Any):
        node = server.run(
            graph.add(
                {
                    "driver": "file",
                    "node-name": f"f{len(graph)}",
                    "filename": str(image),
                    **(node_opts or {}),
                }
            )
        )
        mnt = tmp_path / f"mnt{len(graph)}"
        mnt.touch()
        return node, mnt, server.export(node, mnt, **opts)

    yield make
    server.close()  # exports first, then the nodes (on the server's loop)
    asyncio.run(graph.close_all())  # file nodes: no loop of their own needed


def test_fio_crc32c_verify(file_export, server, tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    node, mnt, exp = file_export(image, writable=True)
    out = subprocess.run(
        [
            "fio",
            "--name=verify",
            f"--filename={mnt}",
            "--direct=1",
            "--ioengine=libaio",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=32M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # fio leaves its verify state files in the cwd
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "err= 0" in out.stdout
    written = sum(q.stats.bytes_written for q in exp.queues)
    assert written >= 64 * MiB
    # the image itself holds what fio wrote: verify again straight from the backing file
    server.delete(exp, "safe")
    out = subprocess.run(
        [
            "fio",
            "--name=verify",
            f"--filename={image}",
            "--rw=randwrite",
            "--bs=4k",
            "--numjobs=2",
            "--size=32M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--verify_only",
            "--verify_fatal=1",
            "--group_reporting",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_punch_hole_on_file_with_discard_unmap(file_export, tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"\x11" * (4 * MiB))
    node, mnt, _ = file_export(image, {"discard": "unmap"}, writable=True)
    blocks_before = os.stat(image).st_blocks
    out = subprocess.run(
        ["fallocate", "-p", "-o", "1M", "-l", "1M", str(mnt)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert os.stat(image).st_blocks <= blocks_before - MiB // 512
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == bytes(MiB)
    fd = os.open(mnt, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 2 * MiB
    finally:
        os.close(fd)


def test_qcow2_file_through_export(file_export, tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(image), "32M"], check=True, capture_output=True
    )
    _, mnt, _ = file_export(image, writable=True, growable=True)
    io = subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 256k",
            "-c",
            "read -P 0x5a 1M 256k",
            str(mnt),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout
    check = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(mnt)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    info = subprocess.run(["qemu-img", "info", str(mnt)], capture_output=True, text=True)
    assert "file format: qcow2" in info.stdout
