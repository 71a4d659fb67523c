"""Persistent bitmaps in qcow2 images, checked with QEMU's own tools (Debian's qemu-img,
qemu-io and qemu-nbd 7.2, which read and write the same format as QEMU 11.1):

* bitmaps qsd-py stored: ``qemu-img check`` finds no error, ``qemu-img info`` lists them,
  and qemu-nbd serves exactly the chunks that were written;
* bitmaps QEMU wrote (qemu-img bitmap, qemu-io writes): qsd-py loads the same chunks;
* a bitmap left in use (the image copied while open read-write) loads inconsistent.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from bitmap_support import dirty_runs

from qsd_py.daemon import Daemon
from qsd_py.errors import QMPError

SIZE = 4 << 20


async def reply(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await daemon.execute(name, args)
    except QMPError as e:
        return ("error", e.desc)


def qcow2(path: Path, size: int = SIZE) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


async def open_image(daemon: Daemon, path: Path, name: str = "q", **opts: Any) -> Any:
    args = {"driver": "qcow2", "node-name": name, **opts,
            "file": {"driver": "file", "filename": str(path)}}  # fmt: skip
    assert await reply(daemon, "blockdev-add", args) == {}
    return daemon.graph.find(name)


def bitmap_info(daemon: Daemon, node: str) -> dict[str, dict[str, Any]]:
    for entry in daemon.graph.query(True):
        if entry["node-name"] == node:
            return {b["name"]: b for b in entry.get("dirty-bitmaps", [])}
    raise AssertionError(node)


def qemu_check(path: Path) -> None:
    done = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No errors were found on the image." in done.stdout


def qemu_bitmaps(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out)["format-specific"]["data"].get("bitmaps", [])


def qemu_dirty_runs(path: Path, name: str) -> list[tuple[int, int]]:
    """The dirty extents QEMU's qemu-nbd serves for bitmap ``name`` of the image."""
    return dirty_runs(["[", "qemu-nbd", "-r", "-B", name, "-f", "qcow2", str(path), "]"], name)


def model_runs(chunks: set[int], granularity: int, size: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for c in sorted(chunks):
        start, end = c * granularity, min((c + 1) * granularity, size)
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end - runs[-1][0])
        else:
            runs.append((start, end - start))
    return runs


