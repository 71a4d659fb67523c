"""Fixtures for block-layer tests: a graph on the test's loop, images under tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


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
