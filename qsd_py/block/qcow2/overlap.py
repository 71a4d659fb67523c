"""QEMU's metadata overlap checks: no write may land on the image's own metadata unless it is
the very structure being updated.

A damaged table can point a guest cluster at the L1 table, an L2 table at the refcount table,
a refcount block at the header; a free-looking cluster can be handed out while it still holds
metadata. Before a write, the range (widened to whole clusters) is compared with each kind of
metadata the ``overlap-check`` option enables; a hit marks the image corrupt ("Preventing
invalid write on metadata (overlaps with <what>)") and the write fails with EIO.

The kinds, their names and the templates are QEMU's: ``constant`` checks what lies at fixed
places (header, active L1 table, refcount table, snapshot table, bitmap directory),
``cached`` (the default) adds what is in memory anyway (active L2 tables, refcount blocks,
snapshots' L1 tables), ``all`` adds the snapshots' L2 tables (read once, at open).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from qsd_py.block.qcow2 import entries
from qsd_py.block.qcow2.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from qsd_py.block.qcow2.header import Qcow2Error
from qsd_py.block.qcow2.snapshots import validate_snapshot_l1
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.block.qcow2.metadata import Metadata

MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8

NAMES = {1 << bit: name for bit, name in enumerate(entries.OVERLAP_NAMES)}
# The boolean options of Qcow2OverlapCheckFlags, each overriding its bit of the template.
OPTION_BITS = {
    "main-header": MAIN_HEADER,
    "active-l1": ACTIVE_L1,
    "active-l2": ACTIVE_L2,
    "refcount-table": REFCOUNT_TABLE,
    "refcount-block": REFCOUNT_BLOCK,
    "snapshot-table": SNAPSHOT_TABLE,
    "inactive-l1": INACTIVE_L1,
    "inactive-l2": INACTIVE_L2,
    "bitmap-directory": BITMAP_DIRECTORY,
}
CONSTANT = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY
CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1
ALL = CACHED | INACTIVE_L2
TEMPLATES = {"none": 0, "constant": CONSTANT, "cached": CACHED, "all": ALL}

# The header fields the refcount code rewrites in place (refcount table offset and size).
_REFTABLE_FIELDS = (48, 60)


def parse_overlap_check(opts: dict[str, Any]) -> int:
    """The checks the ``overlap-check`` option asks for: a template name, or an object with
    an optional ``template`` (default ``cached``) and booleans overriding single kinds."""
    value = opts.get("overlap-check", "cached")
    flags: dict[str, Any] = {}
    name = "overlap-check"
    if isinstance(value, dict):
        flags = value
        value = value.get("template", "cached")
        name = "template"
    if value not in TEMPLATES:  # the QAPI schema's refusal
        raise QMPError(f"Parameter '{name}' does not accept value '{value}'")
    checks = TEMPLATES[value]
    for key, bit in OPTION_BITS.items():
        if key in flags:
            checks = (checks | bit) if flags[key] else (checks & ~bit)
    return checks


class TableState(NamedTuple):
    """The active tables as they are now; ``*_key`` changes whenever the table does."""

    l1_offset: int
    l1: list[int]
    l1_key: tuple[int, int]
    reftable_offset: int
    reftable: list[int]
    reftable_key: tuple[int, int]


class OverlapCheck:
    """Which metadata a range of the image file overlaps, as QEMU's
    qcow2_check_metadata_overlap answers: the first kind found, in QEMU's order.

    The active tables are read live from the driver's objects (``state`` returns the L1
    offset and entries, the refcount table offset and entries); the cluster sets built from
    their entries are rebuilt only when the tables changed (their owners' version numbers:
    comparing the tables themselves cost a data write tens of microseconds)."""

    def __init__(
        self,
        checks: int,
        cluster_bits: int,
        state: Callable[[], TableState],
        meta: Metadata,
        bitmaps_in_use: bool,
    ) -> None:
        self.checks = checks
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.state = state
        self.meta = meta
        self.bitmaps_in_use = bitmaps_in_use
        self.inactive_l2: set[int] = set()  # clusters of the snapshots' L2 tables
        self._l1_seen: tuple[int, int] | None = None  # (whose, version) the set is of
        self._l2_clusters: set[int] = set()
        self._reftable_seen: tuple[int, int] | None = None
        self._refblock_clusters: set[int] = set()

    async def load_inactive_l2(self, file: BlockNode) -> None:
        """Read the snapshots' L1 tables once (only ``inactive-l2`` needs them)."""
        if not self.checks & INACTIVE_L2:
            return
        for sn in self.meta.snapshots:
            try:
                validate_snapshot_l1(sn, self.cluster_size)
            except Qcow2Error:
                continue  # QEMU would fail every checked write; such a table is not read
            if not sn.l1_size:
                continue
            raw = bytearray(8 * sn.l1_size)
            await file.read(sn.l1_table_offset, memoryview(raw))
            for i in range(0, len(raw), 8):
                l2 = int.from_bytes(raw[i : i + 8], "big") & L1E_OFFSET_MASK
                if l2:
                    self.inactive_l2.update(self._clusters(l2, self.cluster_size))

    def find(self, offset: int, size: int, ignore: int = 0) -> int:
        """The kind of metadata ``[offset, offset + size)`` overlaps (0: none). Every
        allocating write asks (for its new cluster), so the ranges are compared one by one
        without building a list first."""
        chk = self.checks & ~ignore
        if not size or not chk:
            return 0
        if chk & MAIN_HEADER and offset < self.cluster_size:
            return MAIN_HEADER
        mask = self.cluster_size - 1
        start = offset & ~mask
        end = (offset + size + mask) & ~mask
        state = self.state()
        meta = self.meta
        if chk & ACTIVE_L1 and _meets(start, end, state.l1_offset, 8 * len(state.l1)):
            return ACTIVE_L1
        reftable = state.reftable
        if chk & REFCOUNT_TABLE and _meets(start, end, state.reftable_offset, 8 * len(reftable)):
            return REFCOUNT_TABLE
        if chk & SNAPSHOT_TABLE and _meets(start, end, meta.snapshots_offset, meta.snapshots_size):
            return SNAPSHOT_TABLE
        if chk & INACTIVE_L1:
            for sn in meta.snapshots:
                if _meets(start, end, sn.l1_table_offset, 8 * sn.l1_size):
                    return INACTIVE_L1
        if chk & ACTIVE_L2 and self._hits(start, end, self._active_l2(state.l1, state.l1_key)):
            return ACTIVE_L2
        if chk & REFCOUNT_BLOCK and self._hits(
            start, end, self._refblocks(reftable, state.reftable_key)
        ):
            return REFCOUNT_BLOCK
        if chk & INACTIVE_L2 and self._hits(start, end, self.inactive_l2):
            return INACTIVE_L2
        if chk & BITMAP_DIRECTORY and self.bitmaps_in_use and meta.bitmap_directory:
            first, length = meta.bitmap_directory
            if _meets(start, end, first, length):
                return BITMAP_DIRECTORY
        return 0

    def _hits(self, start: int, end: int, clusters: set[int]) -> bool:
        first, last = start >> self.cluster_bits, end >> self.cluster_bits
        if last - first == 1:
            return first in clusters  # one cluster: most writes' new one
        if last - first <= len(clusters):
            return any(c in clusters for c in range(first, last))
        return any(first <= c < last for c in clusters)

    def _clusters(self, offset: int, length: int) -> range:
        """The clusters a (possibly unaligned) table of ``length`` bytes touches."""
        return range(offset >> self.cluster_bits, (offset + length - 1 >> self.cluster_bits) + 1)

    def _active_l2(self, l1: list[int], key: tuple[int, int]) -> set[int]:
        if key != self._l1_seen:
            self._l1_seen = key
            self._l2_clusters = set()
            for entry in l1:
                if entry & L1E_OFFSET_MASK:
                    self._l2_clusters.update(
                        self._clusters(entry & L1E_OFFSET_MASK, self.cluster_size)
                    )
        return self._l2_clusters

    def _refblocks(self, reftable: list[int], key: tuple[int, int]) -> set[int]:
        if key != self._reftable_seen:
            self._reftable_seen = key
            self._refblock_clusters = set()
            for entry in reftable:
                if entry & REFT_OFFSET_MASK:
                    self._refblock_clusters.update(
                        self._clusters(entry & REFT_OFFSET_MASK, self.cluster_size)
                    )
        return self._refblock_clusters


