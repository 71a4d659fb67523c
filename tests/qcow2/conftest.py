"""Fixtures of the qcow2 tests: a block graph in the test's loop, closed afterwards (which
writes back what the qcow2 nodes cache, as blockdev-del does)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from qsd_py.block.graph import BlockGraph


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph()
    try:
        yield g
    finally:
        await g.close_all()
