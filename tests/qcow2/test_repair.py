"""Opening a dirty image read-write repairs its refcounts, as QEMU 11.1 does.

The dirty images are made for real: the host's qemu-io writes to an image with lazy refcounts
and then aborts (the refcount updates it held back never reach the file, the dirty bit
stays), or a clean image gets its refcounts edited and the dirty bit set by hand. Before the
open ``qemu-img check`` finds the damage; after the driver opened and closed the image it
finds none, the guest data is what ``qemu-img convert`` read before, and the lines printed
are QEMU's (the expected ones were checked against QEMU 11.1's own repair of the same images,
which also left byte-identical files).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import damage
import pytest
from images import (
    QEMU_IMG,
    QEMU_IO,
    check,
    compressible_data,
    convert_compressed,
    create,
    raw_file,
    run,
    snapshot,
    to_raw,
    write,
)

from qsd_py.block.graph import BlockGraph
from qsd_py.block.qcow2.header import parse_header
from qsd_py.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def crash_after(img: Path, *commands: str) -> None:
    """qemu-io runs ``commands`` on the image, then aborts as if the host had crashed."""
    argv = [QEMU_IO, "-f", "qcow2"]
    for command in (*commands, "abort"):
        argv += ["-c", command]
    argv.append(str(img))
    done = subprocess.run(argv, capture_output=True, text=True, cwd=img.parent, timeout=60)
    assert done.returncode != 0, "qemu-io was meant to abort"


def header(img: Path):  # noqa: ANN201 - the parsed header
    with open(img, "rb") as f:
        return parse_header(f.read(1 << 16), read_only=True)


async def open_and_close(graph: BlockGraph, img: Path, **extra: object) -> None:
    opts = {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    await graph.add({**opts, **extra})
    await graph.delete("q")


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


async def repaired(
    graph: BlockGraph,
    img: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect: bytes | None = None,
) -> list[str]:
    """Open the dirty image read-write and close it; check the repair; return the lines.
    The guest data must be ``expect``, by default what qemu-img convert read before."""
    assert header(img).dirty
    code, report = check(img)
    assert code in (2, 3), report  # corruptions or leaks before
    if expect is None:
        expect = to_raw(img, tmp_path / "before.raw")  # a read-only open: no repair
    capsys.readouterr()
    await open_and_close(graph, img)
    lines = stderr_lines(capsys)
    code, report = check(img)
    assert code == 0, report
    assert not header(img).dirty
    assert to_raw(img, tmp_path / "after.raw") == expect
    return lines


async def test_crash_with_lazy_refcounts_is_repaired(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = create(tmp_path / "d.qcow2", "64M", lazy_refcounts=True)
    crash_after(img, "write -P 5 0 64k", "write -P 6 1M 128k")
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines == [
        "ERROR cluster 5 refcount=0 reference=1",
        "ERROR cluster 6 refcount=0 reference=1",
        "ERROR cluster 7 refcount=0 reference=1",
        "Rebuilding refcount structure",
        "Repairing cluster 1 refcount=1 reference=0",
        "Repairing cluster 2 refcount=1 reference=0",
    ]


async def test_crash_with_snapshots_and_compressed_clusters(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Compressed clusters share host clusters (and span sectors of two), a snapshot shares
    them all again: the counts must come out as qemu-img check wants them."""
    src = raw_file(tmp_path / "src.raw", compressible_data(300 * KiB), 4 * MiB)
    img = convert_compressed(src, tmp_path / "c.qcow2", lazy_refcounts=True)
    snapshot(img, "s1")
    crash_after(img, "write -P 7 64k 64k", "write -P 8 2M 100k", "write -z 128k 64k")
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines == [
        "Leaked cluster 4 refcount=2 reference=1",
        "Leaked cluster 5 refcount=10 reference=8",
        "ERROR cluster 10 refcount=0 reference=1",
        "ERROR cluster 11 refcount=0 reference=1",
        "ERROR cluster 12 refcount=0 reference=1",
        "Rebuilding refcount structure",
        "Repairing cluster 1 refcount=1 reference=0",
        "Repairing cluster 2 refcount=1 reference=0",
    ]
    run([QEMU_IMG, "snapshot", "-a", "s1", str(img)])
    assert to_raw(img, tmp_path / "s1.raw") == to_raw(src, tmp_path / "src-copy.raw")


