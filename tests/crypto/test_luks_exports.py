"""Encrypted nodes behind every export: data written over /dev/fuse, FUSE-over-io_uring
(whose per-CPU queue workers read and write plain nodes' files themselves) and NBD reaches
the image as ciphertext only, and qemu-img (with the key) reads back exactly what was
written; what qemu-img wrote reads back through the exports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from host_qemu_img import create_encrypted

MiB = 1 << 20
SECRET = "secret,id=s0,data=hunter2"


def _create(path: Path, fmt: str) -> None:
    opts = (
        "key-secret=s0,iter-time=50"
        if fmt == "luks"
        else "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50"
    )
    create_encrypted(path, fmt, SECRET, opts, 2 * MiB)


def _image_opts(path: Path, fmt: str) -> str:
    key = "key-secret" if fmt == "luks" else "encrypt.key-secret"
    return f"driver={fmt},{key}=s0,file.filename={path}"


def _qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "--object", SECRET, "--image-opts", _image_opts(path, fmt),
                    *args], check=True, capture_output=True)  # fmt: skip


def _qemu_img_read(path: Path, fmt: str) -> bytes:
    out = path.with_suffix(".out")
    subprocess.run(["qemu-img", "convert", "-U", "--object", SECRET, "--image-opts",
                    _image_opts(path, fmt), "-O", "raw", str(out)], check=True)  # fmt: skip
    return out.read_bytes()


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _wait_gone(qmp) -> None:
    deadline = time.monotonic() + 10
    while qmp.cmd("query-block-exports"):
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_exports_write_ciphertext_only(qsd, uring_knob, tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    _create(image, fmt)
    _qemu_io(image, fmt, "write -P 0x61 0 65536")  # qemu-img's data: "a" * 64 KiB
    # What the rest reads as: zeroes in qcow2; in a fresh LUKS image the file's zeroes
    # decrypted (noise, in QEMU too).
    want = bytearray(_qemu_img_read(image, fmt))
    fuse, uring = tmp_path / "fuse.raw", tmp_path / "uring.raw"
    fuse.touch()
    uring.touch()
    sock = tmp_path / "nbd.sock"
    key = "key-secret=s0" if fmt == "luks" else "encrypt.format=luks,encrypt.key-secret=s0"
    daemon = qsd(
        "--object", SECRET,
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", f"driver={fmt},node-name=d0,file=f0,{key}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
    )  # fmt: skip
    qmp = daemon.qmp()
    # Patterns no cipher output contains by chance: plaintext on disk would show them.
    marks = {
        "fuse": (100_000, b"FUSE-CLASSIC-PLAINTEXT!" * 700),
        "uring": (600_000, b"FUSE-URING-PLAINTEXT!!!" * 3000),
        "uring-small": (1_500_003, b"URING-TAIL-PLAINTEXT" * 9),
        "nbd": (1_200_000, b"NBD-PLAINTEXT-WRITE!!!!" * 1000),
    }
    try:
        qmp.cmd("block-export-add", type="fuse", id="e1", **{"node-name": "d0"},
                mountpoint=str(fuse), writable=True)  # fmt: skip
        qmp.cmd("block-export-add", type="fuse", id="e2", **{"node-name": "d0"},
                mountpoint=str(uring), writable=True, io_uring=True)  # fmt: skip
        assert _pread(uring, 0, 65536) == b"a" * 65536  # decrypted for the workers' reader
        assert _pread(fuse, 65536 - 10, 20) == want[65536 - 10 : 65536 + 10]
        _pwrite(fuse, *marks["fuse"])
        _pwrite(uring, *marks["uring"])
        _pwrite(uring, *marks["uring-small"])
        offset, data = marks["fuse"]
        assert _pread(uring, offset, len(data)) == data
        offset, data = marks["uring"]
        assert _pread(fuse, offset, len(data)) == data
        qmp.cmd("block-export-del", id="e1")
        qmp.cmd("block-export-del", id="e2")
        _wait_gone(qmp)
        qmp.cmd("block-export-add", type="nbd", id="e3", **{"node-name": "d0"},
                name="d0", writable=True)  # fmt: skip
        url = f"nbd+unix:///d0?socket={sock}"
        offset, data = marks["nbd"]
        src = tmp_path / "nbd.in"
        src.write_bytes(data)
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x7a {offset - 512} 512",
                        url], check=True, capture_output=True)  # fmt: skip
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} {len(data)}",
                        url], check=True, capture_output=True)  # fmt: skip
        read_back = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x61 0 65536",
                                    url], capture_output=True, text=True)  # fmt: skip
        assert "read 65536/65536" in read_back.stdout, read_back.stdout + read_back.stderr
        qmp.cmd("block-export-del", id="e3")
        _wait_gone(qmp)
    finally:
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(Exception):
            qmp.close()
        daemon.stop()
    raw = image.read_bytes()
    for name, (_offset, data) in marks.items():
        assert data[:20] not in raw, f"{name}: plaintext reached the image file"
    assert b"a" * 512 not in raw
    for offset, data in marks.values():
        want[offset : offset + len(data)] = data
    nbd_offset = marks["nbd"][0]
    want[nbd_offset - 512 : nbd_offset] = b"z" * 512
    assert _qemu_img_read(image, fmt) == want
    if fmt == "qcow2":
        opts = _image_opts(image, fmt)
        check = subprocess.run(["qemu-img", "check", "--object", SECRET, "--image-opts", opts],
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
