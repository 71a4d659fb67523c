"""copy-on-read: reads through the filter copy what the backing chain answers into the
top image (qemu-img map shows the clusters in the overlay afterwards, the data equal, the
image clean); ``bottom`` limits which layers are copied; the filter's options and its
entry in query-named-block-nodes as QEMU has them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from filters_support import make_images, qemu_io
from nbd_server.qmp_talk import Talk


def qemu_map(image: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def depth_at(extents: list[dict[str, Any]], offset: int) -> int:
    for ext in extents:
        if ext["start"] <= offset < ext["start"] + ext["length"]:
            return ext["depth"]
    raise AssertionError(offset)


def ok(reply: dict[str, Any]) -> None:
    assert "return" in reply["reply"], reply


def add_cor(talk: Talk, workdir: Path, **extra: Any) -> None:
    top = {"driver": "file", "filename": str(workdir / "top.qcow2")}
    ok(talk.command("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": top}))
    ok(talk.command("blockdev-add", {"driver": "copy-on-read", "node-name": "cor",
                                     "file": "top", **extra}))  # fmt: skip
    ok(talk.command("block-export-add", {"type": "nbd", "id": "cor", "node-name": "cor"}))


def close(talk: Talk) -> None:
    ok(talk.command("block-export-del", {"id": "cor"}))
    talk.events_after(0.2)
    ok(talk.command("blockdev-del", {"node-name": "cor"}))
    ok(talk.command("blockdev-del", {"node-name": "top"}))


def test_reads_copy_into_top(served: tuple[Talk, Path], tmp_path: Path) -> None:
    talk, sock = served
    make_images(tmp_path)
    add_cor(talk, tmp_path)
    out = qemu_io(sock, "cor", ["read -P 0xab 0 64k", "read -P 0xab 200k 10k",
                                "read -P 0 2M 64k"])  # fmt: skip
    assert out == [
        "read 65536/65536 bytes at offset 0",
        "read 10240/10240 bytes at offset 204800",
        "read 65536/65536 bytes at offset 2097152",
    ]
    close(talk)
    extents = qemu_map(tmp_path / "top.qcow2")
    assert depth_at(extents, 0) == 0  # copied: the overlay holds it now
    assert depth_at(extents, 192 * 1024) == 0  # the whole cluster around 200k..210k
    assert depth_at(extents, 64 * 1024) == 1  # not read: still the base's
    assert depth_at(extents, 2 << 20) == 1  # nothing below to copy: nothing allocated
    # Same data through the overlay alone, the image clean.
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    cmp = subprocess.run(["qemu-img", "compare", "-U", str(base), str(top)], capture_output=True)
    assert cmp.returncode == 0, cmp.stdout
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout


def test_bottom_limits_copies(served: tuple[Talk, Path], tmp_path: Path) -> None:
    """A three-layer chain: with ``bottom`` the middle layer, data only the base holds is
    read through without a copy; data the middle holds is copied."""
    talk, sock = served
    make_images(tmp_path)
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    top.rename(mid)
    subprocess.run(["qemu-io", "-c", "write -P 0xcd 1M 64k", str(mid)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(mid),
                    str(top)], check=True)  # fmt: skip
    mid_node = {"driver": "qcow2", "node-name": "mid",
                "file": {"driver": "file", "filename": str(mid)}}  # fmt: skip
    ok(talk.command("blockdev-add", mid_node))
    top_node = {"driver": "qcow2", "node-name": "top", "backing": "mid",
                "file": {"driver": "file", "filename": str(top)}}  # fmt: skip
    ok(talk.command("blockdev-add", top_node))
    ok(talk.command("blockdev-add", {"driver": "copy-on-read", "node-name": "cor",
                                     "file": "top", "bottom": "mid"}))  # fmt: skip
    ok(talk.command("block-export-add", {"type": "nbd", "id": "cor", "node-name": "cor"}))
    out = qemu_io(sock, "cor", ["read -P 0xab 0 64k", "read -P 0xcd 1M 64k"])
    assert out == ["read 65536/65536 bytes at offset 0", "read 65536/65536 bytes at offset 1048576"]
    close(talk)
    ok(talk.command("blockdev-del", {"node-name": "mid"}))
    extents = qemu_map(top)
    assert depth_at(extents, 0) == 2  # the base's, left there
    assert depth_at(extents, 1 << 20) == 0  # the middle's, copied


def test_writes_pass_and_query(served: tuple[Talk, Path], tmp_path: Path) -> None:
    talk, sock = served
    make_images(tmp_path)
    add_cor(talk, tmp_path)
    nodes = {n["node-name"]: n for n in talk.command("query-named-block-nodes")["reply"]["return"]}
    cor = nodes["cor"]
    top_path = str(tmp_path / "top.qcow2")
    assert cor["drv"] == "copy-on-read"
    assert cor["file"] == (
        'json:{"driver": "copy-on-read", "file": {"driver": "qcow2", "file": '
        '{"driver": "file", "filename": "' + top_path + '"}}}'
    )
    assert cor["children"] == [{"child": "file", "node-name": "top"}]
    assert cor["image"]["format"] == "copy-on-read"
    assert cor["image"]["cluster-size"] == 65536
    assert cor["image"]["virtual-size"] == 4 << 20
    ok(talk.command("block-export-del", {"id": "cor"}))
    talk.events_after(0.2)
    export = {"type": "nbd", "id": "cor", "node-name": "cor", "writable": True}
    ok(talk.command("block-export-add", export))
    out = qemu_io(sock, "cor", ["write -P 0x11 0 4k", "read -P 0x11 0 4k", "read -P 0xab 4k 4k"],
                  writable=True)  # fmt: skip
    assert out == ["wrote 4096/4096 bytes at offset 0", "read 4096/4096 bytes at offset 0",
                   "read 4096/4096 bytes at offset 4096"]  # fmt: skip


def test_option_errors(served: tuple[Talk, Path], tmp_path: Path) -> None:
    talk, _ = served
    make_images(tmp_path)
    base = {"driver": "file", "filename": str(tmp_path / "base.qcow2"), "read-only": True}
    replies = [
        talk.command("blockdev-add", {"driver": "copy-on-read", "node-name": "c",
                                      "file": {**base, "read-only": False}, "bottom": "nosuch"}),
        talk.command("blockdev-add", {"driver": "copy-on-read", "node-name": "c",
                                      "read-only": True, "file": base}),
    ]  # fmt: skip
    assert [r["reply"]["error"]["desc"] for r in replies] == [
        "Bottom node 'nosuch' not found",
        "Block node is read-only",
    ]
