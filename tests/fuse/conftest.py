"""Fixtures for FUSE tests that serve an export from a thread of the test process.

The export runs on its own asyncio loop in a separate thread (the "daemon" side); the test
thread does the file I/O through the real mount, so the serving loop never touches the file.
Every mount made here is lazily unmounted at the end, even on failure.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from memnode import MemNode
from support import fuse_mounts_under, umount_all_under

from qsd_py.export.fuse.export import FuseExport
from qsd_py.objects.registry import ObjectRegistry


class StubDaemon:
    """What an export needs from the daemon: the object registry (iothreads)."""

    def __init__(self) -> None:
        self.objects = ObjectRegistry()


class Server:
    """An asyncio loop in its own thread, hosting exports like the daemon's main loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuse-server")
        self.thread.start()
        self.daemon = StubDaemon()
        self.exports: list[FuseExport] = []

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def export(self, node: MemNode, mountpoint: Path, **opts: Any) -> FuseExport:
        full = {
            "type": "fuse",
            "id": f"e{len(self.exports)}",
            "node-name": node.node_name,
            "mountpoint": str(mountpoint),
            **opts,
        }
        exp = FuseExport(self.daemon, full, node)  # type: ignore[arg-type]
        self.run(exp.start())
        self.exports.append(exp)
        return exp

    def delete(self, exp: FuseExport, mode: str = "safe") -> None:
        self.run(exp.stop(mode))
        self.exports.remove(exp)

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        for exp in reversed(self.exports):
            try:
                self.run(exp.stop("hard"))
            except Exception:  # noqa: BLE001
                pass
        self.daemon.objects.stop_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


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
