"""The registry of block exports: their list, ids, deletion modes and events.

QEMU keeps exports in a list that ``query-block-exports`` reports newest first; ids are
unique across types. The registry owns that list and the QEMU error texts about it; what
every export does whatever its type is :class:`~qsd_py.export.base.BlockExport`'s, the rest
(mounting, serving, tearing down) the export types'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.export.base import BlockExport

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon

__all__ = ["BlockExport", "ExportRegistry", "export_type", "export_types"]


def export_types() -> dict[str, type[BlockExport]]:
    """The export types by QAPI name, imported on first use."""
    return {name: export_type(name) for name in ("nbd", "fuse")}


def export_type(name: str) -> type[BlockExport]:
    """One export type, imported on first use (alone: an NBD export does not wait for the
    FUSE modules, ~20 ms, while its first client may already be connecting)."""
    if name == "nbd":
        from qsd_py.export.nbd.export import NbdExport

        return NbdExport
    if name == "fuse":
        from qsd_py.export.fuse.export import FuseExport

        return FuseExport
    raise KeyError(name)


class ExportRegistry:
    """All exports of a daemon, in creation order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._exports: dict[str, BlockExport] = {}
        self._going: dict[str, asyncio.Future[None]] = {}  # exports shutting down
        self._quiet: set[str] = set()  # exports whose deletion event a caller sends later

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
        cls = export_type(opts["type"])
        node = cls.lookup_node(self.daemon, opts)
        # QEMU 11.1 attaches the export's BlockBackend in a drained section of all nodes
        # (and detaches it in another when the export fails to start)
        await self.daemon.graph.drain_all()
        export = cls(self.daemon, opts, node)
        self._exports[export_id] = export
        try:
            await export.start()
        except BaseException:
            del self._exports[export_id]
            await self.daemon.graph.drain_all()
            raise
        return export

    async def delete(self, export_id: str, mode: str = "safe") -> asyncio.Future[None] | None:
        """Stop an export, drop it and send ``BLOCK_EXPORT_DELETED``: before the command's
        return when the export is gone at once (as QEMU does for FUSE, or NBD without
        clients), else once it is, after the return (the future returned completes then;
        meanwhile the export is listed as shutting down)."""
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
            await self._release(export)
            self._gone(export)
            return None
        going = self._going[export_id] = asyncio.ensure_future(self._gone_later(export, pending))
        return going

    async def _gone_later(self, export: BlockExport, pending: Awaitable[None]) -> None:
        try:
            await pending
        finally:
            del self._going[export.id]
            await self._release(export)
            self._gone(export)

    async def _release(self, export: BlockExport) -> None:
        """What QEMU 11.1 goes through as it frees an export (measured): its node drained
        twice, then every node once (its BlockBackend detached). Running jobs pause and go
        on at each (those using the export's node or one above it at the first two); the
        export's own requests are over by now, so only the jobs take part."""
        await self.daemon.graph.drain_all(2, above=export.node)
        await self.daemon.graph.drain_all()

    def _gone(self, export: BlockExport) -> None:
        del self._exports[export.id]
        if export.id in self._quiet:  # the caller announces it later
            self._quiet.discard(export.id)
            return
        self.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": export.id})

    async def delete_all_of_type(self, kind: str) -> None:
        """Delete every export of type ``kind`` (hard) and wait until each is gone, as
        QEMU 11.1's nbd-server-stop (measured): the oldest export's release is one drained
        section of every node, inside which the others go, newest first, each with its
        event; the oldest's own event follows the section's end. Running jobs thus pause
        and go on once, whatever the number of exports."""
        exports = [e for e in self._exports.values() if e.type == kind]
        if not exports:
            return
        oldest = exports[0]
        self._quiet.add(oldest.id)
        try:
            async with self.daemon.graph.drained_all():
                for export in reversed(exports[1:]):
                    await self.finish_deleting(export)
                await self.finish_deleting(oldest)
        finally:
            self._quiet.discard(oldest.id)
        if oldest.id not in self._exports:
            self.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": oldest.id})

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
