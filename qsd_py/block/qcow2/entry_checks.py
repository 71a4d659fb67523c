"""What QEMU refuses in an L2 entry while serving a request, and its words for it.

A lookup for a read (or block status, or the read half of a copy-on-write) refuses, in this
order: a zero cluster in a v2 image, an extended L2 bitmap that contradicts itself, a
compressed cluster in an image with an external data file, a data cluster (or preallocated
zero cluster) at an unaligned host offset, and with a data file a host offset other than the
guest offset. A write that would go in place (the entry has the COPIED flag) refuses an
unaligned cluster in its own words, and one touching a contradictory bitmap says so with one
space less than the read path does. Each answer is the message of QEMU's corruption event;
the driver marks the image corrupt with it.

Reserved bits are not looked at here: QEMU only reports them in ``qemu-img check``.
"""

from __future__ import annotations

from collections.abc import Callable

from qsd_py.block.qcow2 import entries as e

_ALLOCATED = (e.SUBCLUSTER_ZERO_ALLOC, e.SUBCLUSTER_NORMAL, e.SUBCLUSTER_UNALLOCATED_ALLOC)
_ZEROES = (e.SUBCLUSTER_ZERO_PLAIN, e.SUBCLUSTER_ZERO_ALLOC)


class EntryChecks:
    """The checks for one image; ``l2_offset_of(guest_cluster)`` says where the L2 table of
    a guest cluster lies (only asked when there is something to report)."""

    def __init__(
        self,
        cluster_bits: int,
        extended: bool,
        version: int,
        has_data_file: bool,
        l2_offset_of: Callable[[int], int],
    ) -> None:
        self.cluster_bits = cluster_bits
        self.mask = (1 << cluster_bits) - 1
        self.extended = extended
        self.v2 = version < 3
        self.data_file = has_data_file
        self.l2_bits = e.l2_bits(cluster_bits, extended)
        self.l2_offset_of = l2_offset_of
        self.any_entry_may_fail = self.v2 or extended or has_data_file

    def _where(self, guest_cluster: int) -> tuple[int, int]:
        return self.l2_offset_of(guest_cluster), guest_cluster & ((1 << self.l2_bits) - 1)

    def on_read(self, guest_cluster: int, l2e: int, bitmap: int, in_cluster: int) -> str | None:
        """The problem a lookup of ``guest_cluster`` (from byte ``in_cluster``) meets."""
        if not (l2e & (self.mask | e.OFLAG_COMPRESSED) or self.any_entry_may_fail):
            return None  # the common case: an aligned standard entry (or unallocated)
        sc = in_cluster >> (self.cluster_bits - 5) if self.extended else 0
        stype = e.subcluster_type(l2e, bitmap, sc, self.extended, self.data_file)
        if self.v2 and stype in _ZEROES:
            return e.zero_in_v2_text(*self._where(guest_cluster))
        if stype == e.SUBCLUSTER_INVALID:
            return e.invalid_entry_text(*self._where(guest_cluster))
        if stype == e.SUBCLUSTER_COMPRESSED and self.data_file:
            return e.compressed_with_data_file_text(*self._where(guest_cluster))
        if stype in _ALLOCATED:
            host = l2e & e.L2E_OFFSET_MASK
            if host & self.mask:
                l2_offset, l2_index = self._where(guest_cluster)
                return e.cluster_unaligned_text(host, l2_offset, l2_index)
            guest = guest_cluster << self.cluster_bits
            if self.data_file and host != guest:
                return e.data_file_offset_mismatch_text(host, guest, self._where(guest_cluster)[1])
        return None

    def read_refuses_any(self, first: int, entries: list[tuple[int, int]]) -> bool:
        """Whether :meth:`on_read` finds a problem in any of the entries of consecutive
        guest clusters from ``first`` (the common case, aligned standard entries, told in
        one pass)."""
        quick = self.mask | e.OFLAG_COMPRESSED
        if not self.any_entry_may_fail and not any(l2e & quick for l2e, _ in entries):
            return False
        return any(self.on_read(first + i, l2e, bm, 0) for i, (l2e, bm) in enumerate(entries))

    def on_write(self, guest_offset: int, l2e: int, bitmap: int, partial: bool) -> str | None:
        """The problem a write at ``guest_offset`` meets in its cluster's entry; ``partial``:
        the write leaves part of the cluster to be read (copy-on-write)."""
        ctype = e.cluster_type(l2e, self.extended, self.data_file)
        host = l2e & e.L2E_OFFSET_MASK
        in_place = ctype in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC) and l2e & e.OFLAG_COPIED
        if in_place and host & self.mask:
            if l2e & e.OFLAG_ZERO:
                return e.zero_cluster_unaligned_text(host, guest_offset)
            return e.data_cluster_unaligned_text(host, guest_offset)
        guest_cluster = guest_offset >> self.cluster_bits
        if self.extended and e.subcluster_type(l2e, bitmap, 0, True, self.data_file) == (
            e.SUBCLUSTER_INVALID
        ):
            return e.invalid_entry_on_write_text(*self._where(guest_cluster))
        if partial and self.v2 and not self.extended and l2e & e.OFLAG_ZERO:
            return e.zero_in_v2_text(*self._where(guest_cluster))  # from the read of the rest
        return None
