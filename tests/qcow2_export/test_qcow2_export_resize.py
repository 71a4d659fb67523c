"""QMP block_resize of an exported qcow2 node while fio writes and verifies through the
export, over both transports: the exported file's size follows at once, the new area reads
as zeroes even over a larger backing file (QEMU 11.1 writes zero clusters there, facts
section 4), fio's data stay intact and the image passes ``qemu-img check``."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from qcow2_export_support import (
    ExportDaemon,
    MiB,
    check_clean,
    convert_raw,
    create,
    fio,
    pread_direct,
    qemu_io,
    qemu_map,
)

from qsd_py.export.fuse.engine import ATTR_VALID_S

FIO_JOB = ("--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=8M", "--loops=2",
           "--verify=crc32c", "--verify_fatal=1")  # fmt: skip
#: 4096 writes at 1500 per second at most: fio still runs at the second resize.
PACE = "--rate_iops=,1500"
BACKING_BYTE = 0x33
#: The kernel keeps a FUSE file's attributes for ATTR_VALID_S (1 s, as QEMU's export says);
#: a size changed by QMP shows once they expire or a request refreshed them.
ATTR_WAIT_S = ATTR_VALID_S + 1.0


def _wait_size(path: Path, size: int) -> None:
    deadline = time.monotonic() + ATTR_WAIT_S
    while os.stat(path).st_size != size:
        assert time.monotonic() < deadline, f"st_size {os.stat(path).st_size}, not {size}"
        time.sleep(0.02)


def test_block_resize_under_io(tmp_path: Path, export: Callable[..., ExportDaemon]):
    base = create(tmp_path / "big-base.qcow2", "64M")
    qemu_io(base, f"write -P {BACKING_BYTE:#x} 0 64M")
    top = create(tmp_path / "top.qcow2", "32M", backing=base)
    daemon = export(top)
    argv = ["fio", "--name=j", f"--filename={daemon.mnt}", "--direct=1", "--ioengine=io_uring",
            *FIO_JOB, PACE, "--do_verify=1"]  # fmt: skip
    job = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)  # fmt: skip
    try:
        assert pread_direct(daemon.mnt, 20 * MiB, 4096) == bytes([BACKING_BYTE]) * 4096
        old = 32 * MiB
        for size in (40 * MiB, 64 * MiB):
            daemon.cmd("block_resize", **{"node-name": "q0", "size": size})
            assert job.poll() is None, "fio ended before the resize: make its job longer"
            _wait_size(daemon.mnt, size)
            assert pread_direct(daemon.mnt, old, size - old) == bytes(size - old)
            assert pread_direct(daemon.mnt, size - 4096, 8192) == bytes(4096)  # then EOF
            old = size
        out, _ = job.communicate(timeout=120)
        assert job.returncode == 0, out
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert sum(q["errors"] for q in daemon.queues()["uring-queues"]) == 0
    daemon.stop()

    check_clean(top, daemon.log())
    new_area = [e for e in qemu_map(top) if e["start"] >= 32 * MiB]
    assert {(e["depth"], e["zero"], e["data"]) for e in new_area} == {(0, True, False)}
    assert new_area[0]["start"] == 32 * MiB
    assert sum(e["length"] for e in new_area) == 32 * MiB
    raw = convert_raw(top, tmp_path / "after.raw")
    fio(raw, *FIO_JOB, "--verify_only", direct=False)
    with open(raw, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(24 * MiB) == bytes([BACKING_BYTE]) * (24 * MiB)
        assert f.read() == bytes(32 * MiB)
