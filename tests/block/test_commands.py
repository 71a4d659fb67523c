"""The block layer's QMP handlers, called as the daemon calls them (validated args)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qsd_py.block import commands  # noqa: F401 - registers the handlers
from qsd_py.block.graph import BlockGraph
from qsd_py.commands import HANDLERS
from qsd_py.errors import QMPError


async def run(graph: BlockGraph, name: str, args: dict[str, Any]) -> Any:
    return await HANDLERS[name](SimpleNamespace(graph=graph), args)


def file_args(path: Path, name: str = "f0", **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": str(path), **extra}


async def test_add_query_del(graph: BlockGraph, image) -> None:
    assert await run(graph, "blockdev-add", file_args(image())) == {}
    assert await run(graph, "blockdev-add", {"driver": "null-co", "node-name": "n0"}) == {}
    names = [n["node-name"] for n in await run(graph, "query-named-block-nodes", {})]
    assert names == ["n0", "f0"]
    assert await run(graph, "query-named-block-nodes", {"flat": True}) == graph.query()
    assert await run(graph, "blockdev-del", {"node-name": "f0"}) == {}
    assert [n["node-name"] for n in graph.query()] == ["n0"]


async def test_block_resize(graph: BlockGraph, image) -> None:
    path = image(1 << 20)
    await run(graph, "blockdev-add", file_args(path))
    await run(graph, "block_resize", {"node-name": "f0", "size": 2097153})
    assert path.stat().st_size == 2097153  # the node counts whole sectors, as in QEMU
    assert graph.lookup("f0").length() == 2097664
    await run(graph, "block_resize", {"device": "f0", "node-name": "f0", "size": 4096})
    assert path.stat().st_size == 4096
    assert not graph.lookup("f0").users  # the temporary user is gone


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"node-name": "nope", "size": 1}, "Cannot find device='' nor node-name='nope'"),
        ({"device": "nope", "size": 1}, "Cannot find device='nope' nor node-name=''"),
        ({"device": "f0", "size": 1}, "Cannot find device='f0' nor node-name=''"),
        ({"size": 1}, "Cannot find device='' nor node-name=''"),
        ({"node-name": "nope", "size": -1}, "Cannot find device='' nor node-name='nope'"),
        ({"node-name": "f0", "size": -1}, "Parameter 'size' expects a >0 size"),
        ({"node-name": "ro", "size": 4096}, "Image is read-only"),
        ({"node-name": "n0", "size": 4096}, "Image format driver does not support resize"),
        ({"node-name": "nro", "size": 4096}, "Image is read-only"),
        ({"node-name": "fixed", "size": 8192}, "Cannot resize fixed-size raw disks"),
        (
            {"node-name": "win", "size": 8192},
            "Permission conflict on node 'f0': permissions 'resize' are both required by "
            "node 'win' (uses node 'f0' as 'file' child) and unshared by node 'fixed' "
            "(uses node 'f0' as 'file' child).",
        ),
    ],
)
async def test_block_resize_errors(
    graph: BlockGraph, image, args: dict[str, Any], error: str
) -> None:
    await run(graph, "blockdev-add", file_args(image(1 << 20)))
    await run(graph, "blockdev-add", file_args(image(name="ro"), "ro", **{"read-only": True}))
    await run(graph, "blockdev-add", {"driver": "null-co", "node-name": "n0"})
    await run(graph, "blockdev-add", {"driver": "null-co", "node-name": "nro", "read-only": True})
    fixed = {"driver": "raw", "node-name": "fixed", "file": "f0", "offset": 100, "size": 4096}
    await run(graph, "blockdev-add", fixed)
    if args.get("node-name") == "win":  # a second window, whose resize the first refuses
        win = {"driver": "raw", "node-name": "win", "file": "f0", "offset": 100}
        await run(graph, "blockdev-add", win)
    with pytest.raises(QMPError) as exc:
        await run(graph, "block_resize", args)
    assert exc.value.desc == error


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"force-share": True}, "force-share=on can only be used with read-only images"),
        (
            {"detect-zeroes": "unmap"},
            "setting detect-zeroes to unmap is not allowed without setting discard operation "
            "to unmap",
        ),
        ({"detect-zeroes": "on"}, "detect-zeroes=on is not supported by qsd-py"),
    ],
)
async def test_blockdev_add_base_option_errors(
    graph: BlockGraph, image, args: dict[str, Any], error: str
) -> None:
    with pytest.raises(QMPError) as exc:
        await run(graph, "blockdev-add", file_args(image(), **args))
    assert exc.value.desc == error


async def test_force_share_takes_no_unshare_locks(graph: BlockGraph, image) -> None:
    from test_locking import locked_bytes

    path = image()
    await run(graph, "blockdev-add", file_args(path, **{"read-only": True, "force-share": True}))
    await run(
        graph, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f0", "offset": 512}
    )
    assert locked_bytes(path) == set()  # QEMU 11.1 too: a window over it locks nothing
