"""Host FUSE exports on an asyncio loop in a thread of the test process.

The thread plays the daemon's main loop; the test thread does the file I/O through the real
mount (or runs fio/dd subprocesses), so the serving loop never touches the mount. Every
export is torn down in :meth:`ExportHost.close`, even after a failed test.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from qsd_py.block.graph import BlockGraph
from qsd_py.export.fuse.export import FuseExport
from qsd_py.export.registry import ExportRegistry
from qsd_py.objects.registry import ObjectRegistry
from qsd_py.uring import close_loop_ring


class HostDaemon:
    """What an export needs from the daemon: iothreads, the graph, the export registry, and
    somewhere for events to go."""

    def __init__(self) -> None:
        self.objects = ObjectRegistry()
        self.graph = BlockGraph()
        self.exports = ExportRegistry(self)  # type: ignore[arg-type]
        self.events: list[tuple[str, Any]] = []

    def emit_event(self, name: str, data: Any) -> None:
        self.events.append((name, data))


class ExportHost:
    """An asyncio loop in its own thread, hosting exports like the daemon's main loop."""

    def __init__(self, name: str = "fuse-server") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name)
        self.thread.start()
        self.daemon = HostDaemon()
        self.exports: list[FuseExport] = []
        self._made = 0

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def iothread(self, name: str) -> Any:
        return self.daemon.objects.add({"qom-type": "iothread", "id": name})

    def export(self, node: Any, mountpoint: Path, **opts: Any) -> FuseExport:
        """Start a FUSE export of ``node`` over ``mountpoint`` (created if missing)."""
        try:
            os.lstat(mountpoint)
        except FileNotFoundError:
            mountpoint.touch()
        except OSError:
            pass  # e.g. a dead mount (ENOTCONN), which the export itself must clean up
        full = {
            "type": "fuse",
            "id": f"e{self._made}",
            "node-name": node.node_name,
            "mountpoint": str(mountpoint),
            **opts,
        }
        self._made += 1
        exp = FuseExport(self.daemon, full, node)  # type: ignore[arg-type]
        self.run(exp.start())
        self.exports.append(exp)
        return exp

    def delete(self, exp: FuseExport, mode: str = "safe", timeout: float = 30.0) -> None:
        self.run(exp.stop(mode), timeout)
        self.exports.remove(exp)

    def close(self) -> None:
        """Hard-delete every export, close the nodes and the loop's ring, stop the thread."""
        if not self.thread.is_alive():
            return
        for exp in reversed(self.exports):
            try:
                self.run(exp.stop("hard"))
            except Exception:  # noqa: BLE001 - clean up as much as possible
                pass
        self.exports.clear()

        async def finish() -> None:
            await self.daemon.graph.close_all()
            close_loop_ring()

        try:
            self.run(finish())
        finally:
            self.daemon.objects.stop_all()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
