"""The filter nodes in a graph of the test's own loop: no fast path for exports (every
request must pass the filter), blkdebug's event hooks counted on the graph, its state
machine and a ``once`` rule as QEMU's blkdebug runs them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from filters_support import make_images

from qsd_py.block.graph import BlockGraph


async def test_no_fast_path(graph: BlockGraph, tmp_path: Path) -> None:
    make_images(tmp_path)
    top = {"driver": "file", "filename": str(tmp_path / "top.qcow2")}
    await graph.add({"driver": "qcow2", "node-name": "top", "file": top})
    cor = await graph.add({"driver": "copy-on-read", "node-name": "cor", "file": "top"})
    raw = {"driver": "file", "filename": str(tmp_path / "base.qcow2"), "node-name": "f"}
    dbg = await graph.add({"driver": "blkdebug", "node-name": "dbg", "image": raw})
    assert graph.lookup("f").fast_target() is not None  # a file has one...
    assert cor.fast_target() is None  # ...the filters never
    assert dbg.fast_target() is None
    assert graph.debug_nodes == 1
    await graph.delete("dbg")
    assert graph.debug_nodes == 0


async def test_state_machine_and_once(graph: BlockGraph, tmp_path: Path) -> None:
    """Events raised by hand: set-state rules move the state after all rules of the event
    ran; an inject rule of the current state arms; ``once`` fails one request only; a
    sector rule fails only requests covering its sector."""
    make_images(tmp_path)
    raw = {"driver": "file", "filename": str(tmp_path / "base.qcow2")}
    dbg = await graph.add(
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "image": raw,
            "set-state": [{"event": "l2_load", "state": 1, "new_state": 2}],
            "inject-error": [
                {"event": "l2_load", "state": 2, "errno": errno.ENOSPC, "once": True},
                {"event": "read_aio", "sector": 8, "immediately": True},
            ],
        }
    )
    buf = memoryview(bytearray(512))
    dbg.debug_event("l2_load")  # state 1 -> 2; the state-2 rule is not armed yet
    assert dbg.state == 2
    await dbg.read(0, buf)
    dbg.debug_event("l2_load")  # in state 2: arms the once rule
    with pytest.raises(OSError) as err:
        await dbg.read(0, buf)
    assert err.value.errno == errno.ENOSPC
    await dbg.read(0, buf)  # once: gone
    dbg.debug_event("read_aio")  # replaces the active list: only the sector rule
    await dbg.read(0, buf)
    with pytest.raises(OSError) as err:
        await dbg.read(8 * 512, buf)
    assert err.value.errno == errno.EIO
    await dbg.write(0, bytes(512))  # a write that misses sector 8 passes
