"""Children with roles, swapping a child (pivot), drain, driver lookup, and block status
through a backing chain."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import pytest

from qsd_py.block.drivers import driver_class
from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import (
    STATUS_ALLOCATED,
    STATUS_DATA,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
)
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.errors import QMPError
from qsd_py.qapi.schema import load_schema

MiB = 1 << 20


def raw_opts(path: Path, name: str, file_name: str) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "node-name": file_name, "filename": str(path)},
    }


def test_every_schema_driver_has_a_module() -> None:
    """The QAPI enum is the one list of drivers: each value names a module with its node."""
    names = load_schema().model.types["BlockdevDriver"].values  # type: ignore[attr-defined]
    assert names
    for name in names:
        assert driver_class(name).driver == name


def test_unknown_driver_module() -> None:
    with pytest.raises(QMPError, match="^Unknown driver 'nope'$"):
        driver_class("nope")


async def test_child_link_and_its_user(graph: BlockGraph, image) -> None:
    raw = await graph.add(raw_opts(image(), "r0", "f0"))
    child = raw.children["file"]
    assert (child.role, child.node.node_name, child.parent) == ("file", "f0", raw)
    user = child.node.users[child.key]
    assert user.is_parent and "as 'file' child" in user.description
    assert raw.info()["children"] == [{"child": "file", "node-name": "f0"}]


async def test_replace_moves_permissions(graph: BlockGraph, image) -> None:
    raw = await graph.add(raw_opts(image(), "r0", "f0"))
    other = await graph.add({"driver": "file", "node-name": "f1", "filename": str(image(name="b"))})
    raw.add_user("export", write=True)
    child = raw.children["file"]
    old = raw.file
    await raw.replace_child("file", other)
    assert child.node is other and raw.file is other
    assert child.key in other.users and child.key not in old.users
    assert other.users[child.key].perm & Perm.WRITE  # the export's write went along
    assert "f0" not in graph and old.fd < 0  # the implicit old child was closed


async def test_replace_refused_keeps_the_link(graph: BlockGraph, image) -> None:
    raw = await graph.add(raw_opts(image(), "r0", "f0"))
    other = await graph.add({"driver": "file", "node-name": "f1", "filename": str(image(name="b"))})
    raw.add_user("export", write=True)
    other.set_user(NodeUser("blocker", Perm(0), PERM_ALL & ~Perm.WRITE, "a blocker"))
    with pytest.raises(QMPError, match="Permission conflict on node 'f1'"):
        await raw.replace_child("file", other)
    assert raw.file.node_name == "f0"
    assert raw.children["file"].key not in other.users


async def test_drain_waits_for_requests_above(graph: BlockGraph, image) -> None:
    """A request in flight on the parent keeps a drain of the child waiting; a user's
    quiesce hook is called before and its resume after."""
    raw = await graph.add(raw_opts(image(MiB), "r0", "f0"))
    file_node = raw.file
    events: list[str] = []

    async def quiesce():
        events.append("quiesce")
        return lambda: events.append("resume")

    raw.set_user(NodeUser("exp", Perm.CONSISTENT_READ, PERM_ALL, "an export", quiesce=quiesce))
    gate = asyncio.Event()
    real_read = file_node.do_read

    async def slow_read(offset: int, buf: memoryview) -> None:
        await gate.wait()
        await real_read(offset, buf)

    file_node.do_read = slow_read  # type: ignore[method-assign]
    reader = asyncio.ensure_future(raw.read(0, memoryview(bytearray(512))))
    await asyncio.sleep(0.01)
    assert raw.in_flight.count == 1 and file_node.in_flight.count == 1

    async def drain() -> None:
        async with file_node.drained():
            events.append("drained")
            assert raw.in_flight.count == 0 and file_node.in_flight.count == 0

    drainer = asyncio.ensure_future(drain())
    await asyncio.sleep(0.01)
    assert events == ["quiesce"]  # still waiting for the read
    gate.set()
    await asyncio.gather(reader, drainer)
    assert events == ["quiesce", "drained", "resume"]


class _Layer(BlockNode):
    """A node of a test chain: holds the clusters listed in ``data``/``zero``, the rest
    falls through to its backing node."""

    driver = "layer"
    format_name = "layer"
    supports_backing: ClassVar[bool] = True

    def __init__(self, graph: BlockGraph, name: str, size: int, data: set[int], zero: set[int]):
        super().__init__(graph, {"node-name": name})
        self.size, self.data, self.zero = size, data, zero

    def length(self) -> int:
        return self.size

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        c = offset // MiB
        flags = STATUS_DATA if c in self.data else STATUS_ZERO if c in self.zero else 0
        return BlockStatus(flags, min(length, (c + 1) * MiB - offset))


async def test_block_status_through_a_chain(graph: BlockGraph) -> None:
    base = _Layer(graph, "base", 2 * MiB, {0}, set())
    mid = _Layer(graph, "mid", 4 * MiB, {2}, {1})
    top = _Layer(graph, "top", 4 * MiB, {3}, set())
    mid.attach_child("backing", base, Perm.CONSISTENT_READ, PERM_ALL)
    top.attach_child("backing", mid, Perm.CONSISTENT_READ, PERM_ALL)
    expect = {  # cluster: (depth, data, zero)
        0: (3, True, False),  # from base
        1: (2, False, True),  # a zero cluster in mid
        2: (2, True, False),
        3: (1, True, False),
    }
    for c, (depth, data, zero) in expect.items():
        st = await top.block_status_above(c * MiB, MiB)
        assert (st.depth, bool(st.flags & STATUS_DATA), bool(st.flags & STATUS_ZERO)) == (
            depth,
            data,
            zero,
        ), c
        assert st.flags & STATUS_ALLOCATED
    # Past the end of mid's backing node (base is 2 MiB): unallocated in the whole chain,
    # and mid says it reads as zeroes.
    empty = _Layer(graph, "e", 4 * MiB, set(), set())
    empty.attach_child("backing", base, Perm.CONSISTENT_READ, PERM_ALL)
    st = await empty.block_status_above(3 * MiB, MiB)
    assert st.depth == 0 and st.flags & STATUS_ZERO and not st.flags & STATUS_ALLOCATED
    st = await empty.block_status_above(0, MiB)
    assert st.depth == 2 and st.flags & STATUS_DATA
