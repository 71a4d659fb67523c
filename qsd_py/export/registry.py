"""The registry of block exports: their list, ids, deletion modes and events.

QEMU keeps exports in a list that ``query-block-exports`` reports newest first; ids are
unique across types. The registry owns that list and the QEMU error texts about it; what
every export does whatever its type is :class:`~qsd_py.export.base.BlockExport`'s, the rest
(mounting, serving, tearing down) the export types'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.export.base import BlockExport

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon

__all__ = ["BlockExport", "ExportRegistry", "export_types"]


def export_types() -> dict[str, type[BlockExport]]:
    """The export types by QAPI name, imported on first use."""
    from qsd_py.export.fuse.export import FuseExport

    return {"fuse": FuseExport}


class ExportRegistry:
    """All exports of a daemon, in creation order."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._exports: dict[str, BlockExport] = {}

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
        cls = export_types()[opts["type"]]
        node = cls.lookup_node(self.daemon, opts)
        export = cls(self.daemon, opts, node)
        self._exports[export_id] = export
        try:
            await export.start()
        except BaseException:
            del self._exports[export_id]
            raise
        return export

    async def delete(self, export_id: str, mode: str = "safe") -> None:
        """Stop an export, drop it and send ``BLOCK_EXPORT_DELETED`` (before the command's
        return, as QEMU does for FUSE)."""
        export = self.get(export_id)
        if mode == "safe" and export.in_use():
            raise QMPError(f"export '{export_id}' still in use")
        export.shutting_down = True
        try:
            await export.stop(mode)
        except BaseException:
            export.shutting_down = False
            raise
        del self._exports[export_id]
        self.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": export_id})

    async def delete_all(self) -> None:
        """Delete every export, newest first (quit, signals, failed start-up)."""
        for export in reversed(list(self._exports.values())):
            await self.delete(export.id, "hard")

    def query(self) -> list[dict[str, Any]]:
        """``query-block-exports``: newest first, like QEMU."""
        return [e.info() for e in reversed(list(self._exports.values()))]
