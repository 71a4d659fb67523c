"""What a qcow2 node puts into the exports' cluster table (qsd_py/block/fast_map.py): for each
guest cluster, a host cluster the fast path may read (and write, where it is this image's
alone), zeroes, or 0 for anything only the node can serve. The node publishes an entry as it
learns or changes it; the fast path never asks the node for the mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd_py.block import fast_map
from qsd_py.block.fast_map import FastTarget
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZEROES,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

_FAST_ZEROES = fast_map.ZERO | fast_map.VALID


def fast_target(node: Qcow2Node) -> FastTarget | None:
    """The data file's target, mapped through the cluster table."""
    if node.table is None or node.corrupt:
        return None
    target = node.data_node.fast_target()
    if target is None or target.file is None or target.table is not None or target.null:
        return None
    writable = target.writable and not node.read_only
    return FastTarget(file=target.file, base=target.base, table=node.table, writable=writable)


def publish_missing_tables(node: Qcow2Node) -> None:
    """Ranges without an L2 table are unallocated: without a backing node they read as
    zeroes, which the fast path can answer without asking (a fresh image's reads)."""
    assert node.map is not None and node.table is not None
    if node.backing is not None:
        return
    span = node.map.l2_entries
    for l1_index, l1e in enumerate(node.map.l1):
        if not l1e & L1E_OFFSET_MASK:
            node.table.publish_range(l1_index * span, span, _FAST_ZEROES)


def publish(node: Qcow2Node, guest_cluster: int, l2e: int, bitmap: int) -> None:
    """Put what an L2 entry says into the cluster table: a host cluster (written in place
    only when it is this image's alone), zeroes, or 0 for anything only the node can serve
    (backing data, compression, partial subclusters)."""
    assert node.table is not None and node.map is not None
    value = _fast_value(node, l2e, bitmap)
    checks = node.checks
    if value and checks is not None and checks.on_read(guest_cluster, l2e, bitmap, 0):
        value = 0  # an entry a lookup refuses: the node reports it, never the fast path
    if value & fast_map.WRITABLE and node.overlap is not None:
        if node.overlap.find(value & fast_map.OFFSET_MASK, node.cluster_size):
            value &= ~fast_map.WRITABLE  # writes there are the overlap check's to refuse
    node.table.publish(guest_cluster, value)


def publish_many(node: Qcow2Node, first: int, values: list[tuple[int, int]]) -> None:
    """:func:`publish` of consecutive entries (a batched allocation): where they map to
    consecutive writable host clusters, the overlap check is asked once for the whole run
    (one pass, no per-entry generators: this runs once per allocating write)."""
    table = node.table
    assert table is not None
    cs = node.cluster_size
    fast = [_fast_value(node, l2e, bitmap) for l2e, bitmap in values]
    host = fast[0] & fast_map.OFFSET_MASK
    rights = fast_map.VALID | fast_map.WRITABLE
    if fast == [(host + i * cs) | rights for i in range(len(fast))]:  # writable, in a row
        checks = node.checks
        clean = node.overlap is None or not node.overlap.find(host, len(fast) * cs)
        if clean and (checks is None or not checks.read_refuses_any(first, values)):
            table.publish_run(first, fast)
            return
    for i, (l2e, bitmap) in enumerate(values):
        publish(node, first + i, l2e, bitmap)


def _fast_value(node: Qcow2Node, l2e: int, bitmap: int) -> int:
    if l2e & OFLAG_COMPRESSED:
        return 0
    offset = l2e & L2E_OFFSET_MASK
    if offset & (node.cluster_size - 1):
        return 0  # corrupt: the slow road finds and reports it
    assert node.map is not None
    if node.map.extended:
        if bitmap == BITMAP_ALL_ZEROES:
            return _FAST_ZEROES
        if bitmap != BITMAP_ALL_ALLOC:
            return _FAST_ZEROES if bitmap == 0 and node.backing is None else 0
    elif l2e & OFLAG_ZERO:
        return _FAST_ZEROES
    if not node.allocated(l2e):
        return _FAST_ZEROES if node.backing is None else 0
    if l2e & OFLAG_COPIED and not node.read_only:
        return offset | fast_map.VALID | fast_map.WRITABLE
    return offset | fast_map.VALID