@pytest.mark.parametrize(
    ("opts", "size", "writes"),
    [
        ({"cluster_size": 512, "refcount_bits": 64}, "8M", ["write -P 5 0 3M"]),
        ({"cluster_size": 4096, "refcount_bits": 1}, "8M", ["write -P 5 0 1M", "write 5M 512k"]),
        ({"cluster_size": 512}, "64M", ["write -P 5 0 20M"]),
        ({"extended_l2": True}, "8M", ["write 0 4k", "write 1M 100k", "write -z 3M 64k"]),
        ({"compat": "1.1", "cluster_size": 2 * MiB}, "16M", ["write 0 3M"]),
    ],
    ids=["512-64bit", "4k-1bit", "512-many-blocks", "extended-l2", "2M"],
)
async def test_rebuild_in_other_geometries(
    graph: BlockGraph,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    opts: dict,
    size: str,
    writes: list[str],
) -> None:
    """Many refcount blocks (the new ones must count themselves and the new table), narrow
    and wide refcounts, subclusters, big clusters."""
    img = create(tmp_path / "g.qcow2", size, lazy_refcounts=True, **opts)
    crash_after(img, *writes)
    lines = await repaired(graph, img, tmp_path, capsys)
    assert "Rebuilding refcount structure" in lines


async def test_bitmaps_are_counted(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = create(tmp_path / "b.qcow2", "8M", lazy_refcounts=True)
    run([QEMU_IMG, "bitmap", "--add", str(img), "b0"])
    run([QEMU_IMG, "bitmap", "--add", "-g", "65536", str(img), "b1"])
    write(img, 0, 4 * MiB, 5)  # the bitmaps get tables and data clusters
    crash_after(img, "write -P 6 6M 1M")
    await repaired(graph, img, tmp_path, capsys)
    assert len(run([QEMU_IMG, "info", str(img)]).split("name: b")) == 3


def refblock_cell(img: Path, cluster: int) -> int:
    """File offset of a cluster's 16-bit refcount (first refcount block, 64 KiB clusters)."""
    table = damage.get(img, "refcount_table_offset")
    return (damage.peek_u64(img, table) & OFFSET_MASK) + 2 * cluster


def l2_entry(img: Path, index: int) -> int:
    return damage.l2_entry_offset(img, index)


def set_dirty(img: Path) -> None:
    damage.put(img, "incompatible_features", damage.get(img, "incompatible_features") | 1)


async def test_leak_is_given_back(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = create(tmp_path / "l.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    damage.poke(img, refblock_cell(img, 5), b"\0\3")
    set_dirty(img)
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines == [
        "Leaked cluster 5 refcount=3 reference=1",
        "Repairing cluster 5 refcount=3 reference=1",
    ]


async def test_count_too_low_is_raised(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster shared with a snapshot, its count dropped to 1: fixed in place (no
    rebuild), and the COPIED flag stays off."""
    img = create(tmp_path / "s.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    snapshot(img, "s1")
    damage.poke(img, refblock_cell(img, 5), b"\0\1")
    set_dirty(img)
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines == [
        "ERROR cluster 5 refcount=1 reference=2",
        "Repairing cluster 5 refcount=1 reference=2",
    ]


async def test_copied_flags_are_set_right(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = create(tmp_path / "c.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    l1 = damage.get(img, "l1_table_offset")
    damage.poke_u64(img, l1, damage.peek_u64(img, l1) & ~damage.COPIED)
    damage.poke_u64(img, l2_entry(img, 0), damage.peek_u64(img, l2_entry(img, 0)) & ~damage.COPIED)
    set_dirty(img)
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines == [
        "Repairing OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=40000 refcount=1",
        "Repairing OFLAG_COPIED data cluster: l2_entry=50000 refcount=1",
    ]
    assert damage.peek_u64(img, l1) & damage.COPIED
    assert damage.peek_u64(img, l2_entry(img, 0)) & damage.COPIED


async def test_unaligned_preallocated_zero_cluster_becomes_plain_zero(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = create(tmp_path / "z.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    entry = damage.peek_u64(img, l2_entry(img, 1))
    damage.poke_u64(img, l2_entry(img, 1), entry + 0x201)  # zero flag, 512 bytes off
    set_dirty(img)
    expect = b"\5" * 64 * KiB + bytes(4 * MiB - 64 * KiB)  # (QEMU cannot read it before)
    lines = await repaired(graph, img, tmp_path, capsys, expect)
    assert lines == [
        "Repairing offset=60200: Preallocated cluster is not properly aligned; L2 entry corrupted.",
        "Leaked cluster 6 refcount=1 reference=0",
        "Repairing cluster 6 refcount=1 reference=0",
    ]
    assert damage.peek_u64(img, l2_entry(img, 1)) == 1  # QCOW_OFLAG_ZERO alone


async def test_refcount_block_outside_the_file_grows_it(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = create(tmp_path / "o.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    damage.poke_u64(img, damage.get(img, "refcount_table_offset") + 8, 1 * MiB)
    set_dirty(img)
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines[0] == "Repairing refcount block 1 is outside image"
    assert img.stat().st_size >= MiB + 64 * KiB


async def test_dirty_image_from_the_damage_corpus(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = damage.DAMAGES["dirty-bit-lazy-refcounts"].make(tmp_path)
    lines = await repaired(graph, img, tmp_path, capsys)
    assert lines[:2] == ["ERROR cluster 5 refcount=0 reference=1", "Rebuilding refcount structure"]


async def test_corruption_left_keeps_data_but_not_the_dirty_bit(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unaligned data cluster cannot be repaired: the open succeeds, the error is printed
    again after the rebuild, and QEMU still marks the image clean when it closes it."""
    img = create(tmp_path / "u.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    entry = damage.peek_u64(img, l2_entry(img, 1))
    damage.poke_u64(img, l2_entry(img, 1), entry + 0x200)
    set_dirty(img)
    capsys.readouterr()
    await open_and_close(graph, img)
    assert stderr_lines(capsys) == [
        "ERROR offset=60200: Data cluster is not properly aligned; L2 entry corrupted.",
        "ERROR cluster 7 refcount=0 reference=1",
        "Rebuilding refcount structure",
        "ERROR offset=60200: Data cluster is not properly aligned; L2 entry corrupted.",
        "Repairing cluster 1 refcount=1 reference=0",
        "Repairing cluster 2 refcount=1 reference=0",
    ]
    code, report = check(img)
    assert code == 2 and report["corruptions"] == 1, report
    assert not header(img).dirty


async def test_failed_repair_refuses_the_open(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refcount table entry with reserved bits: the rebuild would put a refcount block
    where the old one still is; QEMU's overlap check stops it and the open fails."""
    img = create(tmp_path / "f.qcow2", "4M")
    write(img, 0, 128 * KiB, 5)
    table = damage.get(img, "refcount_table_offset")
    damage.poke_u64(img, table, damage.peek_u64(img, table) | 1)
    set_dirty(img)
    capsys.readouterr()
    with pytest.raises(QMPError, match="^Could not repair dirty image: Input/output error$"):
        await open_and_close(graph, img)
    assert stderr_lines(capsys)[-2:] == [
        "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps "
        "with refcount block); further corruption events will be suppressed",
        "qsd-py: ERROR writing refblock: Input/output error",
    ]
    assert header(img).dirty and header(img).corrupt


async def test_read_only_open_repairs_nothing(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "r.qcow2", "64M", lazy_refcounts=True)
    crash_after(img, "write -P 5 0 64k")
    before = img.read_bytes()
    await open_and_close(graph, img, **{"read-only": True})
    assert img.read_bytes() == before
