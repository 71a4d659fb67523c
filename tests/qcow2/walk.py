"""A minimal qcow2 reader built only from the format functions, to test them on real images.

``Image`` reads a whole image file into memory and answers, through header.py, entries.py,
compress.py and snapshots.py alone: the guest's bytes, the refcount of every host cluster as
stored, and the refcounts the metadata implies (what ``qemu-img check`` counts). A test compares
these with what qemu-img says of the same file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.compress import decompress_cluster
from qsd_py.block.qcow2.header import Qcow2Header, parse_header
from qsd_py.block.qcow2.snapshots import (
    Qcow2Snapshot,
    SnapshotTableShort,
    parse_snapshot_table,
    snapshot_table_size,
)


class Image:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.h: Qcow2Header = parse_header(self.data[: 2 << 20], read_only=True)
        self.cs = self.h.cluster_size
        self.ext = self.h.extended_l2
        self.data_file = b""
        if self.h.has_data_file and self.h.data_file:
            self.data_file = (path.parent / self.h.data_file).read_bytes()

    def read(self, offset: int, length: int, data: bytes | None = None) -> bytes:
        """Bytes of the file (or ``data``), zeroes past its end, as QEMU reads them."""
        src = self.data if data is None else data
        chunk = src[offset : offset + length]
        return chunk + bytes(length - len(chunk))

    def l1_table(self, offset: int | None = None, size: int | None = None) -> list[int]:
        offset = self.h.l1_table_offset if offset is None else offset
        size = self.h.l1_size if size is None else size
        raw = self.read(offset, 8 * size)
        return [int.from_bytes(raw[i : i + 8], "big") for i in range(0, len(raw), 8)]

    def l2_table(self, l2_offset: int) -> bytes:
        return self.read(l2_offset, self.cs)

    def snapshots(self) -> list[Qcow2Snapshot]:
        needed = 4096
        while True:
            table = self.read(self.h.snapshots_offset, needed)
            try:
                return parse_snapshot_table(table, self.h.nb_snapshots, self.h.size & ~511)
            except SnapshotTableShort as short:
                needed = short.needed

    # --- guest view ---------------------------------------------------------------------------

    def guest_bytes(self, backing: bytes = b"") -> bytes:
        """The whole guest disk; unallocated parts come from ``backing`` (zeroes past it)."""
        out = bytearray()
        l1 = self.l1_table()
        for guest in range(0, self.h.size, self.cs):
            out += self._guest_cluster(guest, l1, backing)
        return bytes(out[: self.h.size])

    def _guest_cluster(self, guest: int, l1: list[int], backing: bytes) -> bytes:
        cb = self.h.cluster_bits
        index = e.l1_index(guest, cb, self.ext)
        l2_offset = e.l1_l2_offset(l1[index]) if index < len(l1) else 0
        if not l2_offset:
            return self._backing(backing, guest, self.cs)
        l2 = self.l2_table(l2_offset)
        idx = e.l2_index(guest, cb, self.ext)
        entry = e.read_l2_entry(l2, idx, self.ext)
        bitmap = e.read_l2_bitmap(l2, idx) if self.ext else 0
        sc_size = self.cs // self.h.subclusters_per_cluster
        out = bytearray()
        sc = 0
        while sc < self.h.subclusters_per_cluster:
            stype, count = e.subcluster_run(entry, bitmap, sc, self.ext, self.h.has_data_file)
            assert count > 0, f"invalid L2 entry {entry:#x} bitmap {bitmap:#x}"
            start, length = sc * sc_size, count * sc_size
            if stype == e.SUBCLUSTER_COMPRESSED:
                offset, nbytes = e.compressed_range(entry, cb)
                raw = self.read(offset, nbytes)
                out += decompress_cluster(raw, self.cs, self.h.compression_type)[start:]
            elif stype == e.SUBCLUSTER_NORMAL:
                src = self.data_file if self.h.has_data_file else None
                out += self.read(e.l2_host_offset(entry) + start, length, src)
            elif stype in (e.SUBCLUSTER_ZERO_PLAIN, e.SUBCLUSTER_ZERO_ALLOC):
                out += bytes(length)
            else:  # unallocated, plain or in an allocated cluster
                out += self._backing(backing, guest + start, length)
            sc += count
        return bytes(out)

    @staticmethod
    def _backing(backing: bytes, offset: int, length: int) -> bytes:
        chunk = backing[offset : offset + length]
        return chunk + bytes(length - len(chunk))

    # --- refcounts ----------------------------------------------------------------------------

    def stored_refcounts(self) -> Counter[int]:
        """Host cluster index -> refcount, from the refcount table and blocks (non-zero only)."""
        order = self.h.refcount_order
        per_block = e.refcount_block_entries(self.h.cluster_bits, order)
        table = self.read(self.h.refcount_table_offset, self.h.refcount_table_clusters * self.cs)
        counts: Counter[int] = Counter()
        for i in range(0, len(table), 8):
            block_offset = e.reftable_block_offset(int.from_bytes(table[i : i + 8], "big"))
            if not block_offset:
                continue
            block = self.read(block_offset, self.cs)
            for cell in range(per_block):
                value = e.get_refcount(block, cell, order)
                if value:
                    counts[(i // 8) * per_block + cell] = value
        return counts

    def referenced(self) -> Counter[int]:
        """Host cluster index -> the number of references the metadata makes to it."""
        refs: Counter[int] = Counter()
        self._ref_range(refs, 0, self.cs)
        table_size = self.h.refcount_table_clusters * self.cs
        self._ref_range(refs, self.h.refcount_table_offset, table_size)
        table = self.read(self.h.refcount_table_offset, table_size)
        for i in range(0, len(table), 8):
            block_offset = e.reftable_block_offset(int.from_bytes(table[i : i + 8], "big"))
            if block_offset:
                self._ref_range(refs, block_offset, self.cs)
        self._ref_l1(refs, self.h.l1_table_offset, self.h.l1_size)
        snapshots = self.snapshots()
        if snapshots:
            self._ref_range(refs, self.h.snapshots_offset, snapshot_table_size(snapshots))
        for sn in snapshots:
            self._ref_l1(refs, sn.l1_table_offset, sn.l1_size)
        return refs

    def _ref_range(self, refs: Counter[int], offset: int, length: int) -> None:
        if length <= 0:
            return
        for cluster in range(offset // self.cs, (offset + length - 1) // self.cs + 1):
            refs[cluster] += 1

    def _ref_l1(self, refs: Counter[int], offset: int, size: int) -> None:
        self._ref_range(refs, offset, 8 * size)
        for l1_entry in self.l1_table(offset, size):
            l2_offset = e.l1_l2_offset(l1_entry)
            if not l2_offset:
                continue
            self._ref_range(refs, l2_offset, self.cs)
            l2 = self.l2_table(l2_offset)
            for idx in range(e.l2_entries_per_cluster(self.h.cluster_bits, self.ext)):
                self._ref_l2_entry(refs, e.read_l2_entry(l2, idx, self.ext))

    def _ref_l2_entry(self, refs: Counter[int], entry: int) -> None:
        ctype = e.cluster_type(entry, self.ext, self.h.has_data_file)
        if ctype == e.CLUSTER_COMPRESSED:
            self._ref_range(refs, *e.compressed_range(entry, self.h.cluster_bits))
        elif ctype in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC) and not self.h.has_data_file:
            self._ref_range(refs, e.l2_host_offset(entry), self.cs)

    def copied_flags_wrong(self) -> list[str]:
        """Active L1/L2 entries whose copied flag disagrees with the stored refcount == 1."""
        stored = self.stored_refcounts()
        wrong = []
        for i, l1_entry in enumerate(self.l1_table()):
            l2_offset = e.l1_l2_offset(l1_entry)
            if not l2_offset:
                continue
            if bool(l1_entry & e.OFLAG_COPIED) != (stored[l2_offset // self.cs] == 1):
                wrong.append(f"L1[{i}]")
            l2 = self.l2_table(l2_offset)
            for idx in range(e.l2_entries_per_cluster(self.h.cluster_bits, self.ext)):
                entry = e.read_l2_entry(l2, idx, self.ext)
                ctype = e.cluster_type(entry, self.ext, self.h.has_data_file)
                if ctype not in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC):
                    continue
                one = self.h.has_data_file or stored[e.l2_host_offset(entry) // self.cs] == 1
                if bool(entry & e.OFLAG_COPIED) != one:
                    wrong.append(f"L2[{i}][{idx}]")
        return wrong

    # --- QEMU's checks on the read path -------------------------------------------------------

    def read_problem(self, guest: int) -> str | None:
        """The corruption text QEMU's lookup (qcow2_get_host_offset) gives for reading the
        cluster at ``guest``, in QEMU's order of checks; None when the entry is sound."""
        cb = self.h.cluster_bits
        l1 = self.l1_table()
        index = e.l1_index(guest, cb, self.ext)
        l2_offset = e.l1_l2_offset(l1[index]) if index < len(l1) else 0
        if not l2_offset:
            return None
        if l2_offset & (self.cs - 1):
            return e.l2_table_unaligned_text(l2_offset, index)
        l2 = self.l2_table(l2_offset)
        idx = e.l2_index(guest, cb, self.ext)
        entry = e.read_l2_entry(l2, idx, self.ext)
        bitmap = e.read_l2_bitmap(l2, idx) if self.ext else 0
        sc = e.subcluster_index(guest, cb) if self.ext else 0
        stype = e.subcluster_type(entry, bitmap, sc, self.ext, self.h.has_data_file)
        if self.h.version < 3 and stype in (e.SUBCLUSTER_ZERO_PLAIN, e.SUBCLUSTER_ZERO_ALLOC):
            return e.zero_in_v2_text(l2_offset, idx)
        if stype == e.SUBCLUSTER_COMPRESSED and self.h.has_data_file:
            return e.compressed_with_data_file_text(l2_offset, idx)
        allocated = (e.SUBCLUSTER_NORMAL, e.SUBCLUSTER_ZERO_ALLOC, e.SUBCLUSTER_UNALLOCATED_ALLOC)
        if stype in allocated:
            host = e.l2_host_offset(entry)
            if host & (self.cs - 1):
                return e.cluster_unaligned_text(host, l2_offset, idx)
            cluster_start = guest & ~(self.cs - 1)
            if self.h.has_data_file and host != cluster_start:
                return e.data_file_offset_mismatch_text(host, cluster_start, idx)
        if stype == e.SUBCLUSTER_INVALID:
            return e.invalid_entry_text(l2_offset, idx)
        return None
