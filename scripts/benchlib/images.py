"""The images the file backends export: raw ones full of data, qcow2 ones allocated or fresh.

qcow2 images are made by the host's ``qemu-img`` (Debian's qemu-utils), so their layout is
QEMU's and neither daemon under test wrote them. Every image is pushed to storage before it
is measured, so no write-back of its making runs during a fio run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from benchlib.matrix import IMAGE_SIZE, QCOW2_CLUSTER, Backend

QEMU_IMG = "qemu-img"
FILL_CHUNK = 1 << 20


def qemu_img_version() -> str:
    """``qemu-img version X`` of the host's tool, or ``""`` if there is none that runs."""
    if shutil.which(QEMU_IMG) is None:
        return ""
    out = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else ""


def make_image(backend: Backend, path: str, size: int = IMAGE_SIZE) -> None:
    """Make ``backend``'s image at ``path`` (replacing any file there) and sync it."""
    Path(path).unlink(missing_ok=True)
    if backend.fmt == "raw":
        fill_raw(path, size)
    elif backend.state == "fresh":
        qcow2_fresh(path, size)
    elif backend.state == "allocated":
        qcow2_allocated(path, size)
    else:
        raise ValueError(f"{backend.name}: no image for format {backend.fmt} {backend.state}")
    sync(path)


def fill_raw(path: str, size: int) -> None:
    """Write ``size`` bytes of non-zero data: reads must reach storage, not holes."""
    chunk = os.urandom(FILL_CHUNK)
    with open(path, "wb") as f:
        for _ in range(size // FILL_CHUNK):
            f.write(chunk)
        f.write(chunk[: size % FILL_CHUNK])


def qcow2_fresh(path: str, size: int) -> None:
    """An empty qcow2 image: no cluster allocated, so every first write allocates one."""
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER}", path, size)


def qcow2_allocated(path: str, size: int) -> None:
    """A qcow2 image whose every cluster holds data, referenced once (no snapshot, no
    backing file): reads map to data clusters and writes overwrite them in place.

    Made by converting a raw image full of data, the way images usually get their clusters
    (``preallocation=full`` would allocate them too, but full of zeroes)."""
    scratch = path + ".raw"
    try:
        fill_raw(scratch, size)
        _qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o",
                  f"cluster_size={QCOW2_CLUSTER}", scratch, path)  # fmt: skip
    finally:
        Path(scratch).unlink(missing_ok=True)


def copy_image(src: str, dst: str) -> None:
    """Another target's image: a byte copy, synced (any format: a qcow2 file holds no path)."""
    shutil.copyfile(src, dst)
    sync(dst)


def sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _qemu_img(*args: str | int) -> None:
    argv = [QEMU_IMG, *map(str, args)]
    try:
        subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{' '.join(argv)}: {err.stderr.strip()}") from err
