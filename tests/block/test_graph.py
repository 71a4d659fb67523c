"""Graph rules: names, duplicates, implicit children, deletion, query order, permissions.

Error texts are QEMU 11.1's, as measured with real-qsd (see the report of the block layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError


def file_opts(path: Path, name: str | None = "f0", **extra: Any) -> dict[str, Any]:
    opts = {"driver": "file", "filename": str(path), **extra}
    if name is not None:
        opts["node-name"] = name
    return opts


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("1bad", "Invalid node-name: '1bad'"),
        ("#x", "Invalid node-name: '#x'"),
        ("", "Invalid node-name: ''"),
        ("a b", "Invalid node-name: 'a b'"),
        ("a" * 32, "Node name too long"),
        (None, "'node-name' must be specified for the root node"),
    ],
)
async def test_bad_node_names(graph: BlockGraph, image, name: str | None, error: str) -> None:
    with pytest.raises(QMPError) as exc:
        await graph.add(file_opts(image(), name))
    assert exc.value.desc == error
    assert len(graph) == 0


@pytest.mark.parametrize("name", ["a" * 31, "x-y_z", "a.b", "Z9"])
async def test_good_node_names(graph: BlockGraph, image, name: str) -> None:
    node = await graph.add(file_opts(image(), name))
    assert graph.lookup(name) is node


async def test_duplicate_name(graph: BlockGraph, image) -> None:
    await graph.add(file_opts(image()))
    with pytest.raises(QMPError, match="^Duplicate nodes with node-name='f0'$"):
        await graph.add(file_opts(image()))
    inline = {"driver": "raw", "node-name": "r7", "file": file_opts(image(), "r7")}
    with pytest.raises(QMPError, match="^Duplicate nodes with node-name='r7'$"):
        await graph.add(inline)
    assert [n["node-name"] for n in graph.query()] == ["f0"]


async def test_lookup_errors(graph: BlockGraph) -> None:
    with pytest.raises(QMPError, match=r"^Cannot find device='' nor node-name='nope'$"):
        graph.lookup("nope")
    with pytest.raises(QMPError, match=r"^Failed to find node with node-name='nope'$"):
        await graph.delete("nope")
    with pytest.raises(QMPError, match=r"^Cannot find device='nope' nor node-name='nope'$"):
        await graph.add({"driver": "raw", "node-name": "r", "file": "nope"})


async def test_implicit_child_lives_and_dies_with_parent(graph: BlockGraph, image) -> None:
    raw = await graph.add({"driver": "raw", "node-name": "r0", "file": file_opts(image(), None)})
    child = raw.children["file"].node
    assert child.node_name.startswith("#block")
    # Newest first; the implicit child was registered before its parent, as in QEMU.
    assert [n["node-name"] for n in graph.query()] == ["r0", child.node_name]
    with pytest.raises(QMPError) as exc:
        await graph.delete(child.node_name)
    assert exc.value.desc == f"Node {child.node_name} is not owned by the monitor"
    await graph.delete("r0")
    assert len(graph) == 0
    assert child.fd == -1  # closed


async def test_failed_parent_removes_implicit_child(graph: BlockGraph, image) -> None:
    opts = {"driver": "raw", "node-name": "r0", "offset": 1 << 30, "file": file_opts(image(), None)}
    with pytest.raises(QMPError, match=r"^Offset \(1073741824\) cannot be greater"):
        await graph.add(opts)
    assert len(graph) == 0


async def test_inline_child_inherits_options(graph: BlockGraph, image) -> None:
    raw = await graph.add(
        {
            "driver": "raw",
            "node-name": "r0",
            "read-only": True,
            "cache": {"no-flush": True},
            "file": file_opts(image(), None),
        }
    )
    child = raw.children["file"].node
    assert child.read_only and child.no_flush
    assert child.discard_unmap  # lower layers unmap by default; raw filters it
    assert not raw.discard_unmap


async def test_delete_in_use(graph: BlockGraph, image) -> None:
    f0 = await graph.add(file_opts(image()))
    await graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    with pytest.raises(QMPError, match="^Block device f0 is in use$"):
        await graph.delete("f0")
    graph.lookup("r0").add_user("export0", write=False)
    with pytest.raises(QMPError, match="^Node r0 is in use$"):
        await graph.delete("r0")
    graph.lookup("r0").remove_user("export0")
    await graph.delete("r0")
    await graph.delete("f0")
    assert f0.fd == -1 and len(graph) == 0


async def test_read_only_refuses_writer(graph: BlockGraph, image) -> None:
    f0 = await graph.add({**file_opts(image()), "read-only": True})
    await graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    raw = graph.lookup("r0")
    with pytest.raises(QMPError, match="^Block node is read-only$"):
        raw.add_user("e0", write=True)
    assert not raw.users and not any(u.perm & 2 for u in f0.users.values())
    raw.add_user("e0", write=False)  # readers are fine
    with pytest.raises(QMPError, match="^Block node is read-only$"):
        f0.add_user("e1", write=True)


async def test_permission_conflict_text(graph: BlockGraph, image) -> None:
    await graph.add(file_opts(image(), locking="off"))
    await graph.add({"driver": "raw", "node-name": "r0", "file": "f0", "size": 4096})
    await graph.add({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 512})
    with pytest.raises(QMPError) as exc:
        graph.lookup("f0").add_user("e0", write=True)
    assert exc.value.desc == (
        "Permission conflict on node 'f0': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'f0' as 'root' child) and unshared by node 'r1' "
        "(uses node 'f0' as 'file' child)."
    )
    assert "e0" not in graph.lookup("f0").users


async def test_query_shape(graph: BlockGraph, image) -> None:
    path = image(1 << 20, data=b"x" * 8192)
    await graph.add(file_opts(path))
    await graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    await graph.add({"driver": "null-co", "node-name": "n0"})
    n0, r0, f0 = graph.query()
    assert f0["drv"] == "file" and f0["file"] == str(path) and f0["ro"] is False
    assert f0["image"]["format"] == "file" and f0["image"]["virtual-size"] == 1 << 20
    assert f0["image"]["actual-size"] >= 8192
    assert f0["image"]["format-specific"] == {"type": "file", "data": {}}
    assert f0["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    assert r0["children"] == [{"child": "file", "node-name": "f0"}]
    assert r0["image"]["format"] == "raw" and r0["file"] == str(path)
    assert n0["file"] == "null-co://" and n0["image"]["virtual-size"] == 1 << 30
    for key in ("detect_zeroes", "write_threshold", "encrypted", "backing_file_depth", "iops"):
        assert key in n0


async def test_close_all_releases_everything(image) -> None:
    g = BlockGraph()
    f0 = await g.add(file_opts(image()))
    await g.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    g.lookup("r0").add_user("e0", write=True)
    await g.close_all()
    assert len(g) == 0 and f0.fd == -1
