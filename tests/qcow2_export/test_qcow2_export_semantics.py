"""What a qcow2 export looks like from the host, compared with QEMU 11.1's FUSE export of the
same images (/work/wt/notes/qemu-qcow2-facts.md, sections 6 and 7, measured with QEMU's
daemon): st_blocks, fallocate inside and past the end, a host ``qemu-img resize`` of the
mounted file, SEEK_DATA/SEEK_HOLE through a backing chain, and the image locks."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_export_support import (
    QEMU_IMG,
    QEMU_IO,
    ExportDaemon,
    MiB,
    check_clean,
    create,
    qemu_io,
    qemu_map,
    run,
)

KiB = 1 << 10


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """s-base <- s-mid <- s-top (64 MiB), as in the facts' section 6: base data at [0, 64k)
    and [32M, +64k), a zero cluster at 8M; mid data at [1M, +64k) and [4M, +4k); top data
    at [2M, +64k), zero clusters at [16M, +1M) and (unmapped) [32M, +64k). Returns top."""
    base = create(tmp_path / "s-base.qcow2", "64M")
    qemu_io(base, "write -P 1 0 64k", "write -P 1 32M 64k", "write -z 8M 64k")
    mid = create(tmp_path / "s-mid.qcow2", "64M", backing=base)
    qemu_io(mid, "write -P 2 1M 64k", "write -P 2 4M 4k")
    top = create(tmp_path / "s-top.qcow2", "64M", backing=mid)
    qemu_io(top, "write -P 3 2M 64k", "write -z 16M 1M", "write -z -u 32M 64k")
    return top


def _extents(path: Path) -> list[tuple[int, int]]:
    """The data extents SEEK_DATA/SEEK_HOLE report, and check that SEEK_DATA past the last
    one is ENXIO."""
    fd = os.open(path, os.O_RDONLY)
    found = []
    pos = 0
    try:
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                assert err.errno == errno.ENXIO, err
                return found
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, pos))
    finally:
        os.close(fd)


def _fallocate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """util-linux's fallocate, as the facts were measured with."""
    return subprocess.run(["fallocate", *map(str, args)], capture_output=True, text=True)


def test_seek_data_and_hole_through_a_chain(chain: Path, export: Callable[..., ExportDaemon]):
    """Data of every layer counts; zero clusters in any layer are holes, and top's unmapped
    zero cluster hides base's data at 32M (QEMU 11.1's answer)."""
    daemon = export(chain)
    assert _extents(daemon.mnt) == [
        (0x0, 0x10000),
        (0x100000, 0x110000),
        (0x200000, 0x210000),
        (0x400000, 0x410000),
    ]


