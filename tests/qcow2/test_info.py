"""query-named-block-nodes for qcow2 nodes and backing chains, as QEMU 11.1 answers it
(measured with real-qsd: the node order, the chain members, ``flat``, ``json:`` names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from images import check as images_check
from images import create, write
from images import info as images_info

from qsd_py.block.graph import BlockGraph

MiB = 1 << 20


def chain(tmp_path: Path) -> Path:
    create(tmp_path / "base.qcow2", "64M")
    write(tmp_path / "base.qcow2", 0, 65536, 1)
    create(tmp_path / "mid.qcow2", "64M", backing="base.qcow2")
    create(tmp_path / "top.qcow2", "64M", backing="mid.qcow2")
    return tmp_path / "top.qcow2"


def by_name(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in nodes}


FS11 = {
    "compat": "1.1",
    "extended-l2": False,
    "lazy-refcounts": False,
    "corrupt": False,
    "refcount-bits": 16,
    "compression-type": "zlib",
}


async def test_chain_opened_from_the_headers(graph: BlockGraph, tmp_path: Path) -> None:
    top = chain(tmp_path)
    await graph.add({"driver": "file", "node-name": "ftop", "filename": str(top)})
    await graph.add({"driver": "qcow2", "node-name": "top", "file": "ftop"})
    nodes = graph.query()
    drivers = [n["drv"] for n in nodes]
    assert drivers == ["qcow2", "file", "qcow2", "file", "qcow2", "file"]  # base first
    assert [n["node-name"] for n in nodes][-2:] == ["top", "ftop"]
    base, mid, topn = nodes[0], nodes[2], nodes[4]
    assert all(n["ro"] for n in nodes[:4]) and not topn["ro"]
    assert topn["backing_file"] == str(tmp_path / "mid.qcow2")
    assert (topn["backing_file_depth"], mid["backing_file_depth"], base["backing_file_depth"]) == (
        2,
        1,
        0,
    )
    assert "backing_file" not in base
    assert topn["children"] == [
        {"child": "backing", "node-name": mid["node-name"]},
        {"child": "file", "node-name": "ftop"},
    ]
    image = topn["image"]
    assert image["backing-filename"] == "mid.qcow2"
    assert image["full-backing-filename"] == str(tmp_path / "mid.qcow2")
    assert image["backing-filename-format"] == "qcow2"
    assert image["cluster-size"] == 65536 and image["format-specific"]["data"] == FS11
    assert image["backing-image"]["filename"] == str(tmp_path / "mid.qcow2")
    assert image["backing-image"]["backing-image"]["filename"] == str(tmp_path / "base.qcow2")
    assert "backing-image" not in image["backing-image"]["backing-image"]
    assert image["limits"]["discard-alignment"] == 65536
    assert image["limits"]["write-zeroes-alignment"] == 65536
    flat = graph.query(flat=True)
    assert all(n["backing_file_depth"] == 0 for n in flat)
    assert all("backing-image" not in n["image"] for n in flat)


async def test_explicit_backing_makes_json_names(graph: BlockGraph, tmp_path: Path) -> None:
    top = chain(tmp_path)
    for name in ("base", "mid", "top"):
        await graph.add(
            {"driver": "file", "node-name": f"f{name}", "filename": str(tmp_path / f"{name}.qcow2")}
        )
    await graph.add({"driver": "qcow2", "node-name": "base", "file": "fbase", "backing": None})
    await graph.add({"driver": "qcow2", "node-name": "mid", "file": "fmid", "backing": "base"})
    await graph.add({"driver": "qcow2", "node-name": "top", "file": "ftop", "backing": "mid"})
    nodes = by_name(graph.query())
    assert [n["node-name"] for n in graph.query()] == [
        "top",
        "mid",
        "base",
        "ftop",
        "fmid",
        "fbase",
    ]
    assert nodes["base"]["file"] == str(tmp_path / "base.qcow2")
    f = str(tmp_path)
    mid_desc = {
        "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": f"{f}/base.qcow2"}},
        "driver": "qcow2",
        "file": {"driver": "file", "filename": f"{f}/mid.qcow2"},
    }
    assert nodes["mid"]["file"] == "json:" + json.dumps(mid_desc, sort_keys=True)
    assert nodes["top"]["backing_file"] == nodes["mid"]["file"]
    top_desc = {
        "backing": mid_desc,
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(top)},
    }
    assert nodes["top"]["image"]["filename"] == "json:" + json.dumps(top_desc, sort_keys=True)
    assert nodes["top"]["image"]["backing-filename"] == "mid.qcow2"


async def test_backing_null_over_a_named_one(graph: BlockGraph, tmp_path: Path) -> None:
    top = chain(tmp_path)
    await graph.add(
        {
            "driver": "qcow2",
            "node-name": "top",
            "file": {"driver": "file", "filename": str(top)},
            "backing": None,
        }  # fmt: skip
    )
    node = by_name(graph.query())["top"]
    desc = {"backing": None, "driver": "qcow2", "file": {"driver": "file", "filename": str(top)}}
    assert node["file"] == "json:" + json.dumps(desc, sort_keys=True)
    assert "backing_file" not in node and node["backing_file_depth"] == 0
    assert node["image"]["backing-filename"] == "mid.qcow2"


@pytest.mark.parametrize(
    ("opts", "data"),
    [
        ({"compat": "0.10"}, {"compat": "0.10", "refcount-bits": 16, "compression-type": "zlib"}),
        ({"extended_l2": True}, {**FS11, "extended-l2": True}),
        ({"compression_type": "zstd"}, {**FS11, "compression-type": "zstd"}),
        ({"lazy_refcounts": True}, {**FS11, "lazy-refcounts": True}),
        ({"cluster_size": 4096, "refcount_bits": 1}, {**FS11, "refcount-bits": 1}),
    ],
)
async def test_format_specific(graph: BlockGraph, tmp_path: Path, opts: dict, data: dict) -> None:
    img = create(tmp_path / "v.qcow2", "64M", **opts)
    await graph.add(
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    )
    node = by_name(graph.query())["q"]
    assert node["image"]["format-specific"] == {"type": "qcow2", "data": data}
    if opts.get("extended_l2"):
        assert node["image"]["limits"]["write-zeroes-alignment"] == 2048


async def test_data_file_in_info(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "ext.qcow2", "64M", data_file="ext.data")
    write(img, 0, 65536, 3)
    await graph.add(
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    )
    nodes = graph.query()
    q = by_name(nodes)["q"]
    assert [c["child"] for c in q["children"]] == ["data-file", "file"]
    assert q["image"]["format-specific"]["data"]["data-file"] == str(tmp_path / "ext.data")
    assert q["image"]["format-specific"]["data"]["data-file-raw"] is False
    sizes = {n["node-name"]: n["image"]["actual-size"] for n in nodes}
    files = [name for name in sizes if name != "q"]
    assert q["image"]["actual-size"] == sum(sizes[f] for f in files)


async def test_a_backing_node_is_busy(graph: BlockGraph, tmp_path: Path) -> None:
    """blockdev-del of a node another reads through: QEMU's blocker text comes before the
    monitor-ownership one."""
    from qsd_py.errors import QMPError

    top = chain(tmp_path)
    await graph.add({"driver": "qcow2", "node-name": "top",
                     "file": {"driver": "file", "filename": str(top)}})  # fmt: skip
    mid = graph.lookup("top").child_node("backing")
    assert mid is not None
    with pytest.raises(QMPError) as exc:
        await graph.delete(mid.node_name)
    assert exc.value.desc == (
        f"Node '{mid.node_name}' is busy: node is used as backing hd of 'top'"
    )


@pytest.mark.parametrize("backing", ["absent", None])
async def test_an_empty_backing_name_names_none(
    graph: BlockGraph, tmp_path: Path, backing: str | None
) -> None:
    """A backing file offset over a name of NUL bytes: QEMU 11.1 opens no backing file, shows
    no backing names, and ``backing: null`` overrides nothing (the plain file name stays)."""
    import damage

    img = damage.DAMAGES["backing-name-1023-in-4k-cluster"].make(tmp_path)
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": "q",
                            "file": {"driver": "file", "filename": str(img)}}  # fmt: skip
    if backing is None:
        opts["backing"] = None
    await graph.add(opts)
    node = by_name(graph.query())["q"]
    assert [c["child"] for c in node["children"]] == ["file"]
    assert node["file"] == node["image"]["filename"] == str(img)
    names = {"backing_file", "backing-filename", "full-backing-filename", "backing-image"}
    assert not names & {*node, *node["image"]}
    assert damage.get(img, "backing_file_offset") == 0xC00


def bitmap_infos(node: dict[str, Any]) -> list[dict[str, Any]] | None:
    return node["image"]["format-specific"]["data"].get("bitmaps")


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
async def test_persistent_bitmaps_in_format_specific(
    graph: BlockGraph, tmp_path: Path, read_only: bool
) -> None:
    """ImageInfoSpecificQCow2's bitmaps, as QEMU 11.1 shows them (facts 1.9): what the
    directory says, in directory order. A read-write open marks every bitmap in use in the
    file, and close stores them with the mark cleared (QEMU does both)."""
    import damage

    img = damage.DAMAGES["bitmaps-two"].make(tmp_path)
    opts = {"driver": "qcow2", "node-name": "q", "read-only": read_only,
            "file": {"driver": "file", "filename": str(img)}}  # fmt: skip
    await graph.add(opts)
    node = by_name(graph.query())["q"]
    in_use = [] if read_only else ["in-use"]
    assert bitmap_infos(node) == [
        {"name": "bm0", "granularity": 65536, "flags": [*in_use, "auto"]},
        {"name": "bm1", "granularity": 1 << 20, "flags": in_use},
    ]
    data = node["image"]["format-specific"]["data"]
    assert list(data)[-2:] == ["bitmaps", "compression-type"]  # the schema's order
    await graph.close_all()
    listed = images_info(img)["format-specific"]["data"]["bitmaps"]
    assert [b["flags"] for b in listed] == [["auto"], []]
    assert images_check(img)[0] == 0


async def test_bitmap_in_use_on_disk_shows_read_only(graph: BlockGraph, tmp_path: Path) -> None:
    """A bitmap not saved cleanly shows in-use even read-only; its table is not read."""
    import damage

    img = damage.DAMAGES["bitmap-in-use"].make(tmp_path)
    await graph.add({"driver": "qcow2", "node-name": "q", "read-only": True,
                     "file": {"driver": "file", "filename": str(img)}})  # fmt: skip
    flags = [b["flags"] for b in bitmap_infos(by_name(graph.query())["q"]) or []]
    assert flags == [["in-use", "auto"], []]


async def test_no_bitmaps_no_member(graph: BlockGraph, tmp_path: Path) -> None:
    img = create(tmp_path / "plain.qcow2", "64M")
    await graph.add(
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
    )
    assert bitmap_infos(by_name(graph.query())["q"]) is None
