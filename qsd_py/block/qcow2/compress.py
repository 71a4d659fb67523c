"""Compressed qcow2 clusters: inflate them as QEMU does, and deflate them (for tests, and writes).

zlib clusters are raw deflate streams with a 4 KiB window (window bits -12, no zlib header);
zstd clusters are one or more zstd frames. Both are read from a byte range rounded up to whole
512-byte sectors, so bytes after the stream are normal and ignored: decompression stops as soon
as the cluster is complete. It fails (``CompressedClusterError``, an OSError with EIO, as QEMU
fails the read) when the stream is corrupt, ends early, or, for zstd, leaves the frame that
completes the cluster unfinished.

The zstd binding (``zstandard``) is imported the first time a zstd cluster is met, not when the
daemon starts.
"""

from __future__ import annotations

import errno
import struct
import zlib
from typing import Any

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
ZLIB_WINDOW_BITS = -12  # raw deflate, 4 KiB window: what QEMU writes and reads

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
_ZSTD_SKIPPABLE_MAGIC = 0x184D2A50


class CompressedClusterError(OSError):
    """A compressed cluster that does not decompress to a whole cluster (EIO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def decompress_cluster(
    data: bytes | bytearray | memoryview, cluster_size: int, compression_type: int
) -> bytes:
    """Exactly ``cluster_size`` bytes from the compressed bytes read for one cluster."""
    if compression_type == COMPRESSION_ZLIB:
        return _inflate(data, cluster_size)
    if compression_type == COMPRESSION_ZSTD:
        return _zstd_decompress(bytes(data), cluster_size)
    raise CompressedClusterError(f"unknown compression type {compression_type}")


def compress_cluster(data: bytes | bytearray | memoryview, compression_type: int) -> bytes:
    """The compressed form of a cluster, as QEMU makes it.

    zlib: default level, window bits -12, memory level 9 (QEMU's deflateInit2 arguments);
    zstd: one frame at zstd's default level. The caller stores the cluster uncompressed when
    the result is not shorter than the cluster, as QEMU does.
    """
    if compression_type == COMPRESSION_ZLIB:
        deflate = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WINDOW_BITS, 9, zlib.Z_DEFAULT_STRATEGY
        )
        return deflate.compress(data) + deflate.flush()
    if compression_type == COMPRESSION_ZSTD:
        return _zstd().ZstdCompressor().compress(bytes(data))
    raise ValueError(f"unknown compression type {compression_type}")


def _inflate(data: bytes | bytearray | memoryview, cluster_size: int) -> bytes:
    inflate = zlib.decompressobj(ZLIB_WINDOW_BITS)
    try:
        out = inflate.decompress(data, cluster_size)
    except zlib.error as err:
        raise CompressedClusterError(f"corrupt compressed cluster: {err}") from err
    if len(out) != cluster_size:
        raise CompressedClusterError(
            f"compressed cluster holds {len(out)} bytes, not {cluster_size}"
        )
    return out


def _zstd() -> Any:
    import zstandard  # imported on first use: it costs the daemon's start-up otherwise

    return zstandard


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    """Frames one after the other until the cluster is full.

    Each frame's extent is found from its headers, so it is decompressed on its own with at most
    the bytes still missing as output: a corrupt frame can neither run past the cluster nor make
    a huge allocation. A frame that would give more than the missing bytes is an error (QEMU's
    decoder stops with the frame unfinished and fails the read).
    """
    zstandard = _zstd()
    out = bytearray()
    pos = 0
    while len(out) < cluster_size:
        end, skippable = _zstd_frame_end(data, pos)
        if not skippable:
            out += _zstd_frame(zstandard, data[pos:end], cluster_size - len(out))
        pos = end
    return bytes(out)


def _zstd_frame(zstandard: Any, frame: bytes, missing: int) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > missing:
            raise CompressedClusterError("zstd frame larger than the rest of the cluster")
        return zstandard.ZstdDecompressor().decompress(frame, max_output_size=missing)
    except zstandard.ZstdError as err:
        raise CompressedClusterError(f"corrupt compressed cluster: {err}") from err


_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # flag 0 with a single segment: 1 byte


def _zstd_frame_end(data: bytes, pos: int) -> tuple[int, bool]:
    """(end, skippable) of the zstd frame starting at ``pos``, walking its block headers."""
    _need(data, pos + 4)
    (magic,) = struct.unpack_from("<I", data, pos)
    if magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_MAGIC:
        _need(data, pos + 8)
        return _need(data, pos + 8 + struct.unpack_from("<I", data, pos + 4)[0]), True
    if magic != _ZSTD_MAGIC:
        raise CompressedClusterError(f"no zstd frame at byte {pos} of the compressed cluster")
    descriptor = data[_need(data, pos + 5) - 1]
    single_segment = descriptor >> 5 & 1
    pos += 5 + (1 - single_segment) + _DICT_ID_BYTES[descriptor & 3]
    pos += _CONTENT_SIZE_BYTES[descriptor >> 6] or single_segment
    while True:
        _need(data, pos + 3)
        block = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        block_type = block >> 1 & 3
        if block_type == 3:
            raise CompressedClusterError("reserved zstd block type")
        pos += 3 + (1 if block_type == 1 else block >> 3)
        if block & 1:  # last block
            break
    if descriptor >> 2 & 1:  # content checksum
        pos += 4
    return _need(data, pos), False


def _need(data: bytes, end: int) -> int:
    """``end``, if the data reaches that far."""
    if end > len(data):
        raise CompressedClusterError("compressed cluster ends before the cluster is complete")
    return end
