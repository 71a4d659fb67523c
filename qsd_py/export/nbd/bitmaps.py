"""Dirty bitmaps an NBD export offers as ``qemu:dirty-bitmap:NAME`` meta contexts.

The export and the connection speak to a bitmap only through :class:`DirtyBitmapSource`
(the block layer's :class:`~qsd_py.block.dirty.DirtyBitmap` is one). As in QEMU, an exported
bitmap is busy until the export is gone: no command may change it meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.nbd.server import Extents


class DirtyBitmapSource(Protocol):
    """A dirty bitmap seen from an export."""

    name: str
    busy: bool
    enabled: bool

    def check(self, allow_readonly: bool = False, allow_busy: bool = False) -> None:
        """Refuse a busy or inconsistent bitmap with QEMU's text."""
        ...

    def extents(self, extents: Extents, offset: int, length: int) -> None:
        """Add ``(length, STATE_DIRTY or 0)`` extents for ``[offset, +length)`` until the
        range is covered or ``extents`` is full."""
        ...


def find_bitmaps(
    graph: BlockGraph, node: BlockNode, specs: list[Any], writable: bool
) -> list[tuple[str, DirtyBitmapSource]]:
    """The bitmaps an export's ``bitmaps`` member names (a bitmap name, looked up on the
    node and down its backing chain, or ``{"node": ..., "name": ...}``), with QEMU's errors
    in QEMU's order. A read-only export of a writable node may not offer a bitmap that
    still records (its answer would change under the client)."""
    found = []
    for spec in specs:
        owner: BlockNode | None = node
        if isinstance(spec, str):
            owner, source = _search_chain(node, spec)
            if source is None:
                raise QMPError(f"Bitmap '{spec}' is not found")
            name = spec
        else:
            name = spec["name"]
            if graph.find(spec["node"]) is None:
                raise QMPError(f"Node '{spec['node']}' not found")
            source = graph.find(spec["node"]).dirty_bitmap(name)  # type: ignore[union-attr]
            if source is None:
                raise QMPError(f"Dirty bitmap '{name}' not found")
        if not writable and owner is not None and not owner.read_only and source.enabled:
            raise QMPError(f"Enabled bitmap '{name}' incompatible with readonly export")
        source.check(allow_readonly=True)
        found.append((name, source))
    return found


def _search_chain(node: BlockNode, name: str) -> tuple[BlockNode | None, DirtyBitmapSource | None]:
    current: BlockNode | None = node
    while current is not None:
        source = current.dirty_bitmap(name)
        if source is not None:
            return current, source
        current = current.child_node("backing") if current.supports_backing else None
    return None, None
