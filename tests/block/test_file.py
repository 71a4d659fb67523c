"""The file driver on real files: I/O, holes, zeroing, truncation, O_DIRECT, open errors."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from support import extent

from qsd_py.block.drivers.file import FileNode
from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError

MiB = 1 << 20


async def add_file(graph: BlockGraph, path: Path, name: str = "f0", **extra: Any) -> FileNode:
    node = await graph.add({"driver": "file", "node-name": name, "filename": str(path), **extra})
    assert isinstance(node, FileNode)
    return node


async def test_read_write_roundtrip(graph: BlockGraph, image) -> None:
    path = image(MiB)
    node = await add_file(graph, path)
    payload = os.urandom(100_000)
    await node.write(12345, payload)
    await node.flush()
    assert path.read_bytes()[12345 : 12345 + len(payload)] == payload
    buf = bytearray(len(payload) + 10)
    await node.read(12340, memoryview(buf))
    assert buf[5:-5] == payload and buf[:5] == bytes(5)


async def test_read_fills_caller_buffer_in_place(graph: BlockGraph, image) -> None:
    node = await add_file(graph, image(MiB, data=b"abcdef"))
    backing = bytearray(b"?" * 16)
    await node.read(0, memoryview(backing)[4:10])
    assert backing == b"????abcdef??????"


async def test_sparse_file_block_status(graph: BlockGraph, image) -> None:
    path = image(4 * MiB)
    node = await add_file(graph, path)
    await node.write(MiB, b"d" * 65536)
    assert extent(await node.block_status(0, 4 * MiB)) == (False, MiB)
    is_data, n = extent(await node.block_status(MiB, 4 * MiB))
    assert is_data and n >= 65536 and MiB + n <= 4 * MiB
    assert extent(await node.block_status(3 * MiB, 4096)) == (False, 4096)
    assert await node.allocated_size() >= 65536


@pytest.mark.parametrize("discard", ["unmap", "ignore"])
async def test_write_zeroes_unmap_deallocates_only_with_discard_unmap(
    graph: BlockGraph, image, discard: str
) -> None:
    path = image(2 * MiB)
    node = await add_file(graph, path, discard=discard)
    await node.write(0, b"x" * (2 * MiB))
    await node.flush()
    before = await node.allocated_size()
    await node.write_zeroes(MiB, 512 * 1024, unmap=True)
    after = await node.allocated_size()
    buf = bytearray(512 * 1024)
    await node.read(MiB, memoryview(buf))
    assert buf == bytes(len(buf))
    if discard == "unmap":
        assert after <= before - 512 * 1024
        assert extent(await node.block_status(MiB, MiB)) == (False, 512 * 1024)
    else:
        assert after == before  # zeroed in place (ZERO_RANGE or written): still allocated
    assert path.stat().st_size == 2 * MiB


async def test_discard(graph: BlockGraph, image) -> None:
    ign = await add_file(graph, image(MiB, name="a", data=b"y" * MiB), name="ign")
    unm = await add_file(graph, image(MiB, name="b", data=b"y" * MiB), name="unm", discard="unmap")
    await ign.discard(0, MiB)
    await unm.discard(0, MiB)
    assert (Path(ign.path).read_bytes()) == b"y" * MiB  # discard=ignore: untouched
    assert extent(await unm.block_status(0, MiB)) == (False, MiB)
    assert await unm.allocated_size() == 0


async def test_truncate_grow_and_shrink(graph: BlockGraph, image) -> None:
    path = image(MiB, data=b"z" * MiB)
    node = await add_file(graph, path)
    await node.truncate(3 * MiB)
    assert node.length() == 3 * MiB == path.stat().st_size
    buf = bytearray(4096)
    await node.read(2 * MiB, memoryview(buf))
    assert buf == bytes(4096)
    assert extent(await node.block_status(MiB, 2 * MiB)) == (False, 2 * MiB)
    await node.truncate(1000)
    assert path.stat().st_size == 1000
    assert node.length() == 1024  # whole sectors, as in QEMU


async def test_read_only_node_refuses_writes(graph: BlockGraph, image) -> None:
    node = await add_file(graph, image(MiB), **{"read-only": True})
    with pytest.raises(OSError) as exc:
        await node.write(0, b"x")
    assert exc.value.errno == 30  # EROFS
    with pytest.raises(OSError, match="Image is read-only"):
        await node.truncate(0)


async def test_io_from_another_loop(graph: BlockGraph, image) -> None:
    """The contract: I/O may be awaited from an iothread's loop as well as the main one."""
    node = await add_file(graph, image(MiB))
    result: list[bytes] = []

    def worker() -> None:
        async def io() -> None:
            await asyncio.gather(*(node.write(i * 4096, bytes([i]) * 4096) for i in range(64)))
            buf = bytearray(64 * 4096)
            await node.read(0, memoryview(buf))
            result.append(bytes(buf))

        asyncio.run(io())

    t = threading.Thread(target=worker)
    t.start()
    await asyncio.get_running_loop().run_in_executor(None, t.join)
    assert result == [b"".join(bytes([i]) * 4096 for i in range(64))]


