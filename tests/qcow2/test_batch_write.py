"""Multi-cluster writes into fresh clusters go as one batch per L2 slice (allocate.py's
write_fresh): the data before the entries, zeroes only around the data in reused clusters.
Nodes run in the test's loop; the host's qemu-img checks the result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from images import check, create, to_raw

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import STATUS_DATA

KiB, MiB = 1 << 10, 1 << 20


def _opts(path: Path, **extra: object) -> dict[str, object]:
    return {
        "driver": "qcow2",
        "node-name": "q",
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


@pytest.mark.parametrize("create_opts", [{}, {"extended_l2": True}], ids=["plain", "extended-l2"])
async def test_reused_clusters_read_zero_around_the_data(
    graph: BlockGraph, tmp_path: Path, create_opts: dict
) -> None:
    """Clusters freed without a discard reaching the file still hold old bytes; a write
    that takes them again but covers only part of its first and last cluster must leave
    the rest reading zeroes (written there, not left to the old bytes)."""
    img = create(tmp_path / "a.qcow2", "8M", **create_opts)
    opts = {"discard": "unmap", "pass-discard-request": False}
    node = await graph.add(_opts(img, **opts))
    old = memoryview(b"\xee" * MiB)
    await node.write(0, old)
    await node.discard(0, MiB)  # the host clusters are free again, their bytes stay
    data = os.urandom(3 * 64 * KiB + 1024)
    at = 4 * MiB + 3 * KiB
    await node.write(at, memoryview(data))
    got = bytearray(5 * 64 * KiB)
    await node.read(4 * MiB, memoryview(got))
    expect = bytes(3 * KiB) + data
    expect += bytes(len(got) - len(expect))
    assert bytes(got) == expect
    await graph.close_all()
    errors, result = check(img)
    assert errors == 0, result
    raw = to_raw(img, tmp_path / "a.raw")
    assert raw[4 * MiB : 4 * MiB + len(got)] == expect
    assert raw[:MiB] == bytes(MiB)


async def test_batch_over_an_l2_slice_boundary(graph: BlockGraph, tmp_path: Path) -> None:
    """With small L2 slices a write spans two: each slice's entries are set, the data of
    both lands, and the image checks clean."""
    img = create(tmp_path / "a.qcow2", "64M")
    node = await graph.add(_opts(img, **{"l2-cache-entry-size": 4096}))
    data = os.urandom(2 * MiB + 512)
    at = 31 * MiB + 512  # a slice of 4 KiB holds 512 entries: 32 MiB of guest
    await node.write(at, memoryview(data))
    got = bytearray(len(data))
    await node.read(at, memoryview(got))
    assert bytes(got) == data
    await graph.close_all()
    errors, result = check(img)
    assert errors == 0, result
    assert to_raw(img, tmp_path / "a.raw")[at : at + len(data)] == data


async def test_failed_data_write_links_nothing(graph: BlockGraph, tmp_path: Path) -> None:
    """The data goes before the entries (QEMU's order): when it fails, the range stays
    unallocated and reads zeroes, and the clusters placed for it are given back (the
    image checks clean, no leak)."""
    img = create(tmp_path / "a.qcow2", "8M")
    rule = {"event": "write_aio", "iotype": "write", "once": True}
    file = {"driver": "blkdebug", "inject-error": [rule],
            "image": {"driver": "file", "filename": str(img)}}  # fmt: skip
    node = await graph.add({"driver": "qcow2", "node-name": "q", "file": file})
    with pytest.raises(OSError):
        await node.write(2 * MiB, memoryview(os.urandom(MiB)))
    status = await node.block_status(2 * MiB, MiB)
    assert not status.flags & STATUS_DATA
    got = bytearray(MiB)
    await node.read(2 * MiB, memoryview(got))
    assert bytes(got) == bytes(MiB)
    await node.write(3 * MiB, memoryview(b"\x42" * MiB))  # the rule fired once: works now
    await graph.close_all()
    errors, result = check(img)
    assert errors == 0, result
    assert to_raw(img, tmp_path / "a.raw")[2 * MiB : 4 * MiB] == bytes(MiB) + b"\x42" * MiB
