"""qcow2 images made by the host's qemu-img (Debian 12: QEMU 7.2), for the format tests.

Every helper runs the real tool, so the bytes the tests decode are what QEMU writes. Options are
given as keyword arguments with QEMU's names (``cluster_size``, ``refcount_bits``, ``compat``,
``extended_l2``, ``compression_type``, ``data_file``, ``data_file_raw``, ``lazy_refcounts``,
``preallocation``); ``None`` leaves an option out.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"


def run(argv: list[str], cwd: Path | None = None) -> str:
    """Run a tool; raise with its stderr if it fails; return its stdout.

    QEMU opens an image's external data file relative to its working directory (backing files
    are relative to the image), so the helpers run the tools in the image's directory."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _options(opts: dict[str, Any]) -> list[str]:
    items = []
    for key, value in opts.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        items.append(f"{key}={value}")
    return ["-o", ",".join(items)] if items else []


def create(
    path: Path,
    size: int | str = "4M",
    *,
    backing: Path | str | None = None,
    backing_fmt: str | None = None,
    **opts: Any,
) -> Path:
    """``qemu-img create -f qcow2`` with the given options; returns ``path``.

    Runs in the image's directory, so relative backing and data file names are beside it."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", *_options(opts)]
    if backing is not None:
        argv += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    run([*argv, str(path), str(size)], cwd=path.parent)
    return path


def write(path: Path, offset: int, length: int, pattern: int, *, fmt: str = "qcow2") -> None:
    """Fill ``length`` bytes at ``offset`` with the byte ``pattern`` (qemu-io write -P)."""
    run([QEMU_IO, "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(path)], path.parent)


def write_zeroes(path: Path, offset: int, length: int, *, unmap: bool = False) -> None:
    """qemu-io write -z (with -u: zero clusters that may drop their allocation)."""
    flag = "-z -u" if unmap else "-z"
    run([QEMU_IO, "-f", "qcow2", "-c", f"write {flag} {offset} {length}", str(path)], path.parent)


def discard(path: Path, offset: int, length: int) -> None:
    run([QEMU_IO, "-f", "qcow2", "-c", f"discard {offset} {length}", str(path)], path.parent)


def snapshot(path: Path, name: str) -> None:
    """An internal snapshot (qemu-img snapshot -c)."""
    run([QEMU_IMG, "snapshot", "-c", name, str(path)], path.parent)


def add_bitmap(
    path: Path, name: str, *, granularity: int | None = None, disabled: bool = False
) -> None:
    """A persistent dirty bitmap (qemu-img bitmap --add), recording writes unless disabled."""
    argv = [QEMU_IMG, "bitmap", "--add"]
    if granularity is not None:
        argv += ["-g", str(granularity)]
    if disabled:
        argv.append("--disable")
    run([*argv, str(path), name], path.parent)


def convert_compressed(src: Path, dst: Path, *, src_fmt: str = "raw", **opts: Any) -> Path:
    """``qemu-img convert -c``: every cluster that compresses is stored compressed."""
    argv = [QEMU_IMG, "convert", "-c", "-f", src_fmt, "-O", "qcow2", *_options(opts)]
    run([*argv, str(src), str(dst)], dst.parent)
    return dst


def to_raw(path: Path, dst: Path) -> bytes:
    """The guest view of an image (qemu-img convert -O raw), as bytes."""
    run([QEMU_IMG, "convert", "-O", "raw", str(path), str(dst)], path.parent)
    return dst.read_bytes()


def info(path: Path) -> dict[str, Any]:
    return json.loads(run([QEMU_IMG, "info", "--output=json", str(path)], path.parent))


def check(path: Path) -> tuple[int, dict[str, Any]]:
    """qemu-img check: (exit code: 0 clean, 2 corrupt, 3 leaks; its JSON report)."""
    done = subprocess.run(
        [QEMU_IMG, "check", "--output=json", str(path)],
        capture_output=True,
        text=True,
        cwd=path.parent,
    )
    return done.returncode, json.loads(done.stdout or "{}")


def compressible_data(size: int, seed: int = 1) -> bytes:
    """Bytes that deflate well but not trivially: words from a small vocabulary."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 9))) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def raw_file(path: Path, data: bytes, size: int | None = None) -> Path:
    """A raw file holding ``data``, extended with a hole up to ``size``."""
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return path
