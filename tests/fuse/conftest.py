"""Fixtures for FUSE tests that serve an export from a thread of the test process.

The export runs on its own asyncio loop in a separate thread (the "daemon" side); the test
thread does the file I/O through the real mount, so the serving loop never touches the file.
Every mount made here is lazily unmounted at the end, even on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from export_host import ExportHost
from memnode import MemNode
from support import fuse_mounts_under, umount_all_under

from qsd_py.export.fuse.export import FuseExport


class Server(ExportHost):
    """The export host of these tests (see :mod:`export_host`)."""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server()
    try:
        yield srv
    finally:
        srv.close()
        umount_all_under(tmp_path)
        assert not fuse_mounts_under(tmp_path)


@pytest.fixture(params=["dev-fuse", "io_uring"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every test using ``mounted`` runs over both transports; io_uring switches the kernel
    knob on for the test (restored afterwards, see tests/conftest.py's ``uring_knob``)."""
    if request.param == "io_uring":
        request.getfixturevalue("uring_knob")
    return request.param


@pytest.fixture
def mounted(
    server: Server, tmp_path: Path, transport: str
) -> Callable[..., tuple[MemNode, Path, FuseExport]]:
    """``mounted(size, **export_opts)``: a MemNode exported at tmp_path/mnt, over
    ``transport``."""

    def make(
        size: int = 1 << 20, *, node: MemNode | None = None, name: str = "mnt", **opts: Any
    ) -> tuple[MemNode, Path, FuseExport]:
        node = node or MemNode(size)
        mnt = tmp_path / name
        mnt.touch()
        if transport == "io_uring":
            opts.setdefault("io_uring", True)
        exp = server.export(node, mnt, **opts)
        return node, mnt, exp

    return make
