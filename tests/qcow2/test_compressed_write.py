"""Compressed cluster writes (backup's ``compress``) against ``qemu-img convert -c``, which
writes the same clusters one after the other through QEMU's qcow2 driver: the image files
must be equal byte for byte. And the refusals: unaligned, overwrite."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from images import QEMU_IMG, check, run
from test_driver import qcow2_opts

from qsd_py.block.graph import BlockGraph


def guest_data(cluster: int, clusters: int, tail: int) -> bytes:
    """Clusters that compress, that do not (random), zero ones (not written), and a short
    last cluster."""
    rng = random.Random(cluster)
    parts = []
    for i in range(clusters):
        kind = i % 4
        if kind == 0:
            parts.append(bytes([i + 1]) * cluster)
        elif kind == 1:
            parts.append(rng.randbytes(cluster))
        elif kind == 2:
            parts.append(bytes(cluster))
        else:
            parts.append((b"qsd-py %d " % i) * (cluster // 8) + bytes(cluster % 8))
    parts.append(b"tail" * (tail // 4))
    return b"".join(parts)


@pytest.mark.parametrize(("cluster", "extra"), [(65536, []), (4096, ["-o", "cluster_size=4096"])])
async def test_compressed_writes_equal_qemu_img_convert(
    graph: BlockGraph, tmp_path: Path, cluster: int, extra: list[str]
) -> None:
    data = guest_data(cluster, 13, 512)
    raw = tmp_path / "guest.raw"
    raw.write_bytes(data)
    ref, mine = tmp_path / "ref.qcow2", tmp_path / "mine.qcow2"
    run([QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", *extra, str(raw), str(ref)])
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", *extra, str(mine), str(len(data))])
    node = await graph.add(qcow2_opts(mine))
    for off in range(0, len(data), cluster):
        chunk = data[off : off + cluster]
        if any(chunk):
            await node.write_compressed(off, chunk)  # type: ignore[attr-defined]
    await node.write_compressed(0, b"")  # type: ignore[attr-defined]  # as convert ends
    with pytest.raises(OSError) as err:
        await node.write_compressed(0, data[:cluster])  # type: ignore[attr-defined]
    assert err.value.errno == errno.EIO  # compressed data never overwrites a cluster
    with pytest.raises(OSError) as err:
        await node.write_compressed(512, data[:cluster])  # type: ignore[attr-defined]
    assert err.value.errno == errno.EINVAL
    await graph.delete("q")
    assert check(mine)[0] == 0
    assert mine.read_bytes() == ref.read_bytes()
