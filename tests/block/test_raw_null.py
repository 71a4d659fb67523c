"""raw windows over a file, and null-co."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from support import extent

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError

MiB = 1 << 20


async def test_raw_window_io(graph: BlockGraph, image) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB of a pattern
    path = image(MiB, data=data)
    raw = await graph.add(
        {
            "driver": "raw",
            "node-name": "r0",
            "offset": 4096,
            "size": 8192,
            "file": {"driver": "file", "filename": str(path)},
        }
    )
    assert raw.length() == 8192
    buf = bytearray(8192)
    await raw.read(0, memoryview(buf))
    assert buf == data[4096 : 4096 + 8192]
    await raw.write(100, b"W" * 50)
    assert path.read_bytes()[4196:4246] == b"W" * 50
    assert path.read_bytes()[:4096] == data[:4096]  # outside the window: untouched
    info = raw.info()
    assert json.loads(info["file"].removeprefix("json:")) == {
        "offset": 4096,
        "driver": "raw",
        "size": 8192,
        "file": {"driver": "file", "filename": str(path)},
    }
    with pytest.raises(OSError, match="Cannot resize fixed-size raw disks$"):
        await raw.truncate(4096)


async def test_raw_offset_follows_file_length(graph: BlockGraph, image) -> None:
    path = image(MiB)
    await graph.add({"driver": "file", "node-name": "f0", "filename": str(path)})
    raw = await graph.add({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 512})
    assert raw.length() == MiB - 512
    raw.add_user("e0", write=True)
    await raw.truncate(2 * MiB)
    assert raw.length() == 2 * MiB and path.stat().st_size == 2 * MiB + 512
    await raw.write(0, b"x" * 512)
    is_data, n = extent(await raw.block_status(0, 8192))  # the file's extent, shifted by the offset
    assert is_data and 512 <= n <= 8192 - 512


async def test_raw_write_zeroes_respects_its_own_discard(graph: BlockGraph, image) -> None:
    path = image(MiB, data=b"x" * MiB)
    for name, discard in (("ign", "ignore"), ("unm", "unmap")):
        raw = await graph.add(
            {
                "driver": "raw",
                "node-name": name,
                "discard": discard,
                "file": {"driver": "file", "filename": str(path), "locking": "off"},
            }
        )
        await raw.write_zeroes(0, 65536, unmap=True)
        is_data, _ = extent(await raw.block_status(0, 65536))
        allocated = await raw.allocated_size()
        if discard == "unmap":
            assert not is_data and allocated <= MiB - 65536
        else:
            assert allocated == MiB  # zeroed, not deallocated
        buf = bytearray(65536)
        await raw.read(0, memoryview(buf))
        assert buf == bytes(65536)
        await raw.write(0, b"x" * 65536)  # restore for the next round
        await raw.flush()


@pytest.mark.parametrize(
    ("opts", "error"),
    [
        (
            {"offset": 2000000},
            "Offset (2000000) cannot be greater than size of the containing file (1048576)",
        ),
        (
            {"offset": 4096, "size": 2000000},
            "The sum of offset (4096) and size (2000000) has to be smaller or equal to the  "
            "actual size of the containing file (1048576)",
        ),
        ({"size": 1000}, "Specified size is not multiple of 512"),
    ],
)
async def test_raw_window_errors(graph: BlockGraph, image, opts: dict, error: str) -> None:
    await graph.add({"driver": "file", "node-name": "f0", "filename": str(image(MiB))})
    with pytest.raises(QMPError) as exc:
        await graph.add({"driver": "raw", "node-name": "r0", "file": "f0", **opts})
    assert exc.value.desc == error
    assert not graph.lookup("f0").users  # the failed parent let go of its child


async def test_null_co_defaults(graph: BlockGraph) -> None:
    node = await graph.add({"driver": "null-co", "node-name": "n0"})
    assert node.length() == 1 << 30
    buf = bytearray(b"\xab" * 4096)
    await node.read(0, memoryview(buf))
    assert buf == b"\xab" * 4096  # QEMU 11.1: read-zeroes is off, the buffer is left alone
    assert extent(await node.block_status(0, 4096)) == (True, 4096)
    assert node.info()["file"] == "null-co://"
    with pytest.raises(OSError, match="Image format driver does not support resize$"):
        await node.truncate(4096)


async def test_null_co_read_zeroes_and_size(graph: BlockGraph) -> None:
    node = await graph.add(
        {"driver": "null-co", "node-name": "n0", "size": 200000, "read-zeroes": True}
    )
    buf = bytearray(b"\xab" * 200000)
    await node.read(0, memoryview(buf))
    assert buf == bytes(200000)
    assert extent(await node.block_status(0, 4096)) == (False, 4096)
    await node.write(0, b"ignored")
    assert node.length() == 200192  # rounded up to whole sectors, as in QEMU
    assert node.info()["file"] == 'json:{"read-zeroes": true, "driver": "null-co", "size": 200000}'


async def test_null_co_latency(graph: BlockGraph) -> None:
    node = await graph.add({"driver": "null-co", "node-name": "n0", "latency-ns": 50_000_000})
    start = time.monotonic()
    await asyncio.gather(*(node.read(0, memoryview(bytearray(512))) for _ in range(10)))
    elapsed = time.monotonic() - start
    assert 0.05 <= elapsed < 0.5  # concurrent requests wait side by side, not in a queue
