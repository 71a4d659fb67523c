"""The qcow2 node's cluster table and the exports' one fast-path decision, in-process:
what a READ or WRITE becomes for each kind of cluster, and that a cluster is not freed while
a fast-path reader may still use it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from images import check, create, snapshot, write, write_zeroes

from qsd_py.block import fast_map
from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import BlockNode
from qsd_py.export.fuse import fastpath
from qsd_py.export.fuse import proto as p
from qsd_py.export.fuse.engine import FuseEngine

KiB, MiB = 1 << 10, 1 << 20


async def open_qcow2(graph: BlockGraph, path: Path, **extra) -> BlockNode:
    opts = {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(path)}}
    return await graph.add({**opts, **extra})


def request(offset: int, size: int) -> memoryview:
    arg = bytearray(p.READ_IN.size)
    p.IO_EXTENT.pack_into(arg, 0, offset, size)
    return memoryview(arg)


async def host_offset(node: BlockNode, offset: int) -> int:
    st = await node.block_status(offset, 4096)
    assert st.map_node is not None
    return st.map_offset


async def test_what_each_cluster_becomes(graph: BlockGraph, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "1M")
    write(base, 0, MiB, 0x11)
    img = create(tmp_path / "a.qcow2", "1M", backing="base.qcow2")
    write(img, 0, 128 * KiB, 0x22)  # clusters 0-1: this image's own
    write_zeroes(img, 128 * KiB, 64 * KiB)  # cluster 2 reads as zeroes
    snapshot(img, "s")  # clusters 0-1 shared with the snapshot from now on
    write(img, 192 * KiB, 64 * KiB, 0x33)  # cluster 3: allocated after the snapshot
    node = await open_qcow2(graph, img)
    buf = memoryview(bytearray(MiB))
    await node.read(0, buf)  # loads the L2 slices: the table learns them
    engine = FuseEngine(node, writable=True)
    plan = fastpath.plan_for(node)
    assert plan is not None and plan.table is not None
    decide = fastpath.decide

    shared = decide(engine, plan, request(4 * KiB, 4 * KiB), MiB, False)
    assert shared == (fastpath.TRANSFER, await host_offset(node, 4 * KiB), 4 * KiB)
    plan.done()
    assert decide(engine, plan, request(4 * KiB, 4 * KiB), MiB, True)[0] == fastpath.ENGINE
    own = decide(engine, plan, request(200 * KiB, 4 * KiB), MiB, True)
    assert own == (fastpath.TRANSFER, await host_offset(node, 200 * KiB), 4 * KiB)
    plan.done()
    assert decide(engine, plan, request(130 * KiB, 8 * KiB), MiB, False) == (
        fastpath.FILL,
        8 * KiB,
        1,
    )
    assert decide(engine, plan, request(130 * KiB, 8 * KiB), MiB, True)[0] == fastpath.ENGINE
    # Unallocated over a backing file, and a read across clusters 2 and 3 (zero + data).
    assert decide(engine, plan, request(512 * KiB, 4 * KiB), MiB, False)[0] == fastpath.ENGINE
    assert decide(engine, plan, request(190 * KiB, 8 * KiB), MiB, False)[0] == fastpath.ENGINE
    counts = plan.counts
    assert counts is not None
    assert counts[plan.started_at] == counts[plan.started_at + 1]  # nothing left in flight
    plan.release()


async def test_contiguous_clusters_make_one_transfer(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", "1M", preallocation="metadata")
    node = await open_qcow2(graph, img)
    await node.read(0, memoryview(bytearray(4096)))
    engine = FuseEngine(node, writable=True)
    plan = fastpath.plan_for(node)
    assert plan is not None
    action, pos, size = fastpath.decide(engine, plan, request(60 * KiB, 256 * KiB), MiB, False)
    assert (action, pos, size) == (fastpath.TRANSFER, await host_offset(node, 60 * KiB), 256 * KiB)
    plan.done()
    write = fastpath.decide(engine, plan, request(60 * KiB, 64 * KiB), 64 * KiB, True)
    assert write == (fastpath.TRANSFER, await host_offset(node, 60 * KiB), 64 * KiB)
    plan.done()
    plan.release()


async def test_discard_waits_for_a_fast_reader(
    graph: BlockGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that routed a write by the table keeps the cluster from being freed until
    it finished; one that never finishes makes the node leak the cluster, never reuse it."""
    img = create(tmp_path / "a.qcow2", "1M")
    write(img, 0, MiB, 0x44)
    node = await open_qcow2(graph, img, discard="unmap")
    await node.read(0, memoryview(bytearray(4096)))
    engine = FuseEngine(node, writable=True)
    plan = fastpath.plan_for(node)
    assert plan is not None
    action, pos, _ = fastpath.decide(engine, plan, request(0, 4096), MiB, True)
    assert action == fastpath.TRANSFER
    discard = asyncio.ensure_future(node.discard(0, 64 * KiB))
    await asyncio.sleep(0.05)
    assert not discard.done()  # waiting for the reader's write
    assert plan.entries is not None and not plan.entries[0] & fast_map.WRITABLE
    plan.done()
    await asyncio.wait_for(discard, 5)
    # The freed cluster is not handed out while the second reader is stuck: it leaks.
    monkeypatch.setattr(fast_map, "BARRIER_TIMEOUT_S", 0.2)
    action, pos2, _ = fastpath.decide(engine, plan, request(64 * KiB, 4096), MiB, True)
    assert action == fastpath.TRANSFER
    await node.discard(64 * KiB, 64 * KiB)
    await node.write(0, b"\x55" * 128 * KiB)  # allocates two clusters
    assert await host_offset(node, 0) != pos2 - (pos2 % (64 * KiB))
    assert await host_offset(node, 64 * KiB) != pos2 - (pos2 % (64 * KiB))
    plan.done()
    plan.release()
    await graph.delete("q")
    code, report = check(img)
    assert code in (0, 3), report  # 3: leaked clusters only
    assert report.get("leaks", 0) <= 1 and not report.get("corruptions")


