"""A run of refcounts changes in one pass per refcount block (refcount.py's ``_add``): the
same counts as one at a time, for every cell width, and a run that would push one count
past its width changes none of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from images import check, create

from qsd_py.block.graph import BlockGraph
from qsd_py.block.qcow2.refcount import RefcountError


def _opts(path: Path) -> dict[str, object]:
    return {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(path)}}


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
async def test_run_counts_as_one_at_a_time(graph: BlockGraph, tmp_path: Path, bits: int) -> None:
    img = create(tmp_path / "a.qcow2", "4M", refcount_bits=bits)
    node = await graph.add(_opts(img))
    rc = node.refcounts
    first = rc.high_water + 3
    before = [await rc.get(i) for i in range(first, first + 20)]
    await rc._change(first, 20, 1)
    assert [await rc.get(i) for i in range(first, first + 20)] == [v + 1 for v in before]
    await rc._change(first, 20, -1)
    assert [await rc.get(i) for i in range(first, first + 20)] == before
    assert rc.free_index <= first  # the freed run is found again
    await graph.close_all()
    errors, result = check(img)
    assert errors == 0, result


@pytest.mark.parametrize("bits", [2, 8])
async def test_overflow_in_a_run_changes_nothing(
    graph: BlockGraph, tmp_path: Path, bits: int
) -> None:
    img = create(tmp_path / "a.qcow2", "4M", refcount_bits=bits)
    node = await graph.add(_opts(img))
    rc = node.refcounts
    first = rc.high_water + 3
    full = (1 << bits) - 1
    for _ in range(full):
        await rc._change(first + 5, 1, 1)
    assert await rc.get(first + 5) == full
    with pytest.raises(RefcountError, match=f"refcount of cluster {first + 5} would become"):
        await rc._change(first, 10, 1)
    assert [await rc.get(i) for i in range(first, first + 10)] == [0] * 5 + [full] + [0] * 4