def _meets(start: int, end: int, first: int, length: int) -> bool:
    """Whether ``[start, end)`` meets the table of ``length`` bytes at ``first``."""
    return bool(length) and first < end and start < first + length


def overlap_text(kind: int) -> str:
    return entries.overlap_text(NAMES[kind])


# Who writes through a guarded file, and what it may legitimately overwrite.
ROLE_L2_CACHE = "l2-cache"  # L2 table slices: the active L2 tables
ROLE_REFCOUNT_CACHE = "refcount-cache"  # refcount blocks
ROLE_MAP = "map"  # new L2 tables, and L1 entries inside the active L1 table
ROLE_REFCOUNTS = "refcounts"  # new refcount blocks/tables, reftable entries, header fields


class GuardedFile:
    """The ``file`` child as the metadata code sees it: writes are checked against the
    metadata first, ignoring what the writer (``role``) is there to update; everything else
    passes through. ``on_overlap(message, offset, size)`` marks the image corrupt and returns
    the error to raise."""

    def __init__(
        self,
        file: Callable[[], BlockNode],
        check: Callable[[], OverlapCheck | None],
        role: str,
        on_overlap: Callable[[str, int, int], Awaitable[OSError]],
    ) -> None:
        self._file = file
        self._check = check
        self.role = role
        self._on_overlap = on_overlap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file(), name)

    async def write(self, offset: int, data: Any) -> None:
        check = self._check()
        if check is not None:
            kind = check.find(offset, len(data), self._ignore(check, offset, len(data)))
            if kind:
                raise await self._on_overlap(overlap_text(kind), offset, len(data))
        await self._file().write(offset, data)

    def _ignore(self, check: OverlapCheck, offset: int, size: int) -> int:
        if self.role == ROLE_L2_CACHE:
            return ACTIVE_L2
        if self.role == ROLE_REFCOUNT_CACHE:
            return REFCOUNT_BLOCK
        state = check.state()
        l1_offset, l1 = state.l1_offset, state.l1
        reftable_offset, reftable = state.reftable_offset, state.reftable
        end = offset + size
        if self.role == ROLE_MAP:
            inside_l1 = l1_offset <= offset and end <= l1_offset + 8 * len(l1)
            return ACTIVE_L2 | (ACTIVE_L1 if inside_l1 else 0)
        ignore = REFCOUNT_BLOCK
        if reftable_offset <= offset and end <= reftable_offset + 8 * len(reftable):
            ignore |= REFCOUNT_TABLE
        if _REFTABLE_FIELDS[0] <= offset and end <= _REFTABLE_FIELDS[1]:
            ignore |= MAIN_HEADER
        return ignore