async def test_a_fresh_image_reads_zeroes_on_the_fast_path(
    graph: BlockGraph, tmp_path: Path
) -> None:
    """Ranges with no L2 table yet read as zeroes without the node (nothing to load)."""
    node = await open_qcow2(graph, create(tmp_path / "f.qcow2", "1G"))
    engine = FuseEngine(node, writable=True)
    plan = fastpath.plan_for(node)
    assert plan is not None
    for offset in (0, 700 * MiB, (1 << 30) - 4096):
        assert fastpath.decide(engine, plan, request(offset, 4096), MiB, False) == (
            fastpath.FILL,
            4096,
            1,
        )
        assert fastpath.decide(engine, plan, request(offset, 4096), MiB, True)[0] == (
            fastpath.ENGINE
        )
    await node.write(700 * MiB, b"\x01" * 4096)  # allocates: the entry rises to data
    action, pos, _ = fastpath.decide(engine, plan, request(700 * MiB, 4096), MiB, False)
    assert (action, pos) == (fastpath.TRANSFER, await host_offset(node, 700 * MiB))
    plan.done()
    plan.release()


async def test_prepare_fast_write(graph: BlockGraph, tmp_path: Path) -> None:
    """What a queue worker asks for a write into fresh clusters: host clusters of zeroes,
    writable in place; refused where data would have to be copied (a backing file)."""
    img = create(tmp_path / "p.qcow2", "4M")
    node = await open_qcow2(graph, img)
    engine = FuseEngine(node, writable=True)
    plan = fastpath.plan_for(node)
    assert plan is not None
    assert fastpath.all_zeroes(plan, 100 * KiB, 64 * KiB)
    assert await node.prepare_fast_write(100 * KiB, 64 * KiB)  # two clusters
    assert not fastpath.all_zeroes(plan, 100 * KiB, 64 * KiB)
    action, pos, size = fastpath.decide(engine, plan, request(100 * KiB, 60 * KiB), MiB, True)
    assert (action, pos) == (fastpath.TRANSFER, await host_offset(node, 100 * KiB))
    plan.done()
    data = bytearray(128 * KiB)
    await node.read(64 * KiB, memoryview(data))
    assert data == bytes(128 * KiB)
    plan.release()
    await graph.delete("q")
    assert check(img)[0] == 0
    base = create(tmp_path / "b.qcow2", "4M")
    top = create(tmp_path / "t.qcow2", "4M", backing="b.qcow2")
    node = await graph.add(
        {"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "filename": str(top)}}
    )
    assert not await node.prepare_fast_write(0, 4096)
    assert base.exists()


def test_publish_run_sets_entries_and_marks_lowered_ones() -> None:
    """A run published in one go sets each entry as :meth:`publish` would, clips at the
    table's end, and asks for a barrier only when an entry lost rights or moved."""
    table = fast_map.ClusterTable(16, 8)
    try:
        ok = fast_map.VALID | fast_map.WRITABLE
        zeroes = fast_map.VALID | fast_map.ZERO
        table.publish_range(0, 4, zeroes)
        table.dirty = False
        table.publish_run(0, [ok | (1 << 16), ok | (2 << 16)])
        assert list(table.entries[0:3]) == [ok | (1 << 16), ok | (2 << 16), zeroes]
        assert table.dirty  # zeroes -> data: a reader may still answer zeroes
        table.dirty = False
        table.publish_run(5, [ok | (3 << 16), ok | (4 << 16)])
        assert not table.dirty  # unknown -> data only raises
        table.publish_run(0, [fast_map.VALID | (1 << 16)])
        assert table.dirty  # write right taken away
        end = table.capacity
        table.publish_run(end - 1, [ok | (5 << 16), ok | (6 << 16)])
        assert table.entries[end - 1] == ok | (5 << 16)
    finally:
        table.close()
