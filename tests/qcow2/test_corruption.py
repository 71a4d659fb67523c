"""Metadata found wrong while serving requests: the image is marked corrupt as QEMU 11.1 does.

Each image is a valid one (host qemu-img) with a table entry edited. The messages, the
BLOCK_IMAGE_CORRUPTED data and the errno of later requests were recorded with QEMU 11.1's
qemu-io and qemu-storage-daemon on the same damages: a writable node prints "qcow2: Marking
image as corrupt: <msg>; further corruption events will be suppressed", emits the event with
``fatal: true``, sets the corrupt bit (v3) and fails every later request with ENOMEDIUM; a
read-only node prints "Image is corrupt", emits ``fatal: false`` once and goes on.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import damage
import pytest
from images import check, create, snapshot, write

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import BlockNode
from qsd_py.block.qcow2.header import parse_header
from qsd_py.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20
COPIED = damage.COPIED
OFFSET_MASK = damage.OFFSET_MASK


class Events(list):  # type: ignore[type-arg]
    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.append((name, data))


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph()
    g.emit_event = Events()
    try:
        yield g
    finally:
        await g.close_all()


def events(graph: BlockGraph) -> list[tuple[str, dict[str, Any]]]:
    return graph.emit_event  # type: ignore[return-value]


async def open_node(graph: BlockGraph, img: Path, **extra: Any) -> BlockNode:
    opts = {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    return await graph.add({**opts, **extra})


def header(img: Path):  # noqa: ANN201
    with open(img, "rb") as f:
        return parse_header(f.read(1 << 16), read_only=True)


def base(d: Path, **opts: Any) -> Path:
    """4 MiB; guest clusters 0 and 1 written (0x11): host clusters 5 and 6, L2 table at 4."""
    img = create(d / "img.qcow2", "4M", **opts)
    write(img, 0, 128 * KiB, 0x11)
    return img


def entry_at(img: Path, index: int) -> int:
    return damage.l2_entry_offset(img, index)


def edit_entry(img: Path, index: int, edit: Any) -> None:
    damage.poke_u64(img, entry_at(img, index), edit(damage.peek_u64(img, entry_at(img, index))))


def corrupted(msg: str, fatal: bool = True, **where: int) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {"device": "", "node-name": "q", "msg": msg, **where, "fatal": fatal}
    return ("BLOCK_IMAGE_CORRUPTED", data)


async def fails(request: Any, code: int = errno.EIO) -> None:
    with pytest.raises(OSError) as info:
        await request
    assert info.value.errno == code, info.value


# --- the whole story, once --------------------------------------------------------------


async def test_marked_corrupt_for_good(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = base(tmp_path)
    edit_entry(img, 1, lambda e: e + 0x200)  # guest cluster 1: host 0x60200
    node = await open_node(graph, img)
    buf = memoryview(bytearray(4096))
    await node.read(0, buf)  # cluster 0 is fine
    assert bytes(buf) == b"\x11" * 4096
    await fails(node.read(64 * KiB, buf))
    msg = "Cluster allocation offset 0x60200 unaligned (L2 offset: 0x40000, L2 index: 0x1)"
    assert events(graph) == [corrupted(msg)]
    assert capsys.readouterr().err == (
        f"qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed\n"
    )
    assert header(img).corrupt
    # From now on nothing works, and nothing more is reported.
    await fails(node.read(0, buf), errno.ENOMEDIUM)
    await fails(node.write(0, b"x" * 512), errno.ENOMEDIUM)
    await fails(node.flush(), errno.ENOMEDIUM)
    await fails(node.block_status(0, 4096), errno.ENOMEDIUM)
    assert len(events(graph)) == 1
    with pytest.raises(QMPError, match="^Block device q is ejected$"):
        graph.query()
    await graph.delete("q")
    with pytest.raises(QMPError, match="^qcow2: Image is corrupt; cannot be opened read/write$"):
        await open_node(graph, img)
    node = await open_node(graph, img, **{"read-only": True})
    await node.read(0, buf)
    assert bytes(buf) == b"\x11" * 4096


async def test_read_only_node_reports_once_and_goes_on(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = base(tmp_path)
    edit_entry(img, 1, lambda e: e + 0x200)
    before = img.read_bytes()
    node = await open_node(graph, img, **{"read-only": True})
    buf = memoryview(bytearray(4096))
    await fails(node.read(64 * KiB, buf))
    await fails(node.read(64 * KiB, buf))
    await node.read(0, buf)
    assert bytes(buf) == b"\x11" * 4096
    msg = "Cluster allocation offset 0x60200 unaligned (L2 offset: 0x40000, L2 index: 0x1)"
    assert events(graph) == [corrupted(msg, fatal=False)]
    assert capsys.readouterr().err == (
        f"qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed\n"
    )
    await graph.delete("q")
    assert img.read_bytes() == before


# --- QEMU's texts for each damage ---------------------------------------------------------


def l1_unaligned(d: Path) -> Path:
    img = base(d)
    l1 = damage.get(img, "l1_table_offset")
    damage.poke_u64(img, l1, damage.peek_u64(img, l1) + 0x200)
    return img


def unaligned(d: Path) -> Path:
    img = base(d)
    edit_entry(img, 1, lambda e: e + 0x200)
    return img


def unaligned_not_copied(d: Path) -> Path:
    img = base(d)
    edit_entry(img, 1, lambda e: (e + 0x200) & ~COPIED)
    return img


def zero_unaligned(d: Path) -> Path:
    img = base(d)
    edit_entry(img, 1, lambda e: e + 0x201)
    return img


def zero_in_v2(d: Path) -> Path:
    img = base(d, compat="0.10")
    edit_entry(img, 1, lambda e: e | 1)
    return img


def extended(d: Path) -> Path:
    return base(d, extended_l2=True)


def alloc_and_zero(d: Path) -> Path:
    img = extended(d)
    bitmap_at = damage.l2_entry_offset(img) + 16 + 8  # entry 1's bitmap
    damage.poke_u64(img, bitmap_at, damage.peek_u64(img, bitmap_at) | 1 << 32)
    return img


def alloc_without_cluster(d: Path) -> Path:
    img = extended(d)
    at = damage.l2_entry_offset(img) + 32 * 16  # entry 32 (guest 2 MiB), no cluster
    damage.poke_u64(img, at + 8, 1)
    return img


def with_data_file(d: Path) -> Path:
    return base(d, data_file=str(d / "img.raw"))


def compressed_with_data_file(d: Path) -> Path:
    img = with_data_file(d)
    edit_entry(img, 1, lambda e: damage.COMPRESSED | 0x10000)
    return img


def data_file_mismatch(d: Path) -> Path:
    img = with_data_file(d)
    edit_entry(img, 1, lambda e: COPIED | 0x30000)
    return img


READ, WRITE, STATUS = "read", "write", "status"
ENTRY = "(L2 offset: 0x40000, L2 index: 0x1)"
DAMAGES = [
    (l1_unaligned, READ, "L2 table offset 0x40200 unaligned (L1 index: 0)"),
    (l1_unaligned, WRITE, "L2 table offset 0x40200 unaligned (L1 index: 0)"),
    (unaligned, STATUS, f"Cluster allocation offset 0x60200 unaligned {ENTRY}"),
    (unaligned, WRITE, "Data cluster offset 0x60200 unaligned (guest offset: 0x10000)"),
    (unaligned_not_copied, WRITE, f"Cluster allocation offset 0x60200 unaligned {ENTRY}"),
    (zero_unaligned, READ, f"Cluster allocation offset 0x60200 unaligned {ENTRY}"),
    (
        zero_unaligned,
        WRITE,
        "Preallocated zero cluster offset 0x60200 unaligned (guest offset: 0x10000)",
    ),
    (zero_in_v2, READ, f"Zero cluster entry found in pre-v3 image {ENTRY}"),
    (zero_in_v2, WRITE, f"Zero cluster entry found in pre-v3 image {ENTRY}"),
    (alloc_and_zero, READ, f"Invalid cluster entry found  {ENTRY}"),
    (alloc_and_zero, WRITE, f"Invalid cluster entry found {ENTRY}"),
    (
        alloc_without_cluster,
        READ,
        "Invalid cluster entry found  (L2 offset: 0x40000, L2 index: 0x20)",
    ),
    (
        alloc_without_cluster,
        WRITE,
        "Invalid cluster entry found (L2 offset: 0x40000, L2 index: 0x20)",
    ),
    (
        compressed_with_data_file,
        READ,
        f"Compressed cluster entry found in image with external data file {ENTRY}",
    ),
    (
        data_file_mismatch,
        READ,
        "External data file host cluster offset 0x30000 does not match guest cluster offset: "
        "0x10000, L2 index: 0x1)",
    ),
]


@pytest.mark.parametrize(
    ("make", "op", "msg"), DAMAGES, ids=[f"{m.__name__}-{op}" for m, op, _ in DAMAGES]
)
async def test_qemus_message_for_each_damage(
    graph: BlockGraph, tmp_path: Path, make: Any, op: str, msg: str
) -> None:
    img = make(tmp_path)
    v3 = header(img).version == 3
    node = await open_node(graph, img)
    offset = 2 * MiB if make is alloc_without_cluster else 64 * KiB
    if op == READ:
        await fails(node.read(offset, memoryview(bytearray(4096))))
    elif op == WRITE:
        await fails(node.write(offset, b"\x33" * 4096))
    else:
        await fails(node.block_status(offset, 4096))
    assert events(graph) == [corrupted(msg)]
    await graph.delete("q")
    assert header(img).corrupt == v3  # a v2 header has no room for the bit


async def test_free_of_unaligned_cluster_is_not_fatal(graph: BlockGraph, tmp_path: Path) -> None:
    img = unaligned(tmp_path)
    node = await open_node(graph, img, discard="unmap")
    await node.discard(64 * KiB, 64 * KiB)  # succeeds; the cluster cannot be freed
    assert events(graph) == [corrupted("Cannot free unaligned cluster 0x60200", fatal=False)]
    await node.write(0, b"\x44" * 512)  # the node goes on
    await graph.delete("q")
    assert not header(img).corrupt


async def test_reserved_bits_are_left_to_qemu_img_check(graph: BlockGraph, tmp_path: Path) -> None:
    img = base(tmp_path)
    edit_entry(img, 1, lambda e: e | 1 << 56 | 2)
    node = await open_node(graph, img)
    buf = memoryview(bytearray(4096))
    await node.read(64 * KiB, buf)
    assert bytes(buf) == b"\x11" * 4096
    await node.write(64 * KiB, b"\x33" * 4096)
    assert events(graph) == []


async def test_data_file_offset_mismatch_is_written_as_qemu_does(
    graph: BlockGraph, tmp_path: Path
) -> None:
    """QEMU's write path does not compare a data file's offsets: the write goes where the
    entry says (in the data file, never on metadata)."""
    img = data_file_mismatch(tmp_path)
    node = await open_node(graph, img)
    await node.write(64 * KiB, b"\x33" * 4096)
    assert events(graph) == []
    await graph.delete("q")
    with open(tmp_path / "img.raw", "rb") as f:
        f.seek(0x30000)
        assert f.read(4096) == b"\x33" * 4096


# --- writes that would land on metadata ---------------------------------------------------


def refblock(img: Path) -> int:
    return damage.peek_u64(img, damage.get(img, "refcount_table_offset")) & OFFSET_MASK


def snapshot_l1(img: Path) -> int:
    return damage.peek_u64(img, damage.get(img, "snapshots_offset"))


TARGETS = {
    "active L1 table": lambda img: damage.get(img, "l1_table_offset"),
    "refcount table": lambda img: damage.get(img, "refcount_table_offset"),
    "refcount block": refblock,
    "active L2 table": lambda img: damage.l1_entry(img) & OFFSET_MASK,
    "snapshot table": lambda img: damage.get(img, "snapshots_offset"),
    "inactive L1 table": snapshot_l1,
}


@pytest.mark.parametrize("what", list(TARGETS))
async def test_data_write_on_metadata_is_prevented(
    graph: BlockGraph, tmp_path: Path, what: str
) -> None:
    """Guest cluster 1's entry (COPIED: written in place) points at metadata: the write
    must fail and leave every byte of the file but the corrupt bit as it was."""
    img = base(tmp_path)
    snapshot(img, "s1")
    write(img, 0, 128 * KiB, 0x12)  # the active tables move away from the snapshot's
    target = TARGETS[what](img)
    edit_entry(img, 1, lambda e: COPIED | target)
    before = img.read_bytes()
    node = await open_node(graph, img)
    await fails(node.write(64 * KiB, b"\x33" * 4096))
    msg = f"Preventing invalid write on metadata (overlaps with {what})"
    assert events(graph) == [corrupted(msg, offset=target, size=4096)]
    await graph.delete("q")
    after = img.read_bytes()
    assert after[:72] == before[:72] and after[80:] == before[80:]
    assert header(img).corrupt


@pytest.mark.parametrize(
    ("option", "caught"),
    [
        ("none", False),
        ("constant", False),
        ("cached", True),
        ({"template": "constant", "active-l2": True}, True),
        ({"active-l2": False}, False),
    ],
    ids=["none", "constant", "cached", "constant+active-l2", "cached-active-l2"],
)
async def test_overlap_check_option(
    graph: BlockGraph, tmp_path: Path, option: Any, caught: bool
) -> None:
    """Which kinds are checked is the option's business: with the active L2 tables left out,
    a data cluster on an L2 table is written (as QEMU writes it)."""
    img = base(tmp_path)
    l2 = damage.l1_entry(img) & OFFSET_MASK
    edit_entry(img, 1, lambda e: COPIED | l2)
    node = await open_node(graph, img, **{"overlap-check": option})
    if caught:
        await fails(node.write(64 * KiB, b"\x33" * 4096))
    else:
        await node.write(64 * KiB, b"\x33" * 4096)
        await graph.delete("q")
        assert img.read_bytes()[l2 : l2 + 4096] == b"\x33" * 4096
    assert bool(events(graph)) == caught


async def test_inactive_l2_tables_only_with_all(graph: BlockGraph, tmp_path: Path) -> None:
    img = base(tmp_path)
    snapshot(img, "s1")
    old_l2 = damage.l1_entry(img) & OFFSET_MASK
    write(img, 0, 4096, 0x12)  # the active L2 table is copied: the old one is inactive
    assert damage.l1_entry(img) & OFFSET_MASK != old_l2
    edit_entry(img, 1, lambda e: COPIED | old_l2)
    node = await open_node(graph, img, **{"overlap-check": "all"})
    await fails(node.write(64 * KiB, b"\x33" * 4096))
    msg = "Preventing invalid write on metadata (overlaps with inactive L2 table)"
    assert events(graph) == [corrupted(msg, offset=old_l2, size=4096)]


async def test_l2_table_on_refcount_table_is_not_written(graph: BlockGraph, tmp_path: Path) -> None:
    """L1[0] points at the refcount table: the new entry would be written there when the L2
    cache writes back, which is refused (for the whole table slice). QEMU's write fails at
    once, as freeing the old cluster makes it write its L2 cache back; here the write back
    comes with the flush."""
    img = base(tmp_path)
    table = damage.get(img, "refcount_table_offset")
    damage.poke_u64(img, damage.get(img, "l1_table_offset"), COPIED | table)
    before = img.read_bytes()
    node = await open_node(graph, img)
    try:
        await node.write(0, b"\x33" * 4096)
    except OSError as err:
        assert err.errno == errno.EIO
    else:
        await fails(node.flush())
    msg = "Preventing invalid write on metadata (overlaps with refcount table)"
    assert events(graph) == [corrupted(msg, offset=table, size=64 * KiB)]
    await graph.delete("q")
    assert img.read_bytes()[table : table + 64 * KiB] == before[table : table + 64 * KiB]


async def test_new_l2_table_on_the_l1_table_is_not_written(
    graph: BlockGraph, tmp_path: Path
) -> None:
    """The L1 table's refcount dropped to 0: the allocator hands its cluster out for a new
    L2 table. The write is refused and, unlike QEMU 11.1 (which then frees the cluster with
    a discard that wipes the L1 table), the L1 table keeps its bytes."""
    img = create(tmp_path / "img.qcow2", "4M", cluster_size=4096)
    write(img, 0, 128 * KiB, 0x11)
    l1 = damage.get(img, "l1_table_offset")
    table = damage.get(img, "refcount_table_offset")
    block = damage.peek_u64(img, table) & OFFSET_MASK
    damage.poke(img, block + 2 * (l1 >> 12), b"\0\0")
    before = img.read_bytes()
    node = await open_node(graph, img)
    await fails(node.write(3 * MiB, b"\x33" * 4096))  # guest 3 MiB: L1 index 1, no table
    msg = "Preventing invalid write on metadata (overlaps with active L1 table)"
    assert events(graph) == [corrupted(msg, offset=l1, size=4096)]
    await graph.delete("q")
    assert img.read_bytes()[l1 : l1 + 4096] == before[l1 : l1 + 4096]


async def test_freeing_a_cluster_counted_zero(
    graph: BlockGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refcount that would go below 0 is QEMU's "qcow2_free_clusters failed": reported,
    the cluster leaks, nothing is marked corrupt."""
    img = base(tmp_path)
    damage.poke(img, refblock(img) + 2 * 5, b"\0\0")
    node = await open_node(graph, img, discard="unmap")
    await node.discard(0, 64 * KiB)
    await node.write(1 * MiB, b"\x44" * 64 * KiB)
    assert "qcow2_free_clusters failed: Invalid argument\n" in capsys.readouterr().err
    assert events(graph) == []
    await graph.delete("q")
    assert check(img)[0] == 0