# --- O_DIRECT ---------------------------------------------------------------------------
async def test_direct_io_aligned_and_unaligned(graph: BlockGraph, image) -> None:
    path = image(MiB + 1000)  # a size that is not a multiple of the sector size
    node = await add_file(graph, path, cache={"direct": True})
    assert node.align >= 512 and node.mem_align >= 1
    assert node.info()["cache"]["direct"] is True
    ref = bytearray(MiB + 1000)
    for offset, length in [(0, 4096), (1, 10), (511, 514), (4000, 70000), (MiB + 900, 100)]:
        data = os.urandom(length)
        await node.write(offset, data)
        ref[offset : offset + length] = data
    backing = bytearray(8192 + 1)
    unaligned = memoryview(backing)[1:]  # caller buffer at an odd address
    await node.read(0, unaligned)
    assert unaligned == ref[:8192]
    out = bytearray(100)
    await node.read(MiB + 900, memoryview(out))
    assert out == ref[MiB + 900 :]
    assert path.stat().st_size == MiB + 1000  # the read-modify-write did not grow the file
    assert path.read_bytes() == ref


async def test_direct_write_zeroes_fallback_is_aligned(graph: BlockGraph, image) -> None:
    path = image(MiB, data=b"q" * MiB)
    node = await add_file(graph, path, cache={"direct": True})
    await node.write_zero_buffers(100, 5000)  # the path used when fallocate cannot zero
    data = path.read_bytes()
    assert data[100:5100] == bytes(5000) and data[:100] == b"q" * 100 and data[5100] == ord("q")


# --- open errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"filename": "{tmp}/nope"}, "Could not open '{tmp}/nope': No such file or directory"),
        ({"filename": "{tmp}"}, "Could not open '{tmp}': Is a directory"),
        (
            {"aio": "native"},
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ),
        (
            {"aio": "native", "cache": {"direct": True}},
            "aio=native was specified, but is not supported in this build.",
        ),
    ],
)
async def test_open_errors(
    graph: BlockGraph, image, tmp_path: Path, extra: dict[str, Any], error: str
) -> None:
    path = image()
    opts = {"driver": "file", "node-name": "f0", "filename": str(path)}
    opts |= {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in extra.items()}
    with pytest.raises(QMPError) as exc:
        await graph.add(opts)
    assert exc.value.desc == error.format(tmp=tmp_path)
    assert len(graph) == 0


async def test_failed_open_leaks_no_fd(graph: BlockGraph, image) -> None:
    path = image()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(QMPError):
            await add_file(graph, path, aio="native")
    assert len(os.listdir("/proc/self/fd")) == before
