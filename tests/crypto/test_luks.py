"""The luks driver against images qemu-img makes: what it reads is the plaintext qemu-img
wrote, what it writes qemu-img reads back; broken headers and wrong passphrases give QEMU
11.1's texts (taken from its daemon, see test_luks_realqsd.py)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from host_qemu_img import create_encrypted

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError
from qsd_py.objects.registry import ObjectRegistry

MiB = 1 << 20
PASS = "hunter2"
SECRET = f"secret,id=s0,data={PASS}"
# qemu-img's options for each cipher it makes that qsd-py serves (iter-time small: the
# tests' PBKDF2 runs stay short).
SPECS = {
    "aes-256-xts-plain64": "",
    "aes-128-cbc-essiv-sha1": (
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1"
    ),
    "aes-256-cbc-plain-sha512": ",cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha512",
}


def make_luks(path: Path, size: int = MiB, extra: str = "") -> bytes:
    """A LUKS image of qemu-img's with random plaintext written by qemu-img; the plaintext."""
    create_encrypted(path, "luks", SECRET, f"key-secret=s0,iter-time=50{extra}", size)
    plain = os.urandom(size)
    src = path.with_suffix(".plain")
    src.write_bytes(plain)
    subprocess.run(
        ["qemu-img", "convert", "-n", "--object", SECRET, "-f", "raw", str(src),
         "--target-image-opts", f"driver=luks,key-secret=s0,file.filename={path}"],
        check=True,
    )  # fmt: skip
    return plain


def qemu_img_read(path: Path) -> bytes:
    out = path.with_suffix(".out")
    subprocess.run(
        ["qemu-img", "convert", "-U", "--object", SECRET, "--image-opts",
         f"driver=luks,key-secret=s0,file.filename={path}", "-O", "raw", str(out)],
        check=True,
    )  # fmt: skip
    return out.read_bytes()


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("luks") / "base.luks"
    return path, make_luks(path)


def with_secret(graph: BlockGraph, data: str = PASS) -> BlockGraph:
    graph.objects = ObjectRegistry()
    graph.objects.add({"qom-type": "secret", "id": "s0", "data": data})
    return graph


async def open_luks(graph: BlockGraph, path: Path, **extra: object):
    return await graph.add(
        {"driver": "luks", "node-name": "l0", "key-secret": "s0",
         "file": {"driver": "file", "filename": str(path)}, **extra}
    )  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
async def test_reads_and_writes_qemu_img_images(graph: BlockGraph, tmp_path: Path, spec) -> None:
    path = tmp_path / "img.luks"
    plain = bytearray(make_luks(path, extra=SPECS[spec]))
    node = await open_luks(with_secret(graph), path)
    node.add_user("t", write=True)
    assert node.length() == MiB
    buf = bytearray(MiB)
    await node.read(0, memoryview(buf))
    assert buf == plain
    # Unaligned, sector-crossing writes (read-modify-write) and a large aligned one.
    for offset, data in ((1000, b"A" * 3000), (65536, os.urandom(131072)), (MiB - 7, b"Z" * 7)):
        await node.write(offset, data)
        plain[offset : offset + len(data)] = data
    await node.write_zeroes(4096 * 3 + 5, 10000)
    plain[4096 * 3 + 5 : 4096 * 3 + 10005] = bytes(10000)
    await node.flush()
    small = bytearray(11)
    await node.read(995, memoryview(small))
    assert small == plain[995:1006]
    raw = path.read_bytes()
    assert b"A" * 512 not in raw and b"Z" * 7 not in raw  # ciphertext only on disk
    assert qemu_img_read(path) == plain


async def test_info_as_qemu(graph: BlockGraph, base_image) -> None:
    path, _ = base_image
    node = await open_luks(with_secret(graph), path, **{"read-only": True})
    info = node.info()
    assert info["encrypted"] is True and info["drv"] == "luks"
    file_opts = f'{{"driver": "file", "filename": "{path}"}}'
    assert info["file"] == f'json:{{"driver": "luks", "file": {file_opts}, "key-secret": "s0"}}'
    image = info["image"]
    assert image["encrypted"] is True and image["limits"]["request-alignment"] == 512
    data = image["format-specific"]["data"]
    assert image["format-specific"]["type"] == "luks"
    assert {k: data[k] for k in ("cipher-alg", "cipher-mode", "ivgen-alg", "hash-alg")} == {
        "cipher-alg": "aes-256", "cipher-mode": "xts", "ivgen-alg": "plain64",
        "hash-alg": "sha256",
    }  # fmt: skip
    assert data["payload-offset"] == path.stat().st_size - MiB
    assert [s["active"] for s in data["slots"]] == [True] + [False] * 7
    assert data["slots"][1] == {"active": False, "key-offset": data["slots"][1]["key-offset"]}


