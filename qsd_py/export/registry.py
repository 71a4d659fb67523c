"""The registry of block exports and the base class every export type derives from.

QEMU keeps exports in a list that ``query-block-exports`` reports newest first; ids are
unique across types. The registry owns that list and the QEMU error texts about it; the
export types own mounting, serving and tearing down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon


class BlockExport:
    """One export of a block node. Subclasses implement :meth:`start` and :meth:`stop`."""

    type: ClassVar[str]

    def __init__(self, daemon: Daemon, opts: dict[str, Any], node: BlockNode) -> None:
        self.daemon = daemon
        self.opts = opts
        self.id: str = opts["id"]
        self.node = node
        self.shutting_down = False

    async def start(self) -> None:
        """Make the export reachable (mount, listen...). Raise QMPError on failure,
        leaving nothing behind."""
        raise NotImplementedError

    async def stop(self, mode: str) -> Awaitable[None] | None:
        """Tear the export down. ``mode`` is ``safe`` or ``hard`` (block-export-del).

        ``safe`` raises QMPError (``export 'ID' still in use``) if requests are in flight;
        ``hard`` aborts them. Returns None when nothing of the export remains, or an
        awaitable that completes once the last of it is gone (an NBD export whose clients
        still finish requests): the export then stays listed, shutting down, until then.
        """
        raise NotImplementedError

    def in_use(self) -> bool:
        """True while requests are in flight (``safe`` deletion refuses then)."""
        return False

    def after_command(self) -> None:
        """Called after every QMP command (one may have changed the node)."""

    def info(self) -> dict[str, Any]:
        """The ``BlockExportInfo`` answer of ``query-block-exports``."""
        return {
            "type": self.type,
            "id": self.id,
            "node-name": self.node.node_name,
            "shutting-down": self.shutting_down,
        }


def export_types() -> dict[str, type[BlockExport]]:
    """The export types by QAPI name, imported on first use."""
    from qsd_py.export.fuse.export import FuseExport
    from qsd_py.export.nbd.export import NbdExport

    return {"nbd": NbdExport, "fuse": FuseExport}


class ExportRegistry:
    """All exports of a daemon, in creation order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._exports: dict[str, BlockExport] = {}
        self._going: dict[str, asyncio.Future[None]] = {}  # exports shutting down

    def __iter__(self):
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    def get(self, export_id: str) -> BlockExport:
        try:
            return self._exports[export_id]
        except KeyError as err:
            raise QMPError(f"Export '{export_id}' is not found") from err

    async def add(self, opts: dict[str, Any]) -> BlockExport:
        """Create and start an export from validated ``BlockExportOptions``."""
        export_id = opts["id"]
        if export_id in self._exports:
            raise QMPError(f"Block export id '{export_id}' is already in use")
        node = self.daemon.graph.lookup(opts["node-name"])
        if opts.get("writable", False) and node.read_only:
            # QEMU checks the exported node itself first, before iothreads and mountpoints;
            # a writable export of a read-write node over a read-only child fails later, on
            # the child's permissions ("Block node is read-only").
            raise QMPError("Cannot export read-only node as writable")
        cls = export_types()[opts["type"]]
        export = cls(self.daemon, opts, node)
        self._exports[export_id] = export
        try:
            await export.start()
        except BaseException:
            del self._exports[export_id]
            raise
        return export

    async def delete(self, export_id: str, mode: str = "safe") -> asyncio.Future[None] | None:
        """Stop an export, drop it and send ``BLOCK_EXPORT_DELETED``: before the command's
        return when the export is gone at once (as QEMU does for FUSE, or NBD without
        clients), else once it is, after the return (the future returned completes then)."""
        export = self.get(export_id)
        if export.shutting_down:
            raise QMPError(f"Export '{export_id}' is already shutting down")
        if mode == "safe" and export.in_use():
            raise QMPError(f"export '{export_id}' still in use")
        export.shutting_down = True
        try:
            pending = await export.stop(mode)
        except BaseException:
            export.shutting_down = False
            raise
        if pending is None:
            self._gone(export)
            return None
        going = self._going[export_id] = asyncio.ensure_future(self._gone_later(export, pending))
        return going

    async def _gone_later(self, export: BlockExport, pending: Awaitable[None]) -> None:
        try:
            await pending
        finally:
            del self._going[export.id]
            self._gone(export)

    def _gone(self, export: BlockExport) -> None:
        del self._exports[export.id]
        self.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": export.id})

    async def delete_all(self) -> None:
        """Delete every export, newest first, and wait until each is gone (quit, signals,
        failed start-up)."""
        for export in reversed(list(self._exports.values())):
            await self.finish_deleting(export)

    async def finish_deleting(self, export: BlockExport) -> None:
        """Delete ``export`` (hard) and wait until it is gone, even if it was already
        shutting down (nbd-server-stop waits as QEMU's does)."""
        going = self._going.get(export.id)
        if going is not None:
            await asyncio.shield(going)
            return
        pending = await self.delete(export.id, "hard")
        if pending is not None:
            await pending

    def query(self) -> list[dict[str, Any]]:
        """``query-block-exports``: newest first, like QEMU."""
        return [e.info() for e in reversed(list(self._exports.values()))]
