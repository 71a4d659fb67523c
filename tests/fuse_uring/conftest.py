"""Fixtures for FUSE-over-io_uring tests.

``userver`` hosts exports on an asyncio loop in a thread of the test process (the daemon's
side, with a real BlockGraph over image files under tmp_path); the test thread does the file
I/O through the real mount, or runs fio/dd subprocesses, so the serving loop never touches
the mount. Tests of the whole daemon use the ``qsd`` fixture instead. Every mount made here
is lazily unmounted at the end, even on failure, and the io_uring knob is restored.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import fuse_mounts_under, umount_all_under

from qsd_py.block.graph import BlockGraph
from qsd_py.export.fuse.export import FuseExport
from qsd_py.objects.registry import ObjectRegistry
from qsd_py.uring.aio import close_loop_ring


class _Daemon:
    """What an export needs from the daemon: the object registry (iothreads) and the graph."""

    def __init__(self) -> None:
        self.objects = ObjectRegistry()
        self.graph = BlockGraph()


class UringServer:
    """An asyncio loop in its own thread, hosting file-backed FUSE exports."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuse-uring-server")
        self.thread.start()
        self.daemon = _Daemon()
        self.exports: list[FuseExport] = []
        self._nodes = 0

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def image(self, size: int = 8 << 20, data: bytes = b"", name: str | None = None) -> Path:
        """A raw image file under tmp_path."""
        path = self.tmp_path / (name or f"img{self._nodes}.raw")
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(size)
        return path

    def node(self, image: Path, **opts: Any) -> Any:
        """A ``raw`` node over a ``file`` node on ``image``."""
        self._nodes += 1
        spec = {
            "driver": "raw",
            "node-name": f"n{self._nodes}",
            "file": {"driver": "file", "filename": str(image), **opts},
        }
        return self.run(self.daemon.graph.add(spec))

    def iothread(self, name: str) -> Any:
        return self.daemon.objects.add({"qom-type": "iothread", "id": name})

    def export(self, node: Any, mountpoint: Path, **opts: Any) -> FuseExport:
        mountpoint.touch()
        full = {
            "type": "fuse",
            "id": f"e{len(self.exports)}-{mountpoint.name}",
            "node-name": node.node_name,
            "mountpoint": str(mountpoint),
            **opts,
        }
        exp = FuseExport(self.daemon, full, node)  # type: ignore[arg-type]
        self.run(exp.start())
        self.exports.append(exp)
        return exp

    def delete(self, exp: FuseExport, mode: str = "safe", timeout: float = 30.0) -> None:
        self.run(exp.stop(mode), timeout)
        self.exports.remove(exp)

    def close(self) -> None:
        for exp in reversed(self.exports):
            try:
                self.run(exp.stop("hard"))
            except Exception:  # noqa: BLE001 - clean up as much as possible
                pass
        self.exports.clear()

        async def finish() -> None:
            self.daemon.graph.close_all()
            close_loop_ring()

        try:
            self.run(finish())
        finally:
            self.daemon.objects.stop_all()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def userver(tmp_path: Path, uring_knob: Path) -> Iterator[UringServer]:
    """An export host with FUSE-over-io_uring switched on (restored afterwards)."""
    srv = UringServer(tmp_path)
    try:
        yield srv
    finally:
        srv.close()
        umount_all_under(tmp_path)
        assert not fuse_mounts_under(tmp_path)
