"""Fixtures for block-layer tests: a graph on the test's loop, images under tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from qsd_py.block.graph import BlockGraph


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    """A fresh graph, closed (fds and locks released) when the test ends."""
    g = BlockGraph()
    try:
        yield g
    finally:
        await g.close_all()


@pytest.fixture
def image(tmp_path: Path) -> Callable[..., Path]:
    """``image(size, name="img", data=b"")``: a sparse file of ``size`` bytes."""

    def make(size: int = 1 << 20, name: str = "img", data: bytes = b"") -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(size)
        return path

    return make
