"""The qcow2 driver against QEMU's own tools: what it reads equals ``qemu-img convert``,
what it writes ``qemu-img check`` finds clean and ``qemu-img compare`` finds equal to a model.

Nodes run in the test's loop (no export): these are block-layer tests. The images are made
and checked by the host's qemu-img (QEMU 7.2)."""

from __future__ import annotations

import asyncio
import errno
import json
import random
from pathlib import Path
from typing import Any

import pytest
from images import QEMU_IMG, check, create, info, run, snapshot, to_raw, write, write_zeroes

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import STATUS_DATA, STATUS_ZERO, BlockNode
from qsd_py.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20


def qcow2_opts(path: Path, name: str = "q", **extra: Any) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


async def read_all(node: BlockNode) -> bytes:
    buf = bytearray(node.length())
    view = memoryview(buf)
    step = 256 * KiB
    for pos in range(0, len(buf), step):
        await node.read(pos, view[pos : pos + step])
    return bytes(buf)


def patterns(path: Path, spots: list[tuple[int, int]]) -> None:
    for i, (offset, length) in enumerate(spots):
        write(path, offset, length, 0x10 + i)


SPOTS = [(0, 4 * KiB), (70 * KiB, 100 * KiB), (1 * MiB - 512, 1024), (3 * MiB, 64 * KiB)]


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": 512},
        {"cluster_size": 2 * MiB},
        {"cluster_size": 4096, "refcount_bits": 1},
        {"refcount_bits": 64},
        {"extended_l2": True},
        {"extended_l2": True, "cluster_size": 16 * KiB},
        {"lazy_refcounts": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
async def test_reads_equal_qemu_img(graph: BlockGraph, tmp_path: Path, opts: dict) -> None:
    img = create(tmp_path / "a.qcow2", "4M", **opts)
    patterns(img, SPOTS)
    write_zeroes(img, 3 * MiB + 4 * KiB, 8 * KiB)
    expect = to_raw(img, tmp_path / "a.raw")
    node = await graph.add(qcow2_opts(img, **{"read-only": True}))
    assert node.length() == 4 * MiB
    assert await read_all(node) == expect


async def test_backing_chain_of_three(graph: BlockGraph, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    write(base, 0, 2 * MiB, 0xAA)
    mid = create(tmp_path / "mid.qcow2", "4M", backing="base.qcow2")
    write(mid, 64 * KiB, 4 * KiB, 0xBB)
    write_zeroes(mid, 512 * KiB, 64 * KiB)
    top = create(tmp_path / "top.qcow2", "6M", backing="mid.qcow2")
    write(top, 100 * KiB, 1000, 0xCC)
    expect = to_raw(top, tmp_path / "top.raw")
    node = await graph.add(qcow2_opts(top))
    chain = [n.node_name for n in graph]
    assert len(chain) == 6  # three qcow2 nodes and their files, the backing ones implicit
    backing = node.child_node("backing")
    assert backing is not None and backing.read_only
    assert await read_all(node) == expect
    st = await node.block_status_above(100 * KiB, 4 * KiB)  # top's cluster (copied whole)
    assert st.depth == 1 and st.flags & STATUS_DATA
    st = await node.block_status_above(512 * KiB, 4 * KiB)  # mid's zero cluster
    assert st.depth == 2 and st.flags & STATUS_ZERO
    st = await node.block_status_above(1 * MiB, 4 * KiB)
    assert st.depth == 3


@pytest.mark.parametrize("entry_size", [None, 4096])
async def test_block_status_without_l2_table_to_the_slice_end(
    graph: BlockGraph, tmp_path: Path, entry_size: int | None
) -> None:
    """Where no L2 table exists the status is one answer up to the end of the L2 slice (a
    table's 512 MiB with 64 KiB clusters, 32 MiB with 4 KiB cache entries), as QEMU
    counts; where a table exists its entries are walked."""
    img = create(tmp_path / "a.qcow2", "2G")
    write(img, 600 * MiB, 4 * KiB, 0x5A)  # the second table only
    extra = {} if entry_size is None else {"l2-cache-entry-size": entry_size}
    node = await graph.add(qcow2_opts(img, **extra))
    span = 512 * MiB if entry_size is None else 32 * MiB
    st = await node.block_status_above(0, 2 << 30)
    assert (st.flags, st.length) == (STATUS_ZERO, span)
    st = await node.block_status_above(5 * MiB, 2 << 30)
    assert (st.flags, st.length) == (STATUS_ZERO, span - 5 * MiB)
    st = await node.block_status_above(512 * MiB, 2 << 30)  # a table: 64 clusters a step
    assert (st.flags, st.length) == (STATUS_ZERO, 4 * MiB)
    st = await node.block_status_above(600 * MiB, 2 << 30)
    assert st.flags & STATUS_DATA and st.length == 64 * KiB
    st = await node.block_status_above(1 << 30, 2 << 30)
    assert (st.flags, st.length) == (STATUS_ZERO, span)


class Model:
    """A bytearray that the same requests are applied to."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def write(self, offset: int, payload: bytes) -> None:
        self.data[offset : offset + len(payload)] = payload

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)


async def random_requests(
    node: BlockNode, model: Model, rng: random.Random, count: int, grain: int
) -> None:
    size = node.length()
    for i in range(count):
        op = rng.random()
        offset = rng.randrange(0, size // grain) * grain + rng.choice([0, 0, 512, grain // 2])
        offset = min(offset, size - 512)
        length = min(rng.choice([512, 4 * KiB, grain, 3 * grain + 512]), size - offset)
        if op < 0.6:
            payload = bytes([i % 251 + 1]) * length
            await node.write(offset, payload)
            model.write(offset, payload)
        elif op < 0.8:
            await node.write_zeroes(offset, length, unmap=rng.random() < 0.5)
            model.zero(offset, length)
        elif op < 0.9:
            await node.discard(offset, length)
            # Discard leaves what it cannot drop; whole clusters read as zeroes after
            # (QEMU discards no less, subclusters or not).
            cs = node.cluster_size  # type: ignore[attr-defined]
            start = -(-offset // cs) * cs
            end = (offset + length) // cs * cs
            if end > start:
                model.zero(start, end - start)
        else:
            await node.flush()


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": 512},
        {"cluster_size": 4096, "refcount_bits": 1},
        {"cluster_size": 1024, "refcount_bits": 2},
        {"refcount_bits": 64},
        {"extended_l2": True},
        {"lazy_refcounts": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
async def test_random_writes_keep_the_image_clean(
    graph: BlockGraph, tmp_path: Path, opts: dict
) -> None:
    img = create(tmp_path / "w.qcow2", "2M", **opts)
    patterns(img, [(0, 64 * KiB), (1 * MiB, 200 * KiB)])
    model = Model(to_raw(img, tmp_path / "before.raw"))
    node = await graph.add(qcow2_opts(img, discard="unmap"))
    grain = node.cluster_size
    if opts.get("extended_l2"):
        grain //= 32
    rng = random.Random(str(opts))
    await random_requests(node, model, rng, 300, grain)
    assert await read_all(node) == bytes(model.data)
    await graph.delete("q")
    code, report = check(img)
    assert code == 0, report
    assert to_raw(img, tmp_path / "after.raw") == bytes(model.data)


async def test_writes_over_a_backing_file(graph: BlockGraph, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "2M")
    write(base, 0, 2 * MiB, 0x5A)
    top = create(tmp_path / "top.qcow2", "2M", backing="base.qcow2")
    model = Model(to_raw(top, tmp_path / "before.raw"))
    node = await graph.add(qcow2_opts(top, discard="unmap"))
    rng = random.Random(7)
    await random_requests(node, model, rng, 200, node.cluster_size)
    assert await read_all(node) == bytes(model.data)
    await graph.delete("q")
    assert check(top)[0] == 0
    assert to_raw(top, tmp_path / "after.raw") == bytes(model.data)
    assert to_raw(base, tmp_path / "base.raw") == b"\x5a" * 2 * MiB  # never written


async def test_snapshot_clusters_are_copied_before_a_write(
    graph: BlockGraph, tmp_path: Path
) -> None:
    img = create(tmp_path / "s.qcow2", "1M")
    write(img, 0, 1 * MiB, 0x11)
    snapshot(img, "before")
    node = await graph.add(qcow2_opts(img))
    await node.write(4 * KiB, b"\x22" * 4 * KiB)
    await node.write(512 * KiB, b"\x33" * 100)
    await graph.delete("q")
    assert check(img)[0] == 0
    now = to_raw(img, tmp_path / "now.raw")
    assert now[4 * KiB : 8 * KiB] == b"\x22" * 4 * KiB and now[: 4 * KiB] == b"\x11" * 4 * KiB
    run([QEMU_IMG, "snapshot", "-a", "before", str(img)])
    assert to_raw(img, tmp_path / "old.raw") == b"\x11" * MiB


async def test_grow(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "g.qcow2", "1M", cluster_size=512)
    node = await graph.add(qcow2_opts(img))
    await node.truncate(300 * MiB)  # the L1 table (one entry per 32 KiB) must grow
    await node.write(299 * MiB, b"\x44" * 4096)
    await graph.delete("q")
    assert check(img)[0] == 0
    assert info(img)["virtual-size"] == 300 * MiB


async def test_grow_with_preallocation(graph: BlockGraph, tmp_path: Path) -> None:
    """A FUSE fallocate past the end asks for this (QEMU's export does the same): the new
    clusters are allocated, read as zeroes, and the host file covers them."""
    base = create(tmp_path / "base.qcow2", "2M")
    write(base, 0, 2 * MiB, 0x66)
    img = create(tmp_path / "p.qcow2", "1M", backing="base.qcow2")
    node = await graph.add(qcow2_opts(img))
    await node.truncate(4 * MiB, "falloc")
    data = bytearray(4 * MiB)
    await node.read(0, memoryview(data))
    assert data[: 1 * MiB] == b"\x66" * MiB and data[MiB:] == bytes(3 * MiB)
    await graph.delete("q")
    assert check(img)[0] == 0
    mapped = json.loads(run([QEMU_IMG, "map", "--output=json", str(img)], tmp_path))
    top = [m for m in mapped if m["depth"] == 0 and m["start"] >= MiB]
    assert sum(m["length"] for m in top) == 3 * MiB  # allocated in the image itself
    assert img.stat().st_blocks * 512 >= 3 * MiB


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
async def test_compressed_clusters(graph: BlockGraph, tmp_path: Path, ctype: str) -> None:
    """Reads decompress; a write into a compressed cluster copies it into a new one."""
    from images import compressible_data, convert_compressed, raw_file

    src = raw_file(tmp_path / "src.raw", compressible_data(2 * MiB))
    img = convert_compressed(src, tmp_path / "c.qcow2", compression_type=ctype)
    expect = to_raw(img, tmp_path / "expect.raw")
    node = await graph.add(qcow2_opts(img))
    assert await read_all(node) == expect
    model = Model(expect)
    await node.write(70 * KiB, b"\x77" * 1000)
    model.write(70 * KiB, b"\x77" * 1000)
    await node.write_zeroes(256 * KiB, 64 * KiB)
    model.zero(256 * KiB, 64 * KiB)
    assert await read_all(node) == bytes(model.data)
    await graph.delete("q")
    assert check(img)[0] == 0
    assert to_raw(img, tmp_path / "after.raw") == bytes(model.data)


async def test_zeroing_part_of_a_cluster(graph: BlockGraph, tmp_path: Path) -> None:
    """As QEMU 11.1 (iotests 015): part of a cluster holding no data, whose rest reads as
    zeroes, makes the whole cluster a zero one (nothing allocated); part of a data cluster,
    or of one the backing file fills, gets zeroes written as data, which ``no_fallback``
    (a FUSE punch-hole) refuses with ENOTSUP, changing nothing."""
    base = create(tmp_path / "base.qcow2", "4M")
    write(base, 0, MiB, 0x11)
    top = create(tmp_path / "top.qcow2", "4M", backing="base.qcow2")
    write(top, 2 * MiB, 64 * KiB, 0x22)
    node = await graph.add(qcow2_opts(top))
    await node.write_zeroes(3 * MiB + 4 * KiB, 4 * KiB)
    await node.write_zeroes(3 * MiB + 132 * KiB, 4 * KiB, unmap=True, no_fallback=True)
    for offset in (2 * MiB + 4 * KiB, 32 * KiB):
        with pytest.raises(OSError) as exc:
            await node.write_zeroes(offset, 4 * KiB, unmap=True, no_fallback=True)
        assert exc.value.errno == errno.ENOTSUP
    assert await read_all(node) == (
        b"\x11" * MiB + bytes(MiB) + b"\x22" * 64 * KiB + bytes(2 * MiB - 64 * KiB)
    )
    await node.write_zeroes(32 * KiB, 4 * KiB)  # copy-on-write of the backing file's data
    await graph.delete("q")
    assert check(top)[0] == 0
    extents = {e["start"]: e for e in json.loads(run([QEMU_IMG, "map", "--output=json", str(top)]))}
    zero_cluster = {"length": 64 * KiB, "depth": 0, "present": True, "zero": True, "data": False}
    for start in (3 * MiB, 3 * MiB + 128 * KiB):
        assert {k: extents[start].get(k) for k in zero_cluster} == zero_cluster
        assert "offset" not in extents[start]
    assert extents[0]["depth"] == 0 and extents[0]["data"] and extents[0]["length"] == 64 * KiB
    assert extents[2 * MiB]["data"] and extents[2 * MiB]["length"] == 64 * KiB


@pytest.mark.parametrize("raw", [False, True])
async def test_external_data_file(graph: BlockGraph, tmp_path: Path, raw: bool) -> None:
    img = create(tmp_path / "d.qcow2", "2M", data_file="d.data", data_file_raw=raw)
    write(img, 0, 64 * KiB, 0x12)
    model = Model(to_raw(img, tmp_path / "before.raw"))
    node = await graph.add(qcow2_opts(img, discard="unmap"))
    assert node.child_node("data-file") is not None
    rng = random.Random(11)
    await random_requests(node, model, rng, 150, node.cluster_size)
    assert await read_all(node) == bytes(model.data)
    await graph.delete("q")
    assert check(img)[0] == 0
    assert to_raw(img, tmp_path / "after.raw") == bytes(model.data)
    if raw:  # the data file is the guest's disk itself
        data = (tmp_path / "d.data").read_bytes()
        assert data.ljust(2 * MiB, b"\0")[: 2 * MiB] == bytes(model.data)


async def test_backing_given_or_refused(graph: BlockGraph, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "1M")
    write(base, 0, MiB, 0x21)
    top = create(tmp_path / "top.qcow2", "1M", backing="base.qcow2")
    node = await graph.add(qcow2_opts(top, backing=None, **{"read-only": True}))
    assert node.child_node("backing") is None
    assert await read_all(node) == bytes(MiB)  # nothing shows through
    await graph.delete("q")
    other = create(tmp_path / "other.qcow2", "1M")
    write(other, 0, MiB, 0x31)
    await graph.add(qcow2_opts(other, "b", **{"read-only": True}))
    node = await graph.add(qcow2_opts(top, backing="b"))
    assert node.child_node("backing") is graph.lookup("b")
    assert await read_all(node) == b"\x31" * MiB


@pytest.mark.parametrize("explicit", [False, True])
async def test_block_resize_of_a_backing_node_is_busy(
    graph: BlockGraph, tmp_path: Path, explicit: bool
) -> None:
    """QEMU 11.1's answer (iotests 016): the blocker's text, not the read-only error."""
    from qsd_py.block import commands

    base = create(tmp_path / "base.qcow2", "1M")
    top = create(tmp_path / "top.qcow2", "1M", backing="base.qcow2")
    if explicit:
        await graph.add(qcow2_opts(base, "b"))
        await graph.add(qcow2_opts(top, "t", backing="b"))
    else:
        await graph.add(qcow2_opts(top, "t"))
    name = graph.lookup("t").child_node("backing").node_name
    daemon = type("Daemon", (), {"graph": graph})()
    with pytest.raises(QMPError) as exc:
        await commands.block_resize(daemon, {"node-name": name, "size": 2 * MiB})
    assert exc.value.desc == f"Node '{name}' is busy: node is used as backing hd of 't'"
    assert graph.lookup(name).length() == MiB


async def test_cache_clean_interval(graph: BlockGraph, tmp_path: Path) -> None:
    """An idle image gives back the cache pieces nobody used since the last tick."""
    img = create(tmp_path / "c.qcow2", "4M", cluster_size=4096)
    write(img, 0, 4 * MiB, 0x42)
    node = await graph.add(qcow2_opts(img, **{"cache-clean-interval": 1}))
    await read_all(node)
    assert len(node.map.cache) > 1
    await asyncio.sleep(2.3)  # one tick marks them unused, the next drops them
    assert len(node.map.cache) == 0


@pytest.mark.parametrize("read_only", [False, True])
async def test_backing_loop_is_refused(graph: BlockGraph, tmp_path: Path, read_only: bool) -> None:
    """QEMU refuses a read-write loop by the image's own lock and never returns from a
    read-only one; both are errors here."""
    a = create(tmp_path / "a.qcow2", "1M")
    create(tmp_path / "b.qcow2", "1M", backing="a.qcow2")
    run([QEMU_IMG, "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a)], tmp_path)
    with pytest.raises(QMPError) as exc:
        await asyncio.wait_for(graph.add(qcow2_opts(a, **{"read-only": read_only})), 10)
    if read_only:
        assert exc.value.desc.startswith("Could not open backing file: Could not open backing")
        assert "a loop" in exc.value.desc
    else:
        assert exc.value.desc == (
            "Could not open backing file: Could not open backing file: "
            'Failed to get shared "write" lock'
        )
    assert len(graph) == 0


async def test_backing_errors_name_the_backing_file(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "m.qcow2", "1M")
    run([QEMU_IMG, "rebase", "-u", "-b", "nonexistent.qcow2", "-F", "qcow2", str(img)], tmp_path)
    with pytest.raises(QMPError) as exc:
        await graph.add(qcow2_opts(img))
    missing = tmp_path / "nonexistent.qcow2"
    assert exc.value.desc == (
        f"Could not open backing file: Could not open '{missing}': No such file or directory"
    )
    with pytest.raises(QMPError) as exc:
        await graph.add(qcow2_opts(img, backing="nosuch"))
    assert exc.value.desc == (
        "Could not open backing file: Cannot find device='nosuch' nor node-name='nosuch'"
    )


@pytest.mark.parametrize("new_size", [0, 512 * KiB, 700 * KiB + 512, 3 * MiB])
async def test_shrink_then_grow(graph: BlockGraph, tmp_path: Path, new_size: int) -> None:
    """QMP's block_resize shrinks a qcow2 node in QEMU: the clusters past the new end are
    gone and read as zeroes when the node grows again; the rest of the cluster holding the
    new end keeps its bytes (QEMU 11.1 leaves them, and they show again)."""
    img = create(tmp_path / "s.qcow2", "8M", cluster_size=512 * KiB)
    write(img, 0, 8 * MiB, 0x5C)
    node = await graph.add(qcow2_opts(img))
    await node.truncate(new_size)
    assert node.length() == new_size
    await node.truncate(8 * MiB)
    data = await read_all(node)
    kept = -(-new_size // (512 * KiB)) * 512 * KiB
    assert data == b"\x5c" * kept + bytes(8 * MiB - kept)
    await graph.delete("q")
    code, report = check(img)
    assert code == 0, report
    assert to_raw(img, tmp_path / "after.raw") == data


async def test_v2_with_snapshots_is_not_resized(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "v2.qcow2", "1M", compat="0.10")
    snapshot(img, "s")
    node = await graph.add(qcow2_opts(img))
    for size in (2 * MiB, 512 * KiB):
        with pytest.raises(OSError, match="^.*Can't resize a v2 image which has snapshots"):
            await node.truncate(size)


async def test_grow_beyond_the_l1_limit(graph: BlockGraph, tmp_path: Path) -> None:
    node = await graph.add(qcow2_opts(create(tmp_path / "h.qcow2", "1M")))
    with pytest.raises(OSError) as exc:
        await node.truncate(1 << 60)
    assert exc.value.strerror == "Failed to grow the L1 table: File too large"
    assert node.length() == MiB


async def test_concurrent_allocating_writes(graph: BlockGraph, tmp_path: Path) -> None:
    """Writes to the same fresh clusters at once: each cluster is allocated once, no
    write is lost, the refcounts stay right."""
    base = create(tmp_path / "base.qcow2", "4M")
    write(base, 0, 4 * MiB, 0x3C)
    img = create(tmp_path / "c.qcow2", "4M", backing="base.qcow2")
    model = Model(b"\x3c" * 4 * MiB)
    node = await graph.add(qcow2_opts(img, discard="unmap"))
    rng = random.Random(5)
    chunks = list(range(0, 4 * MiB, 4 * KiB))
    rng.shuffle(chunks)
    writes = []
    for i, pos in enumerate(chunks[:600]):
        payload = bytes([i % 250 + 1]) * 4 * KiB
        model.write(pos, payload)
        writes.append(node.write(pos, payload))
    await asyncio.gather(*writes)
    assert await read_all(node) == bytes(model.data)
    await graph.delete("q")
    assert check(img)[0] == 0
    assert to_raw(img, tmp_path / "after.raw") == bytes(model.data)