async def test_wrong_password_and_missing_secret(graph: BlockGraph, base_image) -> None:
    path, _ = base_image
    with pytest.raises(QMPError, match="^Invalid password, cannot unlock any keyslot$"):
        await open_luks(with_secret(graph, "wrong"), path)
    with pytest.raises(QMPError, match="^Parameter 'key-secret' is required for cipher$"):
        await graph.add({"driver": "luks", "node-name": "l1",
                         "file": {"driver": "file", "filename": str(path)}})  # fmt: skip
    with pytest.raises(QMPError, match="^No secret with id 's9'$"):
        await open_luks(graph, path, **{"key-secret": "s9"})


def _patch(raw: bytes, offset: int, data: bytes) -> bytes:
    return raw[:offset] + data + raw[offset + len(data) :]


SLOT0 = 208
# Damaged headers and QEMU 11.1's answer to each (its daemon's, probed with real-qsd).
FUZZ = {
    "empty": (lambda r: b"", "Volume is not in LUKS format"),
    "magic": (lambda r: b"XUKS" + r[4:], "Volume is not in LUKS format"),
    "version": (lambda r: _patch(r, 6, b"\0\2"), "LUKS version 2 is not supported"),
    "truncated": (lambda r: r[:100], "LUKS payload is overlapping with the header"),
    "header-only": (lambda r: r[:592], "Invalid password, cannot unlock any keyslot"),
    "payload": (lambda r: _patch(r, 104, struct.pack(">I", 1)),
                "LUKS payload is overlapping with the header"),
    "state": (lambda r: _patch(r, SLOT0, struct.pack(">I", 0x1234)),
              "Keyslot 0 state (active/disable) is corrupted"),
    "iterations": (lambda r: _patch(r, SLOT0 + 4, bytes(4)), "Keyslot 0 iteration count is zero"),
    "stripes": (lambda r: _patch(r, SLOT0 + 44, struct.pack(">I", 3999)),
                "Keyslot 0 is corrupted (stripes 3999 != 4000)"),
    "slot-in-header": (lambda r: _patch(r, SLOT0 + 40, bytes(4)),
                       "Keyslot 0 is overlapping with the LUKS header"),
    "slot-in-payload": (lambda r: _patch(r, SLOT0 + 40, struct.pack(">I", 4000)),
                        "Keyslot 0 is overlapping with the encrypted payload"),
    "slots-overlap": (lambda r: _patch(r, SLOT0 + 88, struct.pack(">I", 8)),
                      "Keyslots 0 and 1 are overlapping in the header"),
    "no-active-slot": (lambda r: _patch(r, SLOT0, struct.pack(">I", 0xDEAD)),
                       "Invalid password, cannot unlock any keyslot"),
    "cipher": (lambda r: _patch(r, 8, b"bogus".ljust(32, b"\0")),
               "Algorithm 'bogus' with key size 32 bytes not supported"),
    "mode": (lambda r: _patch(r, 40, b"bogus-plain64".ljust(32, b"\0")),
             "Cipher mode 'bogus' not supported"),
    "ivgen": (lambda r: _patch(r, 40, b"xts-bogus".ljust(32, b"\0")),
              "IV generator 'bogus' not supported"),
    "hash": (lambda r: _patch(r, 72, b"bogus".ljust(32, b"\0")),
             "Hash algorithm 'bogus' not supported"),
    "key-bytes": (lambda r: _patch(r, 108, struct.pack(">I", 33)),
                  "XTS cipher key length should be a multiple of 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", FUZZ)
async def test_damaged_headers(graph: BlockGraph, base_image, tmp_path: Path, case) -> None:
    path, _ = base_image
    damage, text = FUZZ[case]
    bad = tmp_path / "bad.luks"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(QMPError) as err:
        await open_luks(with_secret(graph), bad)
    assert str(err.value) == text


async def test_random_header_damage_never_crashes(graph: BlockGraph, base_image, tmp_path) -> None:
    """Random bytes anywhere in the header: a QEMU text, never another exception. The
    iteration counts are set to 1 first (each case stays quick) and spared (a huge one makes
    PBKDF2 run for hours, in QEMU too)."""
    path, _ = base_image
    raw = bytearray(path.read_bytes())
    struct.pack_into(">I", raw, 168, 1)  # the master key digest's iterations
    struct.pack_into(">I", raw, SLOT0 + 4, 1)  # slot 0's
    rng = random.Random(20)
    iter_fields = {*range(168, 172)} | {SLOT0 + 48 * i + k for i in range(8) for k in range(4, 8)}
    bad = tmp_path / "bad.luks"
    with_secret(graph)
    for i in range(40):
        buf = bytearray(raw[: 592 + 512])
        for _ in range(rng.randint(1, 4)):
            pos = rng.choice([p for p in range(len(buf)) if p not in iter_fields])
            buf[pos] = rng.randrange(256)
        bad.write_bytes(bytes(buf) + raw[len(buf) : len(buf) + 4096])
        try:
            node = await graph.add({"driver": "luks", "node-name": f"x{i}", "key-secret": "s0",
                                    "file": {"driver": "file", "filename": str(bad)}})  # fmt: skip
        except QMPError as err:
            assert str(err)
        else:
            await graph.delete(node.node_name)


async def test_detached_header(graph: BlockGraph, base_image, tmp_path: Path) -> None:
    """``header``: the key slots in a node of their own, the payload the whole ``file``."""
    path, plain = base_image
    raw = path.read_bytes()
    payload_at = len(raw) - MiB
    header, payload = tmp_path / "hdr", tmp_path / "payload"
    header.write_bytes(raw[:payload_at])
    payload.write_bytes(raw[payload_at:])
    node = await open_luks(
        with_secret(graph), payload, header={"driver": "file", "filename": str(header)}
    )
    assert node.length() == MiB
    buf = bytearray(4096)
    await node.read(MiB - 4096, memoryview(buf))
    assert buf == plain[-4096:]
    assert node.info()["image"]["format-specific"]["data"]["detached-header"] is True


async def test_same_bytes_as_qemu_io(graph: BlockGraph, base_image, tmp_path: Path) -> None:
    """The same writes into two copies of one image, by qemu-io and by qsd-py (partial
    sectors included): the same files byte for byte."""
    path, _ = base_image
    first, second = tmp_path / "a.luks", tmp_path / "b.luks"
    first.write_bytes(path.read_bytes())
    second.write_bytes(path.read_bytes())
    writes = [(0, 4096, 0x61), (5000, 300, 0x62), (MiB - 512, 512, 0x63)]
    cmds = [a for off, n, pat in writes for a in ("-c", f"write -P {pat} {off} {n}")]
    subprocess.run(["qemu-io", "--object", SECRET, "--image-opts",
                    f"driver=luks,key-secret=s0,file.filename={first}", *cmds],
                   check=True, capture_output=True)  # fmt: skip
    node = await open_luks(with_secret(graph), second)
    node.add_user("t", write=True)
    for offset, n, pattern in writes:
        await node.write(offset, bytes([pattern]) * n)
    await graph.close_all()
    assert second.read_bytes() == first.read_bytes()


def test_sector_order_across_loops() -> None:
    """Overlapping writes from two loops (the main one and an iothread's) run in turn;
    one that does not overlap does not wait."""
    import asyncio
    import threading

    from qsd_py.block.crypto.io import SectorOrder

    order = SectorOrder()
    log: list[tuple[str, str]] = []

    async def write(name: str, start: int, end: int, hold: float) -> None:
        await order.enter(start, end)
        log.append(("in", name))
        await asyncio.sleep(hold)
        log.append(("out", name))
        await order.leave(start, end)

    async def main() -> None:
        first = asyncio.create_task(write("A", 0, 10, 0.3))
        await asyncio.sleep(0.05)
        other = threading.Thread(target=lambda: asyncio.run(write("B", 5, 15, 0.01)))
        other.start()
        await write("C", 20, 30, 0.01)  # no overlap: in and out while A holds its range
        await first
        await asyncio.to_thread(other.join)

    asyncio.run(main())
    assert log.index(("out", "C")) < log.index(("out", "A")) < log.index(("in", "B"))