def test_st_blocks_is_the_image_files_allocation(chain: Path, export: Callable[..., ExportDaemon]):
    """The export's st_blocks is the top qcow2 file's allocation (backing files not counted),
    and follows it when a write allocates; st_size is the virtual size."""
    daemon = export(chain)
    st = os.stat(daemon.mnt)
    assert (st.st_size, st.st_blocks) == (64 * MiB, os.stat(chain).st_blocks)
    fd = os.open(daemon.mnt, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x44" * (256 * KiB), 48 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    grown = os.stat(chain).st_blocks
    assert grown >= st.st_blocks + 256 * KiB // 512
    assert os.stat(daemon.mnt).st_blocks == grown


def test_fallocate_inside_and_past_the_end(
    tmp_path: Path, chain: Path, export: Callable[..., ExportDaemon]
):
    """Mode 0 inside the image: EOPNOTSUPP. Past the end: the image grows, and the new
    clusters are allocated (falloc preallocation: data at depth 0 reading zeroes). Keep-size
    past the end: EOPNOTSUPP, util-linux says ``keep size mode is unsupported``."""
    daemon = export(chain)
    inside = _fallocate("-o", "0", "-l", "1M", daemon.mnt)
    assert inside.returncode == 1
    assert inside.stderr == "fallocate: fallocate failed: Operation not supported\n"
    past = _fallocate("-o", "64M", "-l", "1M", daemon.mnt)
    assert past.returncode == 0, past.stderr
    assert os.stat(daemon.mnt).st_size == 65 * MiB
    assert os.stat(daemon.mnt).st_blocks == os.stat(chain).st_blocks
    assert _extents(daemon.mnt)[-1] == (64 * MiB, 65 * MiB)
    keep = _fallocate("-n", "-o", "80M", "-l", "1M", daemon.mnt)
    assert keep.returncode == 1
    assert keep.stderr == "fallocate: fallocate failed: keep size mode is unsupported\n"
    with open(daemon.mnt, "rb") as f:
        assert f.read()[64 * MiB :] == bytes(MiB)
    daemon.stop()

    (new,) = [e for e in qemu_map(chain) if e["start"] >= 64 * MiB]
    assert (new["start"], new["length"], new["depth"]) == (64 * MiB, MiB, 0)
    assert (new["present"], new["zero"], new["data"]) == (True, False, True)
    check_clean(chain, daemon.log())


def test_host_qemu_img_resize_preallocates(chain: Path, export: Callable[..., ExportDaemon]):
    """``qemu-img resize -f raw --preallocation=falloc`` on the mounted file works as with
    QEMU's export: the 6 MiB it adds are allocated data clusters, counted in st_blocks of
    both the export and the qcow2 file."""
    daemon = export(chain)
    done = run([QEMU_IMG, "resize", "-f", "raw", "--preallocation=falloc", str(daemon.mnt),
                "70M"])  # fmt: skip
    assert done.stdout == "Image resized.\n"
    st = os.stat(daemon.mnt)
    assert st.st_size == 70 * MiB
    assert st.st_blocks == os.stat(chain).st_blocks
    daemon.stop()

    tail = [e for e in qemu_map(chain) if e["start"] + e["length"] > 64 * MiB]
    assert [(e["start"], e["length"], e["depth"], e["data"]) for e in tail] == [
        (64 * MiB, 6 * MiB, 0, True)
    ]
    report = check_clean(chain, daemon.log())
    assert report["image-end-offset"] >= 6 * MiB


def test_locks_while_the_daemon_holds_the_image(chain: Path, export: Callable[..., ExportDaemon]):
    """The read-write image and its read-only backing files are locked as QEMU locks them:
    host tools get QEMU's own error texts, and -U (force share) or read-only opens work."""
    daemon = export(chain)
    top, base = str(chain), str(chain.with_name("s-base.qcow2"))
    cwd = chain.parent

    info = run([QEMU_IMG, "info", top], cwd=cwd, check=False)
    assert info.returncode == 1
    assert info.stderr == (
        f"qemu-img: Could not open '{top}': Failed to get shared \"write\" lock\n"
        f"Is another process using the image [{top}]?\n"
    )
    shared = run([QEMU_IMG, "info", "-U", top], cwd=cwd)
    assert "backing file: s-mid.qcow2" in shared.stdout
    assert run([QEMU_IMG, "info", base], cwd=cwd).returncode == 0

    write = run([QEMU_IO, "-c", "write 0 4k", base], cwd=cwd, check=False)
    assert write.returncode == 1
    assert write.stderr == (
        f'qemu-io: can\'t open device {base}: Failed to get "write" lock\n'
        f"Is another process using the image [{base}]?\n"
    )
    assert run([QEMU_IO, "-r", "-c", "read 0 4k", base], cwd=cwd).returncode == 0
    top_write = run([QEMU_IO, "-c", "write 0 4k", top], cwd=cwd, check=False)
    assert top_write.returncode == 1 and 'Failed to get "write" lock' in top_write.stderr
    daemon.stop()
    assert run([QEMU_IMG, "info", top], cwd=cwd).returncode == 0  # released on exit
