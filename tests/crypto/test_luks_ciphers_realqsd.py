"""Every LUKS cipher QEMU 11.1's qemu-img makes (optional: ``--real-qsd``): qsd-py reads
back the plaintext qemu-img wrote, and what qsd-py writes QEMU's qemu-img reads back; a
cipher the cryptography package lacks (serpent, twofish) is refused at open with the text
QEMU's cipher backends give for one they lack. (aes-192 outside XTS is left out: QEMU 11.1's
qemu-img aborts on it, its key material is not a whole number of sectors.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from realqsd_support import require_real_qsd, shared_dir

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError
from qsd_py.objects.registry import ObjectRegistry

pytestmark = pytest.mark.realqsd

SIZE = 64 * 1024
SECRET = "secret,id=s0,data=pw"
SERVED = [
    *(f"cipher-alg=aes-{b},cipher-mode={m}" for b in (128, 256)
      for m in ("xts", "cbc", "ecb", "ctr")),
    "cipher-alg=aes-192,cipher-mode=xts",
    *(f"cipher-alg=cast5-128,cipher-mode={m}" for m in ("cbc", "ecb", "ctr")),
    "cipher-alg=sm4,cipher-mode=ecb",
    "cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5",
    "cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sm3,hash-alg=sm3",
    "cipher-mode=xts,ivgen-alg=plain,hash-alg=ripemd160",
    *(f"hash-alg={h}" for h in ("md5", "sha1", "sha224", "sha384", "sha512")),
]  # fmt: skip
REFUSED = {
    "cipher-alg=serpent-256,cipher-mode=xts": "Unsupported cipher algorithm serpent-256",
    "cipher-alg=twofish-128,cipher-mode=cbc": "Unsupported cipher algorithm twofish-128",
}


def _real(*args: str) -> None:
    subprocess.run([str(require_real_qsd()), "run", *args], check=True, capture_output=True,
                   timeout=120)  # fmt: skip


def _make(path: Path, opts: str) -> bytes:
    """A QEMU-made image with random plaintext written by QEMU's qemu-img."""
    _real("qemu-img", "create", "-q", "-f", "luks", "--object", SECRET, "-o",
          f"key-secret=s0,iter-time=10,{opts}", str(path), str(SIZE))  # fmt: skip
    plain = os.urandom(SIZE)
    src = path.with_suffix(".plain")
    src.write_bytes(plain)
    _real("qemu-img", "convert", "-n", "--object", SECRET, "-f", "raw", str(src),
          "--target-image-opts", f"driver=luks,key-secret=s0,file.filename={path}")  # fmt: skip
    return plain


def _real_read(path: Path) -> bytes:
    out = path.with_suffix(".out")
    _real("qemu-img", "convert", "--object", SECRET, "--image-opts",
          f"driver=luks,key-secret=s0,file.filename={path}", "-O", "raw", str(out))  # fmt: skip
    return out.read_bytes()


async def _open(graph: BlockGraph, path: Path):
    graph.objects = ObjectRegistry()
    graph.objects.add({"qom-type": "secret", "id": "s0", "data": "pw"})
    return await graph.add({"driver": "luks", "node-name": "l0", "key-secret": "s0",
                            "file": {"driver": "file", "filename": str(path)}})  # fmt: skip


@pytest.mark.parametrize("opts", SERVED)
async def test_qemu_images_read_and_written(graph: BlockGraph, opts: str) -> None:
    with shared_dir("luks-ciphers") as share:
        path = share / "img.luks"
        plain = bytearray(_make(path, opts))
        node = await _open(graph, path)
        node.add_user("t", write=True)
        buf = bytearray(SIZE)
        await node.read(0, memoryview(buf))
        assert buf == plain
        data = os.urandom(5000)
        await node.write(1000, data)
        await node.flush()
        plain[1000:6000] = data
        node.remove_user("t")
        await graph.delete("l0")
        assert _real_read(path) == plain


@pytest.mark.parametrize("opts", REFUSED)
async def test_ciphers_missing_from_cryptography(graph: BlockGraph, opts: str) -> None:
    with shared_dir("luks-ciphers") as share:
        path = share / "img.luks"
        _make(path, opts)
        with pytest.raises(QMPError) as err:
            await _open(graph, path)
        assert str(err.value) == REFUSED[opts]
