"""x-debug-query-block-graph, x-blockdev-change and x-blockdev-set-iothread: the answers
QEMU 11.1's daemon gave for the same graphs (test_realqsd_query.py holds the live
comparison)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from querykit import new_daemon, reply


async def _setup(tmp_path: Path, *, nbd: bool = True) -> Any:
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "4M"],
                   check=True, capture_output=True)  # fmt: skip
    (tmp_path / "r.img").write_bytes(bytes(1 << 22))
    daemon, _ = new_daemon()
    assert await reply(daemon, "object-add", {"qom-type": "iothread", "id": "io0"}) == {}
    for args in (
        {"driver": "file", "node-name": "f0", "filename": str(image)},
        {"driver": "qcow2", "node-name": "d0", "file": "f0"},
        {"driver": "file", "node-name": "r0", "filename": str(tmp_path / "r.img")},
        {"driver": "null-co", "node-name": "n0"},
    ):
        assert await reply(daemon, "blockdev-add", args) == {}
    if nbd:
        addr = {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}
        assert await reply(daemon, "nbd-server-start", {"addr": addr}) == {}
        export = {"type": "nbd", "id": "e0", "node-name": "d0", "writable": True}
        assert await reply(daemon, "block-export-add", export) == {}
    return daemon


async def _teardown(daemon: Any) -> None:
    await daemon.close()


async def test_graph_is_qemus(tmp_path: Path) -> None:
    daemon = await _setup(tmp_path)
    try:
        graph = await reply(daemon, "x-debug-query-block-graph")
    finally:
        await _teardown(daemon)
    assert graph == {
        "nodes": [
            {"id": 5, "type": "block-driver", "name": "n0"},
            {"id": 4, "type": "block-driver", "name": "r0"},
            {"id": 2, "type": "block-driver", "name": "d0"},
            {"id": 3, "type": "block-driver", "name": "f0"},
            {"id": 1, "type": "block-backend", "name": ""},
        ],
        "edges": [
            {"parent": 2, "child": 3, "name": "file",
             "perm": ["resize", "write", "consistent-read"],
             "shared-perm": ["write-unchanged", "consistent-read"]},
            {"parent": 1, "child": 2, "name": "root",
             "perm": ["write", "consistent-read"],
             "shared-perm": ["write-unchanged", "write", "consistent-read"]},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"parent": "zz"}, "Cannot find device='zz' nor node-name='zz'"),
        ({"parent": "d0"}, "Either child or node must be specified"),
        ({"parent": "d0", "child": "file"}, "The node d0 does not support removing a child"),
        ({"parent": "d0", "node": "n0"}, "The node d0 does not support adding a child"),
        ({"parent": "d0", "child": "file", "node": "n0"},
         "The parameters child and node are in conflict"),
        ({"parent": "d0", "child": "zz"}, "Node 'd0' does not have child 'zz'"),
        ({"parent": "d0", "node": "zz"}, "Node 'zz' not found"),
    ],
)  # fmt: skip
async def test_blockdev_change_texts(tmp_path: Path, args: dict[str, Any], error: str) -> None:
    daemon = await _setup(tmp_path, nbd=False)
    try:
        assert await reply(daemon, "x-blockdev-change", args) == ("error", error)
    finally:
        await _teardown(daemon)


async def test_set_iothread(tmp_path: Path) -> None:
    from qsd_py.graph_commands import NODE_IOTHREADS

    daemon = await _setup(tmp_path)
    try:
        steps = [
            ({"node-name": "zz", "iothread": "io0"},
             ("error", "Failed to find node with node-name='zz'")),
            ({"node-name": "d0", "iothread": "io0"},
             ("error", "Node d0 is associated with a BlockBackend and could be in use "
                       "(use force=true to override this check)")),
            ({"node-name": "r0", "iothread": "zz"}, ("error", "Cannot find iothread zz")),
            ({"node-name": "f0", "iothread": "io0"}, {}),  # its parent's export follows
            ({"node-name": "r0", "iothread": "io0"}, {}),
            ({"node-name": "r0", "iothread": None}, {}),
            ({"node-name": "d0", "iothread": None, "force": True}, {}),
        ]  # fmt: skip
        for args, answer in steps:
            assert await reply(daemon, "x-blockdev-set-iothread", args) == answer
        nodes = {n.node_name: NODE_IOTHREADS.get(n) for n in daemon.graph}
        assert nodes == {"f0": None, "d0": None, "r0": None, "n0": None}
        await reply(daemon, "x-blockdev-set-iothread", {"node-name": "f0", "iothread": "io0"})
        nodes = {n.node_name: NODE_IOTHREADS.get(n) for n in daemon.graph}
        assert nodes == {"f0": "io0", "d0": "io0", "r0": None, "n0": None}
    finally:
        await _teardown(daemon)
