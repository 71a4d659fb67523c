"""The ``mirror_top`` filter node of a mirror: what clients see of it is QEMU 11.1's
(recorded transcript, mirror_filter_script.py), and the exports' fast path goes through it
to the source (in-process: the plan an export makes for the filter writes around its
coroutines and marks the job's bitmap, which lives on the filter)."""

from __future__ import annotations

import json
from pathlib import Path

import mirror_filter_script
import pytest

from qsd_py.block import fast_io
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.drivers import mirror_top
from qsd_py.block.graph import BlockGraph

MIB = 1 << 20


def test_transcript_is_qemus(tmp_path: Path) -> None:
    want = json.loads(mirror_filter_script.DATA.read_text())
    assert mirror_filter_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("mirror-filter-live") as work:
        real = mirror_filter_script.run_script(True, work)
        assert mirror_filter_script.run_script(False, work) == real


async def test_fast_path_through_the_filter(graph: BlockGraph, tmp_path: Path) -> None:
    """A plan made for the filter reaches the source's file, stays writable with the job's
    shared bitmap on the filter, and its fast writes mark that bitmap; a recording bitmap
    below the exported node would close the queue workers' gate instead (byte 1 of the
    node's fork page), so none may sit on the source."""
    path = tmp_path / "s.img"
    with open(path, "wb") as f:
        f.truncate(MIB)
    source = await graph.add({"driver": "file", "filename": str(path), "node-name": "s"})
    fil = mirror_top.insert(graph, source, "mf")
    mirror_top.put_above(fil)
    bitmap = DirtyBitmap(MIB, 65536)
    bitmap.share()
    fil.add_dirty_bitmap(bitmap)
    plan = fast_io.plan_for(fil)
    try:
        assert plan is not None and plan.writable
        assert plan.fd == source.fd
        assert plan in fil.fast_plans and plan in source.fast_plans
        assert source.fork_page[1] == 0 and fil.fork_page[0] == 0
        plan.mark(128 * 1024, 4096)
        assert bitmap.count == 65536
    finally:
        fil.remove_dirty_bitmap(bitmap)
        mirror_top.take_away(fil, source)
        mirror_top.discard(fil)
    assert graph.find("mf") is None and not source.users
