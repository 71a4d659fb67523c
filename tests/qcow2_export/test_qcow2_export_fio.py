"""fio's verified random writes through a qcow2 export, over both FUSE transports: onto an
empty image over a backing file (allocating, copy-on-write writes), and onto a fully
allocated image (writes in place, on the queue workers' fast path). What fio wrote must be
what QEMU reads from the image afterwards, and the image must pass ``qemu-img check``."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from qcow2_export_support import (
    QEMU_IMG,
    ExportDaemon,
    MiB,
    check_clean,
    convert_raw,
    create,
    dump,
    fio,
    proc_io,
    qemu_io,
    run,
)

BLOCK = 4096
JOB_SIZE = 16 * MiB
#: Two jobs, each on its own 16 MiB, of 4 KiB random writes at QD16.
JOBS = ("--rw=randwrite", f"--bs={BLOCK}", "--iodepth=16", "--numjobs=2",
        f"--size={JOB_SIZE}", f"--offset_increment={JOB_SIZE}")  # fmt: skip
VERIFY = ("--verify=crc32c", "--verify_fatal=1")
#: fio's verify header: magic 0xacca, type, length, seed, then the block's offset.
FIO_HEADER = struct.Struct("<HHIQQ")
FIO_MAGIC = 0xACCA
BACKING_BYTE = 0x5A


def _fio_blocks(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """Count the 4 KiB blocks of ``raw[start:end]`` that are fio's (a verify header naming
    their own offset) and those that are the backing file's pattern; nothing else may be
    there."""
    ours = backing = 0
    pattern = bytes([BACKING_BYTE]) * BLOCK
    for pos in range(start, end, BLOCK):
        block = raw[pos : pos + BLOCK]
        if block == pattern:
            backing += 1
            continue
        magic, _type, length, _seed, offset = FIO_HEADER.unpack_from(block)
        assert (magic, length, offset) == (FIO_MAGIC, BLOCK, pos), f"block at {pos:#x}"
        ours += 1
    return ours, backing


def test_fio_over_a_backing_file(
    tmp_path: Path, export: Callable[..., ExportDaemon], transport: str
):
    """fio writes half of the blocks of 32 MiB of an empty image over a 64 MiB backing file
    of 0x5a: each first write to a cluster allocates it and copies the backing data around
    the 4 KiB. A verify-only pass after a restart of the daemon, the same pass on what
    ``qemu-img convert`` reads from the image, and every block not written still the
    backing's."""
    base = create(tmp_path / "base.qcow2", "64M")
    qemu_io(base, f"write -P {BACKING_BYTE:#x} 0 64M")
    top = create(tmp_path / "top.qcow2", "64M", backing=base)
    job = (*JOBS, f"--number_ios={JOB_SIZE // BLOCK // 2}")
    daemon = export(top)
    fio(daemon.mnt, *job, *VERIFY, "--do_verify=1")
    daemon.stop()
    daemon.start()
    fio(daemon.mnt, *job, *VERIFY, "--verify_only")
    seen = dump(daemon.mnt, tmp_path / "seen.raw", 64 * MiB)
    daemon.stop()

    check_clean(top, daemon.log())
    run([QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(seen), str(top)], cwd=tmp_path)
    raw = convert_raw(top, tmp_path / "qemu.raw")
    fio(raw, *job, *VERIFY, "--verify_only", direct=False)
    data = raw.read_bytes()
    assert _fio_blocks(data, 0, 2 * JOB_SIZE) == (JOB_SIZE // BLOCK, JOB_SIZE // BLOCK)
    assert data[2 * JOB_SIZE :] == bytes([BACKING_BYTE]) * (32 * MiB)


def test_fio_in_place_on_a_fully_allocated_image(
    tmp_path: Path, export: Callable[..., ExportDaemon], transport: str
):
    """Every cluster of a ``preallocation=falloc`` image is the image's own, so every write
    goes in place: the file does not grow, and over io_uring the queue workers write and
    read on the fast path themselves. The proof: the uring queues carried all the bytes,
    every READ went as a linked read, and the daemon itself wrote almost nothing to files
    (a WRITE forwarded to it is written by its thread pool: /proc/PID/io counts it)."""
    image = create(tmp_path / "full.qcow2", "32M", preallocation="falloc")
    size = image.stat().st_size
    daemon = export(image, file_opts="aio=threads")  # the daemon's writes: syscalls it counts
    before = proc_io(daemon.pid)["wchar"]
    fio(daemon.mnt, *JOBS, *VERIFY, "--do_verify=1")
    daemon_wrote = proc_io(daemon.pid)["wchar"] - before
    answer = daemon.queues()
    assert answer["transport"] == transport
    if transport == "io_uring":
        queues = answer["uring-queues"]
        assert {q["fast-path"] for q in queues} == {"uring"}
        assert sum(q["bytes-written"] for q in queues) == 2 * JOB_SIZE
        assert sum(q["bytes-read"] for q in queues) == 2 * JOB_SIZE
        assert sum(q["errors"] for q in queues) == 0
        if all(q["inline-max"] == 0 for q in queues):  # else tmp_path is in memory
            assert sum(q["linked-reads"] for q in queues) == 2 * JOB_SIZE // BLOCK
        assert daemon_wrote < 2 * JOB_SIZE // 16, daemon_wrote
    else:
        (queue,) = answer["queues"]
        assert queue["fast-path"] != "none"
        assert queue["bytes-written"] == queue["bytes-read"] == 2 * JOB_SIZE
    seen = dump(daemon.mnt, tmp_path / "seen.raw", 2 * JOB_SIZE)
    daemon.stop()

    assert image.stat().st_size == size  # nothing was allocated
    check_clean(image, daemon.log())
    run([QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(seen), str(image)], cwd=tmp_path)
    raw = convert_raw(image, tmp_path / "qemu.raw")
    fio(raw, *JOBS, *VERIFY, "--verify_only", direct=False)