def random_writes(rng: random.Random, count: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(count):
        offset = rng.randrange(0, SIZE, 512)
        out.append((offset, min(rng.randint(1, 96) * 512, SIZE - offset)))
    return out


def chunks_of(writes: list[tuple[int, int]], granularity: int) -> set[int]:
    found: set[int] = set()
    for offset, length in writes:
        found.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    return found


async def test_stored_bitmaps_read_back_by_qemu_and_qsd(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = qcow2(tmp_path / "a.qcow2")
    daemon = Daemon()
    node = await open_image(daemon, path)
    add = "block-dirty-bitmap-add"
    assert await reply(daemon, add, {"node": "q", "name": "big", "persistent": True}) == {}
    fine = {"node": "q", "name": "fine", "persistent": True, "granularity": 512}
    assert await reply(daemon, add, fine) == {}
    assert await reply(daemon, add, {"node": "q", "name": "temp"}) == {}
    first, second = random_writes(rng, 40), random_writes(rng, 20)
    for offset, length in first:
        await node.write(offset, rng.randbytes(length))
    assert await reply(daemon, "block-dirty-bitmap-disable", {"node": "q", "name": "fine"}) == {}
    for offset, length in second:
        await node.write(offset, rng.randbytes(length))
    sha = "x-debug-block-dirty-bitmap-sha256"
    hashes = {n: (await reply(daemon, sha, {"node": "q", "name": n}))["sha256"]
              for n in ("big", "fine")}  # fmt: skip
    before = bitmap_info(daemon, "q")
    assert await reply(daemon, "blockdev-del", {"node-name": "q"}) == {}

    qemu_check(path)
    assert qemu_bitmaps(path) == [
        {"flags": [], "name": "fine", "granularity": 512},
        {"flags": ["auto"], "name": "big", "granularity": 65536},
    ]
    assert qemu_dirty_runs(path, "big") == model_runs(chunks_of(first + second, 65536), 65536, SIZE)
    assert qemu_dirty_runs(path, "fine") == model_runs(chunks_of(first, 512), 512, SIZE)

    await open_image(daemon, path)
    after = bitmap_info(daemon, "q")
    assert set(after) == {"big", "fine"}
    for name in ("big", "fine"):
        assert after[name] == before[name]
        assert (await reply(daemon, sha, {"node": "q", "name": name}))["sha256"] == hashes[name]
    await daemon.graph.close_all()
    qemu_check(path)


async def test_bitmaps_written_by_qemu_load_with_their_bits(tmp_path: Path) -> None:
    rng = random.Random(8)
    path = qcow2(tmp_path / "b.qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "rec"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "4096", "--disable", str(path), "off"],
                   check=True)  # fmt: skip
    writes = random_writes(rng, 30)
    cmds = [arg for offset, length in writes for arg in ("-c", f"write {offset} {length}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   capture_output=True)  # fmt: skip
    daemon = Daemon()
    node = await open_image(daemon, path, **{"read-only": True})
    info = bitmap_info(daemon, "q")
    assert info["rec"]["recording"] and not info["off"]["recording"]
    assert info["rec"]["persistent"]
    assert info["rec"]["count"] == len(chunks_of(writes, 65536)) * 65536
    assert info["off"]["count"] == 0
    found = [(s, n) for s, n, dirty in node.dirty_bitmap("rec").runs(0, SIZE) if dirty]
    assert found == model_runs(chunks_of(writes, 65536), 65536, SIZE)
    assert await reply(daemon, "block-dirty-bitmap-clear", {"node": "q", "name": "rec"}) == (
        "error",
        "Bitmap 'rec' is readonly and cannot be modified",
    )
    assert await reply(daemon, "block-dirty-bitmap-remove", {"node": "q", "name": "rec"}) == (
        "error",
        "Cannot remove persistent bitmap 'rec': no write access to node 'q'",
    )
    await daemon.graph.close_all()


async def test_in_use_bitmap_loads_inconsistent_and_can_be_removed(tmp_path: Path) -> None:
    path = qcow2(tmp_path / "c.qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "bad"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "good"], check=True)
    daemon = Daemon()
    await open_image(daemon, path)  # read-write: every bitmap is flagged in use
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(path, copy)  # what a crash would leave
    await daemon.graph.close_all()
    assert [b["flags"] for b in qemu_bitmaps(path)] == [["auto"], ["auto"]]
    assert [b["flags"] for b in qemu_bitmaps(copy)] == [["in-use", "auto"], ["in-use", "auto"]]

    node = await open_image(daemon, copy)
    assert bitmap_info(daemon, "q")["bad"] == {
        "name": "bad", "recording": False, "persistent": True, "busy": False,
        "granularity": 65536, "count": 0, "inconsistent": True,
    }  # fmt: skip
    await node.write(0, b"x" * 512)
    inconsistent = ("error", "Bitmap 'bad' is inconsistent and cannot be used")
    for cmd in ("clear", "enable", "disable"):
        args = {"node": "q", "name": "bad"}
        assert await reply(daemon, f"block-dirty-bitmap-{cmd}", args) == inconsistent
    assert await reply(daemon, "block-dirty-bitmap-add", {"node": "q", "name": "new"}) == {}
    merge = {"node": "q", "target": "new", "bitmaps": ["bad"]}
    assert await reply(daemon, "block-dirty-bitmap-merge", merge) == inconsistent
    assert await reply(daemon, "block-dirty-bitmap-remove", {"node": "q", "name": "bad"}) == {}
    assert await reply(daemon, "block-dirty-bitmap-remove", {"node": "q", "name": "good"}) == {}
    assert qemu_bitmaps(copy) == []  # gone from the image at once
    await daemon.graph.close_all()
    qemu_check(copy)
    assert qemu_bitmaps(copy) == []


@pytest.mark.parametrize("keep", ["inconsistent", "none"])
async def test_close_keeps_what_it_cannot_store(tmp_path: Path, keep: str) -> None:
    """An inconsistent bitmap stays in the image as it was while a new one is stored."""
    path = qcow2(tmp_path / "d.qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "old"], check=True)
    daemon = Daemon()
    await open_image(daemon, path)
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(path, copy)
    await daemon.graph.close_all()
    node = await open_image(daemon, copy)
    if keep == "none":
        assert await reply(daemon, "block-dirty-bitmap-remove", {"node": "q", "name": "old"}) == {}
    new = {"node": "q", "name": "new", "persistent": True, "granularity": 1 << 20}
    assert await reply(daemon, "block-dirty-bitmap-add", new) == {}
    await node.write(3 << 20, b"y" * 4096)
    await daemon.graph.close_all()
    qemu_check(copy)
    stored = [(b["name"], b["flags"]) for b in qemu_bitmaps(copy)]
    old = [("old", ["in-use", "auto"])] if keep == "inconsistent" else []
    assert stored == [*old, ("new", ["auto"])]
    assert qemu_dirty_runs(copy, "new") == [(3 << 20, 1 << 20)]
