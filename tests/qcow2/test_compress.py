"""Compressed clusters: QEMU's zlib (raw deflate, 4 KiB window) and zstd streams."""

from __future__ import annotations

import errno
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import images
import pytest
import zstandard

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.compress import (
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    CompressedClusterError,
    compress_cluster,
    decompress_cluster,
)
from qsd_py.block.qcow2.header import parse_header

K = 1024
CLUSTER = 64 * K
DATA = images.compressible_data(4 * CLUSTER)


def compressed_clusters(img: Path) -> list[tuple[int, bytes]]:
    """(guest cluster index, compressed bytes as the descriptor delimits them) of an image."""
    raw = img.read_bytes()
    h = parse_header(raw)
    l1 = int.from_bytes(raw[h.l1_table_offset : h.l1_table_offset + 8], "big")
    l2 = raw[e.l1_l2_offset(l1) :][: h.cluster_size]
    found = []
    for i in range(h.size // h.cluster_size):
        entry = e.read_l2_entry(l2, i, h.extended_l2)
        if e.cluster_type(entry, h.extended_l2) == e.CLUSTER_COMPRESSED:
            offset, length = e.compressed_range(entry, h.cluster_bits)
            found.append((i, raw[offset : offset + length]))
    return found


@pytest.mark.parametrize(
    ("ctype", "name", "cluster_size"),
    [
        (COMPRESSION_ZLIB, "zlib", 64 * K),
        (COMPRESSION_ZLIB, "zlib", 512),
        (COMPRESSION_ZLIB, "zlib", 2 * K * K),
        (COMPRESSION_ZSTD, "zstd", 64 * K),
        (COMPRESSION_ZSTD, "zstd", 4 * K),
        (COMPRESSION_ZSTD, "zstd", 2 * K * K),
    ],
)
def test_qemu_img_clusters_decompress(
    ctype: int, name: str, cluster_size: int, tmp_path: Path
) -> None:
    data = images.compressible_data(2 * cluster_size + cluster_size // 2, seed=cluster_size)
    src = images.raw_file(tmp_path / "src.raw", data, 4 * cluster_size)
    img = images.convert_compressed(
        src, tmp_path / "img.qcow2", compression_type=name, cluster_size=cluster_size
    )
    found = compressed_clusters(img)
    assert [i for i, _ in found] == [0, 1, 2]
    padded = data + bytes(cluster_size)
    for i, stream in found:
        expected = padded[i * cluster_size : (i + 1) * cluster_size]
        assert decompress_cluster(stream, cluster_size, ctype) == expected


def test_zlib_compression_is_byte_identical_to_qemus(tmp_path: Path) -> None:
    """Same zlib parameters as QEMU (and the same system zlib): the same stream."""
    src = images.raw_file(tmp_path / "src.raw", DATA)
    img = images.convert_compressed(src, tmp_path / "img.qcow2")
    for i, stream in compressed_clusters(img):
        mine = compress_cluster(DATA[i * CLUSTER : (i + 1) * CLUSTER], COMPRESSION_ZLIB)
        assert stream[: len(mine)] == mine
        assert len(stream) - 512 < len(mine) <= len(stream)


@pytest.mark.parametrize("ctype", [COMPRESSION_ZLIB, COMPRESSION_ZSTD])
def test_round_trip_with_trailing_bytes(ctype: int) -> None:
    cluster = DATA[:CLUSTER]
    stream = compress_cluster(cluster, ctype)
    assert len(stream) < CLUSTER
    assert decompress_cluster(stream, CLUSTER, ctype) == cluster
    # the descriptor rounds up to sectors: whatever follows the stream is ignored
    assert decompress_cluster(stream + b"\xff" * 511, CLUSTER, ctype) == cluster
    assert decompress_cluster(memoryview(stream + bytes(100)), CLUSTER, ctype) == cluster


@pytest.mark.parametrize("ctype", [COMPRESSION_ZLIB, COMPRESSION_ZSTD])
def test_truncated_stream_is_eio(ctype: int) -> None:
    stream = compress_cluster(DATA[:CLUSTER], ctype)
    with pytest.raises(CompressedClusterError) as err:
        decompress_cluster(stream[: len(stream) // 2], CLUSTER, ctype)
    assert err.value.errno == errno.EIO
    assert isinstance(err.value, OSError)


@pytest.mark.parametrize("ctype", [COMPRESSION_ZLIB, COMPRESSION_ZSTD])
def test_garbage_is_eio(ctype: int) -> None:
    with pytest.raises(CompressedClusterError):
        decompress_cluster(bytes(range(256)) * 8, CLUSTER, ctype)
    with pytest.raises(CompressedClusterError):
        decompress_cluster(b"", CLUSTER, ctype)


@pytest.mark.parametrize("ctype", [COMPRESSION_ZLIB, COMPRESSION_ZSTD])
def test_stream_of_a_smaller_cluster_is_eio(ctype: int) -> None:
    stream = compress_cluster(DATA[: CLUSTER // 2], ctype)
    with pytest.raises(CompressedClusterError):
        decompress_cluster(stream, CLUSTER, ctype)


def test_zlib_stream_longer_than_the_cluster_gives_its_start() -> None:
    """QEMU's inflate stops with the cluster full (Z_BUF_ERROR is accepted): so do we."""
    stream = compress_cluster(DATA[: 2 * CLUSTER], COMPRESSION_ZLIB)
    assert decompress_cluster(stream, CLUSTER, COMPRESSION_ZLIB) == DATA[:CLUSTER]


def test_zstd_frame_longer_than_the_cluster_is_eio() -> None:
    """QEMU's zstd loop ends with the frame unfinished: an error."""
    for frame in (
        zstandard.ZstdCompressor().compress(DATA[: 2 * CLUSTER]),
        zstandard.ZstdCompressor(write_content_size=False).compress(DATA[: 2 * CLUSTER]),
    ):
        with pytest.raises(CompressedClusterError):
            decompress_cluster(frame, CLUSTER, COMPRESSION_ZSTD)


def test_zlib_window_is_4k() -> None:
    """A deflate stream using a 32 KiB window (distances over 4 KiB) is refused."""
    block = DATA[:8192]
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = deflate.compress(block * 8) + deflate.flush()
    with pytest.raises(CompressedClusterError):
        decompress_cluster(stream, CLUSTER, COMPRESSION_ZLIB)


def test_zstd_several_frames_and_skippable_ones() -> None:
    cctx = zstandard.ZstdCompressor()
    parts = [DATA[:1000], DATA[1000:40000], DATA[40000:CLUSTER]]
    skippable = struct.pack("<II", 0x184D2A53, 5) + b"12345"
    stream = cctx.compress(parts[0]) + skippable + b"".join(cctx.compress(p) for p in parts[1:])
    assert decompress_cluster(stream + b"junk", CLUSTER, COMPRESSION_ZSTD) == DATA[:CLUSTER]
    checksummed = zstandard.ZstdCompressor(write_checksum=True).compress(DATA[:CLUSTER])
    assert decompress_cluster(checksummed, CLUSTER, COMPRESSION_ZSTD) == DATA[:CLUSTER]


def test_zstd_bombs_fail_fast() -> None:
    """A frame claiming (or producing) far more than a cluster is refused, not inflated."""
    huge = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    assert len(huge) < 8192
    with pytest.raises(CompressedClusterError):
        decompress_cluster(huge, CLUSTER, COMPRESSION_ZSTD)
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(CompressedClusterError):
        decompress_cluster(streamed, CLUSTER, COMPRESSION_ZSTD)


def test_unknown_compression_type() -> None:
    with pytest.raises(CompressedClusterError):
        decompress_cluster(b"x", CLUSTER, 2)
    with pytest.raises(ValueError):
        compress_cluster(b"x", 2)


def test_zstandard_is_imported_lazily() -> None:
    """The daemon imports the driver at start-up; the zstd binding only comes with a zstd
    cluster."""
    code = (
        "import sys; import qsd_py.block.qcow2.compress as c; "
        "assert 'zstandard' not in sys.modules; "
        "c.decompress_cluster(c.compress_cluster(bytes(512), c.COMPRESSION_ZLIB), 512, 0); "
        "assert 'zstandard' not in sys.modules; "
        "c.decompress_cluster(c.compress_cluster(bytes(512), c.COMPRESSION_ZSTD), 512, 1); "
        "assert 'zstandard' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
