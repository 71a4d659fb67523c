"""Lengths in whole 512-byte sectors, as QEMU's block layer counts them.

Every figure here was measured on QEMU 11.1's daemon (query-named-block-nodes virtual-size
and the FUSE export's size) with the same files and options.
"""

from __future__ import annotations

import pytest

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import round_to_sectors

MiB = 1 << 20


@pytest.mark.parametrize(
    ("nbytes", "rounded"), [(0, 0), (1, 512), (511, 512), (512, 512), (MiB + 1, MiB + 512)]
)
def test_round_to_sectors(nbytes: int, rounded: int) -> None:
    assert round_to_sectors(nbytes) == rounded


@pytest.mark.parametrize("cache_direct", [False, True])
async def test_file_tail_reads_zeroes(graph: BlockGraph, image, cache_direct: bool) -> None:
    path = image(MiB + 1, data=b"\xab" * (MiB + 1))
    node = await graph.add(
        {
            "driver": "file",
            "node-name": "f0",
            "filename": str(path),
            "cache": {"direct": cache_direct},
        }
    )
    assert node.length() == MiB + 512
    assert node.info()["image"]["virtual-size"] == MiB + 512
    buf = bytearray(b"\xff" * 1024)
    await node.read(MiB - 512, memoryview(buf))
    assert buf == b"\xab" * 513 + bytes(511)
    assert path.stat().st_size == MiB + 1  # reading the tail does not touch the file


async def test_file_write_in_tail_extends_only_to_data(graph: BlockGraph, image) -> None:
    path = image(MiB + 1)
    node = await graph.add({"driver": "file", "node-name": "f0", "filename": str(path)})
    await node.write(MiB + 1, b"\x11" * 100)
    assert path.stat().st_size == MiB + 101
    assert node.length() == MiB + 512


@pytest.mark.parametrize(("size", "length"), [(MiB + 1, MiB + 512), (MiB + 1001, MiB + 1024)])
async def test_truncate_unaligned(graph: BlockGraph, image, size: int, length: int) -> None:
    path = image(MiB)
    node = await graph.add({"driver": "file", "node-name": "f0", "filename": str(path)})
    node.add_user("e0", write=True)
    await node.truncate(size)
    assert path.stat().st_size == size  # the file gets exactly what was asked
    assert node.length() == length


@pytest.mark.parametrize(
    ("file_size", "offset", "length"),
    [(MiB + 1, 0, MiB + 512), (MiB + 1, 1, MiB + 512), (MiB, 600, MiB - 512)],
)
async def test_raw_over_unaligned(
    graph: BlockGraph, image, file_size: int, offset: int, length: int
) -> None:
    path = image(file_size)
    raw = await graph.add(
        {
            "driver": "raw",
            "node-name": "r0",
            "offset": offset,
            "file": {"driver": "file", "filename": str(path)},
        }
    )
    assert raw.length() == length
    buf = bytearray(b"\xff" * 512)
    await raw.read(length - 512, memoryview(buf))  # the last sector, partly past the file
    assert buf == bytes(512)


async def test_raw_window_may_use_the_files_last_partial_sector(graph: BlockGraph, image) -> None:
    """offset+size is checked against the rounded length of the file, as in QEMU."""
    path = image(MiB + 1)
    raw = await graph.add(
        {
            "driver": "raw",
            "node-name": "r0",
            "offset": 1,
            "size": MiB,
            "file": {"driver": "file", "filename": str(path)},
        }
    )
    assert raw.length() == MiB


async def test_raw_truncate_unaligned(graph: BlockGraph, image) -> None:
    path = image(MiB + 1)
    raw = await graph.add(
        {
            "driver": "raw",
            "node-name": "r0",
            "offset": 1,
            "file": {"driver": "file", "filename": str(path)},
        }
    )
    raw.add_user("e0", write=True)
    await raw.truncate(MiB + 7)
    assert path.stat().st_size == MiB + 8
    assert raw.length() == MiB + 512


@pytest.mark.parametrize("read_zeroes", [False, True])
async def test_null_size_rounded(graph: BlockGraph, read_zeroes: bool) -> None:
    node = await graph.add(
        {"driver": "null-co", "node-name": "n0", "size": 1000, "read-zeroes": read_zeroes}
    )
    assert node.length() == 1024
    assert node.info()["image"]["virtual-size"] == 1024
