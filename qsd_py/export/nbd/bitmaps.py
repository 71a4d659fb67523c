"""Dirty bitmaps an NBD export offers as ``qemu:dirty-bitmap:NAME`` meta contexts.

qsd-py's nodes keep no dirty bitmaps yet (:meth:`BlockNode.dirty_bitmap` finds none), so
an export that names one fails as QEMU's does for a missing bitmap. The export and the
connection already speak to a bitmap only through :class:`DirtyBitmapSource`: when the
block layer grows bitmaps, nodes return them from ``dirty_bitmap`` and nothing here changes.
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

    def extents(self, extents: Extents, offset: int, length: int) -> None:
        """Add ``(length, STATE_DIRTY or 0)`` extents for ``[offset, +length)`` until the
        range is covered or ``extents`` is full."""
        ...


def find_bitmaps(
    graph: BlockGraph, node: BlockNode, specs: list[Any]
) -> list[tuple[str, DirtyBitmapSource]]:
    """The bitmaps an export's ``bitmaps`` member names (a bitmap name, looked up on the
    node and down its backing chain, or ``{"node": ..., "name": ...}``), with QEMU's errors."""
    found = []
    for spec in specs:
        if isinstance(spec, str):
            source = _search_chain(node, spec)
            if source is None:
                raise QMPError(f"Bitmap '{spec}' is not found")
            found.append((spec, source))
        else:
            owner = graph.find(spec["node"])
            if owner is None:
                raise QMPError(f"Node '{spec['node']}' not found")
            source = owner.dirty_bitmap(spec["name"])
            if source is None:
                raise QMPError(f"Dirty bitmap '{spec['name']}' not found")
            found.append((spec["name"], source))
    return found


def _search_chain(node: BlockNode, name: str) -> DirtyBitmapSource | None:
    current: BlockNode | None = node
    while current is not None:
        source = current.dirty_bitmap(name)
        if source is not None:
            return source
        current = current.child_node("backing") if current.supports_backing else None
    return None
