"""qcow2 images with ``encrypt.format=luks`` as qemu-img makes them: read, written (new
clusters, partial sectors, copy-on-write over a backing file) and read back by qemu-img;
QEMU's texts for a missing key, a wrong one and a mismatched format."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from host_qemu_img import create_encrypted

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError
from qsd_py.objects.registry import ObjectRegistry

MiB = 1 << 20
SECRET = "secret,id=s0,data=hunter2"


def make_qcow2(path: Path, extra: str = "") -> None:
    opts = f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50{extra}"
    create_encrypted(path, "qcow2", SECRET, opts, MiB)


def image_opts(path: Path) -> str:
    return f"driver=qcow2,encrypt.key-secret=s0,file.filename={path}"


def qemu_img_read(path: Path) -> bytes:
    out = path.with_suffix(".out")
    subprocess.run(["qemu-img", "convert", "-U", "--object", SECRET, "--image-opts",
                    image_opts(path), "-O", "raw", str(out)], check=True)  # fmt: skip
    return out.read_bytes()


def graph_with_secret(graph: BlockGraph, data: str = "hunter2") -> BlockGraph:
    graph.objects = ObjectRegistry()
    graph.objects.add({"qom-type": "secret", "id": "s0", "data": data})
    return graph


async def open_qcow2(graph: BlockGraph, path: Path, encrypt: dict | None = None, **extra):
    opts = {"driver": "qcow2", "node-name": "q0",
            "file": {"driver": "file", "filename": str(path)}, **extra}  # fmt: skip
    if encrypt is not False:
        opts["encrypt"] = encrypt or {"format": "luks", "key-secret": "s0"}
    return await graph.add(opts)


@pytest.mark.parametrize("extra", ["", ",cluster_size=4096,encrypt.cipher-mode=cbc"])
async def test_read_write_against_qemu_img(graph: BlockGraph, tmp_path: Path, extra) -> None:
    path = tmp_path / "enc.qcow2"
    make_qcow2(path, extra)
    src = tmp_path / "plain"
    plain = bytearray(os.urandom(MiB))
    plain[300_000:400_000] = bytes(100_000)
    src.write_bytes(plain)
    subprocess.run(["qemu-img", "convert", "-n", "--object", SECRET, "-f", "raw", str(src),
                    "--target-image-opts", image_opts(path)], check=True)  # fmt: skip
    node = await open_qcow2(graph_with_secret(graph), path)
    node.add_user("t", write=True)
    buf = bytearray(MiB)
    await node.read(0, memoryview(buf))
    assert buf == plain
    for offset, data in ((7, b"x" * 100), (70_000, os.urandom(200_000)), (MiB - 3, b"end")):
        await node.write(offset, data)
        plain[offset : offset + len(data)] = data
    await node.write_zeroes(500_000, 70_000)
    plain[500_000:570_000] = bytes(70_000)
    await node.flush()
    info = node.info()
    assert info["encrypted"] is True and info["image"]["encrypted"] is True
    enc = info["image"]["format-specific"]["data"]["encrypt"]
    assert enc["format"] == "luks" and enc["slots"][0]["active"] is True
    assert info["file"].startswith('json:{"encrypt.key-secret": "s0", "driver": "qcow2"')
    with pytest.raises(OSError, match="Compression not supported with encryption"):
        await node.write_compressed(0, bytes(node.cluster_size))
    await graph.close_all()
    assert b"x" * 100 not in path.read_bytes()
    assert qemu_img_read(path) == plain
    check = subprocess.run(["qemu-img", "check", "--object", SECRET, "--image-opts",
                            image_opts(path)], capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout


async def test_copy_on_write_over_backing(graph: BlockGraph, tmp_path: Path) -> None:
    """A partial write into an encrypted overlay copies the backing file's bytes around
    it into the new cluster, encrypted at the cluster's host offset."""
    base = tmp_path / "base.raw"
    base_data = os.urandom(MiB)
    base.write_bytes(base_data)
    top = tmp_path / "top.qcow2"
    make_qcow2(top, f",backing_file={base},backing_fmt=raw")
    node = await open_qcow2(graph_with_secret(graph), top)
    node.add_user("t", write=True)
    await node.write(65536 + 1000, b"P" * 3000)
    await graph.close_all()
    want = bytearray(base_data)
    want[65536 + 1000 : 65536 + 4000] = b"P" * 3000
    assert qemu_img_read(top) == want


async def test_errors(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "enc.qcow2"
    make_qcow2(path)
    graph_with_secret(graph, "wrong")
    with pytest.raises(QMPError, match="^Invalid password, cannot unlock any keyslot$"):
        await open_qcow2(graph, path, **{"read-only": True})
    with pytest.raises(QMPError, match="^Parameter 'encrypt.key-secret' is required for cipher$"):
        await open_qcow2(graph, path, encrypt=False)
    with pytest.raises(QMPError, match="^Parameter 'encrypt.key-secret' is required for cipher$"):
        await open_qcow2(graph, path, encrypt={"format": "luks"})
    with pytest.raises(
        QMPError, match="^Header reported 'luks' encryption format but options specify 'aes'$"
    ):
        await open_qcow2(graph, path, encrypt={"format": "aes", "key-secret": "s0"})
    # The LUKS header in the image damaged: its own texts, no crash.
    raw = bytearray(path.read_bytes())
    hdr_at = raw.index(b"LUKS\xba\xbe")
    raw[hdr_at : hdr_at + 4] = b"XXXX"
    path.write_bytes(bytes(raw))
    graph_with_secret(graph)
    with pytest.raises(QMPError, match="^Volume is not in LUKS format$"):
        await open_qcow2(graph, path)


async def test_same_bytes_as_qemu_io(graph: BlockGraph, tmp_path: Path) -> None:
    """The same writes into two copies of one encrypted image, by qemu-io and by qsd-py:
    the same files byte for byte (the same clusters, IVs from the same host sectors, the
    copy-on-write parts encrypted the same)."""
    first = tmp_path / "a.qcow2"
    make_qcow2(first)
    second = tmp_path / "b.qcow2"
    second.write_bytes(first.read_bytes())
    writes = [(0, b"a" * 65536), (100_000, b"b" * 3000), (70_000, b"c" * 10),
              (300_000, b"d" * 512)]  # fmt: skip
    cmds = []
    for offset, data in writes:
        cmds += ["-c", f"write -P {data[0]} {offset} {len(data)}"]
    subprocess.run(["qemu-io", "--object", SECRET, "--image-opts", image_opts(first), *cmds],
                   check=True, capture_output=True)  # fmt: skip
    node = await open_qcow2(graph_with_secret(graph), second)
    node.add_user("t", write=True)
    for offset, data in writes:
        await node.write(offset, data)
    await graph.close_all()
    assert second.read_bytes() == first.read_bytes()
