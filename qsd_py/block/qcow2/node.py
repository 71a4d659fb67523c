"""The ``qcow2`` format driver: QEMU's copy-on-write image format, read and written.

A guest offset maps through the L1 and L2 tables (mapping.py) to a host cluster of the
image file (or of the external data file), reads as zeroes, is compressed, or is not
allocated here and reads from the ``backing`` child. Writes go in place where the cluster
belongs to this image alone (its L2 entry has the COPIED flag); elsewhere a new cluster is
allocated (refcount.py), the untouched parts of the cluster are copied into it from where
they read now, and only then does the L2 entry point at it.

This module holds the node's life cycle (open, close, children, permissions) and the request
paths through clusters already mapped, which every read and in-place write takes. The rest
lives beside it, in functions that take the node: allocation and copy-on-write
(allocate.py), write-zeroes and discard (zeroing.py), resize (resize.py), the exports'
cluster table (fast_table.py), the reaction to corruption (corruption.py), and what the node
tells about itself (introspect.py).

Concurrency: ``meta_lock`` guards the caches and tables, held only for lookups and updates,
never across data I/O. An allocating write registers its guest cluster (a second write to
the same cluster waits for it, then looks again) and runs its copy and data write unlocked,
so allocations of different clusters overlap. Changes of many entries at once (discard,
zeroing, resize) take the change lock and wait until no allocation is in flight;
allocations take it only to register (``allocations``, allocate.py). Reads and in-place
writes take only the metadata lock, briefly. Data clusters with I/O in flight are marked
busy in the refcounts so that a discard cannot free one into another guest range's hands
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import os
import struct
import sys
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.block.crypto.io import open_luks
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.block.drivers import driver_class
from qsd_py.block.fast_map import ClusterTable, FastTarget
from qsd_py.block.lock import CrossLoopLock
from qsd_py.block.node import (
    STATUS_DATA,
    STATUS_OFFSET_VALID,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
    Buffer,
    fill_zeroes,
)
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.block.qcow2 import allocate, bitmap_store, fast_table, introspect, resize, zeroing
from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2 import overlap as ol
from qsd_py.block.qcow2.bitmaps import mark_in_use
from qsd_py.block.qcow2.cache import MetaCache
from qsd_py.block.qcow2.corruption import corruption_error, overlap_error, signal_corruption
from qsd_py.block.qcow2.encryption import Qcow2Crypt
from qsd_py.block.qcow2.entries import (
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    compressed_range,
    subcluster_mask,
)
from qsd_py.block.qcow2.entry_checks import EntryChecks
from qsd_py.block.qcow2.mapping import (
    COMPRESSED,
    DATA,
    UNALLOC,
    ZERO,
    ClusterMap,
    MappingError,
    Run,
    append_run,
)
from qsd_py.block.qcow2.metadata import Metadata, load_metadata
from qsd_py.block.qcow2.options import Qcow2Options, parse_options
from qsd_py.block.qcow2.refcount import Refcounts
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

_U64 = struct.Struct(">Q")
_INCOMPAT_AT = 72  # incompatible_features in the header

# The qcow2 nodes whose backing chain is being opened (to find loops).
_OPENING: contextvars.ContextVar[tuple[Qcow2Node, ...]] = contextvars.ContextVar(
    "qcow2_opening", default=()
)


class Qcow2Node(BlockNode):
    driver = "qcow2"
    format_name = "qcow2"
    supports_backing: ClassVar[bool] = True

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.header: hdr.Qcow2Header | None = None
        self.options: Qcow2Options | None = None
        self.map: ClusterMap | None = None
        self.refcounts: Refcounts | None = None
        self.cluster_bits = 16
        self.cluster_size = 1 << 16
        self.size = 0
        self.corrupt = False  # found corrupt while open: every request fails from now on
        self.corruption_signaled = False  # QEMU reports one corruption (or one fatal)
        self._opened = False  # a node whose open failed writes nothing back on close
        self.metadata: Metadata | None = None  # snapshots, bitmap directory (metadata.py)
        self.overlap: ol.OverlapCheck | None = None  # keeps writes off metadata (overlap.py)
        self.checks: EntryChecks | None = None  # what a lookup refuses (entry_checks.py)
        self.allocations = allocate.Allocations()  # allocating writes in flight (allocate.py)
        self.meta_lock = CrossLoopLock()
        self._decompressed: tuple[int, bytes] | None = None  # (L2 entry, cluster) cache
        self.table: ClusterTable | None = None  # what exports' fast paths may use
        self._cleaner: asyncio.TimerHandle | None = None
        self._dirty_marked = False  # lazy refcounts: the dirty bit is set in the file
        self.free_byte_offset = 0  # where the next compressed data may go (0: a new cluster)
        self.crypt: Qcow2Crypt | None = None  # LUKS encryption (encryption.py)

    @property
    def snapshots(self) -> list[Any]:
        """The internal snapshots (read and checked on open)."""
        return self.metadata.snapshots if self.metadata is not None else []

    # --- children -------------------------------------------------------------------------
    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    @property
    def data_node(self) -> BlockNode:
        """Where data clusters live: the external data file, or the image file; through
        the LUKS cipher in an encrypted image (its sectors numbered by host offset)."""
        child = self.children.get("data-file")
        node = (child or self.children["file"]).node
        if self.crypt is not None:
            return self.crypt.over(node)
        return node

    @property
    def backing(self) -> BlockNode | None:
        return self.child_node("backing")

    def _file_node(self) -> BlockNode:
        return self.children["file"].node

    def allocated(self, l2e: int) -> bool:
        """Whether an entry points at a host cluster. Offset 0 means unallocated, except
        with an external data file, where 0 is a real offset and COPIED (always set there:
        data clusters are not shared) tells them apart, as QEMU does."""
        if l2e & OFLAG_COMPRESSED:
            return False
        if l2e & L2E_OFFSET_MASK:
            return True
        return bool(l2e & OFLAG_COPIED) and "data-file" in self.children

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        file = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", file, *self._storage_perms(Perm(0), PERM_ALL))
        self.read_only = self.read_only or file.read_only
        first = bytearray(min(file.length(), 1 << hdr.MAX_CLUSTER_BITS))
        if first:
            await file.read(0, memoryview(first))
        try:
            h = hdr.parse_header(
                first, read_only=self.read_only, data_file_given="data-file" in self.opts
            )
        except hdr.Qcow2Error as err:
            raise QMPError(str(err)) from err
        _print_warnings(h)
        await self._open_encryption(h)
        self.header = h
        self.cluster_bits, self.cluster_size = h.cluster_bits, h.cluster_size
        self.size = h.size
        entry_size = 16 if h.extended_l2 else 8
        self.options = parse_options(
            self.opts, cluster_size=h.cluster_size, virtual_size=h.size, l2_entry_size=entry_size
        )
        if self.options.lazy_refcounts and h.version < 3:
            raise QMPError(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            )
        await self._open_data_file(h)
        await self._load_metadata(h)
        await self._load_tables(h)
        await bitmap_store.load_dirty_bitmaps(self)
        self.graph.register(self)  # after its files, before its backing chain (QEMU's order)
        await self._open_backing(h)
        fast_table.publish_missing_tables(self)
        if not self.read_only:
            await self._open_for_writing(h)
        self._opened = True

    async def _open_encryption(self, h: hdr.Qcow2Header) -> None:
        """Unlock the LUKS header the encryption extension points at (QEMU's texts)."""
        encrypt = self.opts.get("encrypt") or {}
        if h.crypt_method == hdr.CRYPT_NONE:
            if encrypt:
                raise QMPError("No encryption in image header, but options specified format 'luks'")
            return
        if encrypt.get("format", "luks") != "luks":
            raise QMPError(
                f"Header reported 'luks' encryption format but options specify "
                f"'{encrypt['format']}'"
            )
        assert h.crypto_header is not None
        base, length = h.crypto_header
        file = self.children["file"].node

        async def read(offset: int, n: int) -> bytes:
            buf = bytearray(n)
            end = max(0, min(n, length - offset, file.length() - base - offset))
            if end:
                await file.read(base + offset, memoryview(buf)[:end])
            return bytes(buf)

        header, cipher = await open_luks(self, encrypt.get("key-secret"), read, "encrypt.")
        self.crypt = Qcow2Crypt(header, cipher, base, length)

    async def _open_data_file(self, h: hdr.Qcow2Header) -> None:
        ref = self.opts.get("data-file")
        if ref is None and h.has_data_file:
            if h.data_file is None:
                raise QMPError("Image has an external data file but no data-file option was given")
            ref = {"driver": "file", "filename": self.relative(h.data_file)}
        if ref is None:
            return
        if not h.has_data_file:
            raise QMPError("'data-file' can only be set for images with an external data file")
        node = await self.graph.open_child(self, ref)
        self.attach_child("data-file", node, *self._data_perms(Perm(0), PERM_ALL))

    async def _load_tables(self, h: hdr.Qcow2Header) -> None:
        file = self.file
        opts = self.options
        assert opts is not None
        l1 = await self._read_table(h.l1_table_offset, h.l1_size)
        ref_entries = (h.refcount_table_clusters << h.cluster_bits) // 8
        reftable = await self._read_table(h.refcount_table_offset, ref_entries)
        refcache = MetaCache(
            "refcount",
            self._guarded(ol.ROLE_REFCOUNT_CACHE),
            h.cluster_size,
            opts.refcount_cache_size // h.cluster_size,
        )
        l2cache = MetaCache(
            "l2",
            self._guarded(ol.ROLE_L2_CACHE),
            opts.l2_cache_entry_size,
            opts.l2_cache_size // opts.l2_cache_entry_size,
        )
        self.refcounts = Refcounts(
            self._guarded(ol.ROLE_REFCOUNTS), h.cluster_bits, h.refcount_order,
            h.refcount_table_offset, reftable, refcache,
        )  # fmt: skip
        size = file.exact_length()
        self.refcounts.high_water = -(-size // h.cluster_size)
        self.refcounts.file_end = self.refcounts.image_end = size
        self.refcounts.on_free = functools.partial(allocate.discard_freed, self)
        self.map = ClusterMap(
            self._guarded(ol.ROLE_MAP), h.cluster_bits, h.extended_l2, h.l1_table_offset, l1,
            l2cache, self.refcounts,
        )  # fmt: skip
        self.table = ClusterTable(h.cluster_bits, -(-h.size // h.cluster_size))
        self.map.publish = functools.partial(fast_table.publish, self)
        self.map.publish_many = functools.partial(fast_table.publish_many, self)
        if opts.cache_clean_interval:
            loop = asyncio.get_running_loop()
            self._cleaner = loop.call_later(opts.cache_clean_interval, self._clean_caches)
        self.map.on_corruption = functools.partial(signal_corruption, self)
        self.refcounts.on_corruption = functools.partial(signal_corruption, self)

    def _clean_caches(self) -> None:
        """Every ``cache-clean-interval`` seconds: drop cache pieces unused since last time."""
        assert self.options is not None and self.map is not None
        loop = asyncio.get_running_loop()
        loop.create_task(self._clean_caches_now())
        self._cleaner = loop.call_later(self.options.cache_clean_interval, self._clean_caches)

    async def _clean_caches_now(self) -> None:
        assert self.map is not None and self.refcounts is not None
        async with self.meta_lock:
            self.map.cache.clean_unused()
            self.refcounts.cache.clean_unused()

    async def _load_metadata(self, h: hdr.Qcow2Header) -> None:
        """Snapshots and bitmaps (an unreadable snapshot table refuses the open, as in
        QEMU), the overlap checks, and the checks of L2 entries on lookups."""
        try:
            self.metadata = await load_metadata(self.file, h)
        except hdr.Qcow2Error as err:
            raise QMPError(str(err)) from err
        checks = ol.parse_overlap_check(self.opts)
        bitmaps = bool(h.autoclear_features & hdr.AUTOCLEAR_BITMAPS)
        self.overlap = ol.OverlapCheck(
            checks, h.cluster_bits, self._overlap_state, self.metadata, bitmaps
        )
        await self.overlap.load_inactive_l2(self.file)
        self.checks = EntryChecks(
            h.cluster_bits, h.extended_l2, h.version, h.has_data_file,
            lambda guest_cluster: self.map.l2_table(guest_cluster) if self.map else 0,
        )  # fmt: skip

    def _overlap_state(self) -> ol.TableState:
        assert self.map is not None and self.refcounts is not None
        m, r = self.map, self.refcounts
        return ol.TableState(
            m.l1_offset, m.l1, (id(m), m.l1_version), r.table_offset, r.table, (id(r), r.version)
        )

    def _guarded(self, role: str) -> Any:
        """The ``file`` child for the metadata code in ``role``: writes overlap-checked."""
        on_overlap = functools.partial(overlap_error, self)
        guarded = ol.GuardedFile(self._file_node, lambda: self.overlap, role, on_overlap)
        return lambda: guarded

    async def reload_tables(self) -> None:
        """Read the tables again after the repair rewrote them behind the caches' backs."""
        assert self.header is not None
        await self._load_tables(self.header)
        self.fast_plans_changed()  # a new cluster table: plans made with the old one are stale

    async def _read_table(self, offset: int, entries: int) -> list[int]:
        if not entries:
            return []
        buf = bytearray(entries * 8)
        await self.file.read(offset, memoryview(buf))
        return [v for (v,) in _U64.iter_unpack(buf)]

    async def _open_backing(self, h: hdr.Qcow2Header) -> None:
        """``backing``: a node, null (none), or absent: the header's backing file, opened
        read-only as an implicit node (format from the header, else probed)."""
        if "backing" in self.opts:
            ref = self.opts["backing"]
            if ref is None:
                return
        elif h.backing_name is None:
            return
        else:
            path = self.relative(h.backing_name)
            ref = {
                "driver": h.backing_format or await self._probe(path),
                "read-only": True,
                "file": {"driver": "file", "filename": path},
            }
            if ref["driver"] == "file":
                ref = {**ref["file"], "read-only": True}
        token = _OPENING.set((*_OPENING.get(), self))
        try:
            if isinstance(ref, dict):
                self._refuse_loop(ref)
            node = await self.graph.open_child(self, ref)
            self.attach_child("backing", node, *self._cow_perms(Perm(0), PERM_ALL))
        except QMPError as err:
            raise QMPError(f"Could not open backing file: {err.desc}") from err
        finally:
            _OPENING.reset(token)

    def _refuse_loop(self, ref: dict[str, Any]) -> None:
        """A backing file that is an image above it in the chain being opened, read-only,
        and would open its backing file again: QEMU opens such a chain forever, so the loop
        is refused here. Opened read-write, the image's own lock refuses it (QEMU's text);
        a raw node over the same file opens nothing further and is no loop. The file is
        compared by identity, so a symbolic or hard link to it counts as the file."""
        if not _opens_backing(ref.get("driver")):
            return
        file = ref.get("file")
        path = file.get("filename") if isinstance(file, dict) else None
        if path is None:
            return
        for node in _OPENING.get():
            if node.read_only and _same_file(node.file.filename(), path):
                raise QMPError(f"Backing file '{path}' is already in the chain: a loop")

    async def _probe(self, path: str) -> str:
        """The format of a backing file named without one: qcow2 by its magic, else raw."""
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as err:
            raise QMPError(
                f"Could not open backing file: Could not open '{path}': {os.strerror(err.errno)}"
            ) from err
        return "qcow2" if magic == b"QFI\xfb" else "raw"

    def relative(self, name: str) -> str:
        """A file name from the header, relative to the image's directory (QEMU's rule)."""
        if os.path.isabs(name):
            return name
        base = self.file.filename()
        return os.path.join(os.path.dirname(base), name)

    async def _open_for_writing(self, h: hdr.Qcow2Header) -> None:
        if h.needs_rewrite:
            await self._write_header()
        assert self.metadata is not None
        await mark_in_use(self.file, self.metadata.bitmaps)  # bitmaps.py says why
        if h.dirty:
            from qsd_py.block.qcow2.repair import rebuild_refcounts

            if await rebuild_refcounts(self):
                await self.set_incompatible(h.incompatible_features & ~hdr.INCOMPAT_DIRTY)

    def close(self) -> None:
        """Metadata was written back by :meth:`prepare_close`; drop the fast-path table."""
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None
        if self.table is not None:
            self.table.close()
            self.table = None

    async def prepare_close(self) -> None:
        """Write back the caches and clear the dirty bit of lazy refcounts."""
        if self.read_only or self.map is None or self.corrupt or not self._opened:
            return
        await bitmap_store.store_dirty_bitmaps(self)
        await self.do_flush()
        assert self.header is not None and self.refcounts is not None
        if self._dirty_marked or self.header.dirty:  # QEMU marks the image clean on close
            await self.set_incompatible(self.header.incompatible_features & ~hdr.INCOMPAT_DIRTY)
            await self.file.flush()
            self._dirty_marked = False
        await self.refcounts.trim()

    # --- permissions ----------------------------------------------------------------------
    def _storage_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """The ``file`` child holds data and metadata: QEMU's rule for storage children
        (its users' write-unchanged passes down too: a stream's copy-on-read filter's)."""
        passthrough = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        perm = (perm & (passthrough | Perm.WRITE_UNCHANGED)) | Perm.CONSISTENT_READ
        shared = (shared & passthrough) | Perm.WRITE_UNCHANGED
        if not self.read_only:
            perm |= Perm.WRITE | Perm.RESIZE
        return perm, shared & ~(Perm.WRITE | Perm.RESIZE)

    def _data_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        passthrough = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        perm = (perm & passthrough) | Perm.CONSISTENT_READ
        if not self.read_only:
            perm |= Perm.WRITE | Perm.RESIZE
        return perm, ((shared & passthrough) | Perm.WRITE_UNCHANGED) & ~Perm.RESIZE

    @staticmethod
    def _cow_perms(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """The ``backing`` child is only read; others may not write it unless our users
        share writes (QEMU's rule for COW children)."""
        new_shared = (Perm.WRITE | Perm.RESIZE) if shared & Perm.WRITE else Perm(0)
        new_shared |= Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        return perm & Perm.CONSISTENT_READ, new_shared

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        rules = {"file": self._storage_perms, "data-file": self._data_perms,
                 "backing": self._cow_perms}  # fmt: skip
        for role, child in list(self.children.items()):
            child.set_perms(*rules[role](perm, shared))

    # --- persistent dirty bitmaps (bitmap_store.py) -----------------------------------------
    def can_store_dirty_bitmap(self, name: str, granularity: int) -> None:
        bitmap_store.check_new_bitmap(self, name, granularity)

    async def remove_persistent_bitmap(self, bitmap: DirtyBitmap) -> None:
        if bitmap.name is not None:
            await bitmap_store.remove_persistent(self, bitmap.name)

    # --- header writes --------------------------------------------------------------------
    async def set_incompatible(self, bits: int) -> None:
        assert self.header is not None
        self.header.incompatible_features = bits
        await self.file.write(_INCOMPAT_AT, _U64.pack(bits))

    async def write_header(self) -> None:
        """Rewrite the header cluster from :attr:`header` (image creation changes it)."""
        await self._write_header()

    async def _write_header(self) -> None:
        assert self.header is not None
        await self.file.write(0, hdr.serialize_header(self.header))
        await self.file.flush()

    async def mark_dirty(self) -> None:
        """Lazy refcounts: set the dirty bit (on disk) before the first unordered write."""
        if self._dirty_marked or not self.lazy_refcounts():
            return
        assert self.header is not None
        await self.set_incompatible(self.header.incompatible_features | hdr.INCOMPAT_DIRTY)
        await self.file.flush()
        self._dirty_marked = True

    def lazy_refcounts(self) -> bool:
        """Whether lazy refcounts are in effect: the option's word, else the header's."""
        assert self.header is not None and self.options is not None
        lazy = self.options.lazy_refcounts
        return self.header.lazy_refcounts if lazy is None else lazy

    # --- corruption (corruption.py reports it) ----------------------------------------------
    def _check_usable(self) -> None:
        """QEMU takes the driver away from an image marked corrupt: ENOMEDIUM from then on."""
        if self.corrupt:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))

    def info(self, flat: bool = False) -> dict[str, Any]:
        if self.corrupt:
            raise QMPError(f"Block device {self.node_name} is ejected")
        entry = super().info(flat)
        if self.crypt is not None:
            entry["encrypted"] = True
        return entry

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return self.size

    async def do_allocated_size(self) -> int:
        total = await self.file.allocated_size()
        if "data-file" in self.children:
            total += await self.children["data-file"].node.allocated_size()
        return total

    def allocated_size_now(self) -> int | None:
        """The file's and the data file's; unknown if either is (stored in nbd or rbd)."""
        sizes = [self.file.allocated_size_now()]
        if "data-file" in self.children:
            sizes.append(self.children["data-file"].node.allocated_size_now())
        if None in sizes:
            return None
        return sum(s for s in sizes if s is not None)

    # --- mapping --------------------------------------------------------------------------
    async def _runs(self, offset: int, length: int) -> list[Run]:
        """What ``[offset, offset + length)`` reads from, as merged runs (metadata lock
        held by the caller)."""
        assert self.map is not None
        runs: list[Run] = []
        pos, end = offset, offset + length
        cs = self.cluster_size
        while pos < end:
            guest_cluster = pos >> self.cluster_bits
            l2e, bitmap = await self.map.entry(guest_cluster)
            in_cluster = pos & (cs - 1)
            n = min(end - pos, cs - in_cluster)
            for kind, host, piece in self.classify(guest_cluster, l2e, bitmap, in_cluster, n):
                append_run(runs, kind, pos, piece, host)
                pos += piece
        return runs

    def classify(
        self, guest_cluster: int, l2e: int, bitmap: int, in_cluster: int, n: int
    ) -> list[tuple[int, int, int]]:
        """``(kind, host, bytes)`` pieces of one cluster's ``[in_cluster, +n)``."""
        checks = self.checks
        problem = checks.on_read(guest_cluster, l2e, bitmap, in_cluster) if checks else None
        if problem is not None:
            raise MappingError(problem)
        if l2e & OFLAG_COMPRESSED:
            return [(COMPRESSED, l2e, n)]
        offset = l2e & L2E_OFFSET_MASK
        if self.map is not None and not self.map.extended:
            if l2e & OFLAG_ZERO:
                return [(ZERO, 0, n)]
            if self.allocated(l2e):
                return [(DATA, offset + in_cluster, n)]
            return [(UNALLOC, 0, n)]
        return self._classify_subclusters(bitmap, offset, self.allocated(l2e), in_cluster, n)

    def _classify_subclusters(
        self, bitmap: int, offset: int, allocated: bool, in_cluster: int, n: int
    ) -> list[tuple[int, int, int]]:
        sc_size = self.cluster_size // SUBCLUSTERS
        pieces: list[tuple[int, int, int]] = []
        pos, end = in_cluster, in_cluster + n
        while pos < end:
            sc = pos // sc_size
            alloc, zero = bitmap >> sc & 1, bitmap >> (32 + sc) & 1
            if alloc and zero:
                raise MappingError("Subcluster both allocated and zero")
            if zero:
                kind, host = ZERO, 0
            elif alloc:
                if not allocated:
                    raise MappingError("Allocated subcluster in an unallocated cluster")
                kind, host = DATA, offset + pos
            else:
                kind, host = UNALLOC, 0
            piece = min(end, (sc + 1) * sc_size) - pos
            pieces.append((kind, host, piece))
            pos += piece
        return pieces

    async def _lookup(self, offset: int, length: int) -> list[Run]:
        """The runs of a request, with its data clusters marked busy (release them with
        :meth:`_release`). A wrong table entry marks the image corrupt (EIO)."""
        self._check_usable()
        async with self.meta_lock:
            try:
                runs = await self._runs(offset, length)
            except MappingError as err:
                await signal_corruption(self, str(err))
                raise
            self._hold(runs)
        return runs

    def _hold(self, runs: list[Run]) -> None:
        assert self.refcounts is not None
        for run in runs:
            if run.kind == DATA:
                for index in self._host_clusters(run.host, run.n):
                    self.refcounts.hold(index)

    def _release(self, runs: list[Run]) -> None:
        assert self.refcounts is not None
        for run in runs:
            if run.kind == DATA:
                for index in self._host_clusters(run.host, run.n):
                    self.refcounts.release(index)

    def _host_clusters(self, host: int, n: int) -> range:
        return range(host >> self.cluster_bits, ((host + n - 1) >> self.cluster_bits) + 1)

    # --- read -----------------------------------------------------------------------------
    async def do_read(self, offset: int, buf: memoryview) -> None:
        runs = await self._lookup(offset, len(buf))
        try:
            for run in runs:
                part = buf[run.offset - offset : run.offset - offset + run.n]
                await self.read_run(run, part)
        finally:
            self._release(runs)

    async def read_run(self, run: Run, part: memoryview) -> None:
        if run.kind == DATA:
            if self.graph.debug_nodes:
                self.child_debug_event("file", "read_aio")
            await self.data_node.read(run.host, part)
        elif run.kind == ZERO:
            fill_zeroes(part)
        elif run.kind == UNALLOC:
            await self._read_backing(run.offset, part)
        else:
            cluster = await self._decompress(run.host)
            start = run.offset & (self.cluster_size - 1)
            part[:] = cluster[start : start + run.n]

    async def _read_backing(self, offset: int, part: memoryview) -> None:
        """Unallocated here: the backing node's bytes, zeroes past its end or without one."""
        backing = self.backing
        n = 0
        if backing is not None:
            n = max(0, min(len(part), backing.length() - offset))
            if n:
                await backing.read(offset, part[:n])
        if n < len(part):
            fill_zeroes(part[n:])

    async def _decompress(self, l2e: int) -> bytes:
        cached = self._decompressed
        if cached is not None and cached[0] == l2e:
            return cached[1]
        from qsd_py.block.qcow2.compress import decompress_cluster

        assert self.header is not None
        host, nbytes = compressed_range(l2e, self.cluster_bits)
        nbytes = max(0, min(nbytes, self.file.length() - host))
        raw = bytearray(nbytes)
        if nbytes:
            await self.file.read(host, memoryview(raw))
        try:
            data = decompress_cluster(bytes(raw), self.cluster_size, self.header.compression_type)
        except Exception as err:  # noqa: BLE001 - any decoder failure is EIO
            raise OSError(errno.EIO, f"Could not decompress cluster at {host:#x}") from err
        self._decompressed = (l2e, data)
        return data

    # --- write ----------------------------------------------------------------------------
    async def write_compressed(self, offset: int, data: Buffer) -> None:
        """Write one cluster compressed (backup's ``compress``; compressed_write.py)."""
        from qsd_py.block.qcow2.compressed_write import write_compressed

        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        if self.crypt is not None:  # QEMU's qcow2 has no encrypted compressed clusters
            raise OSError(errno.ENOTSUP, "Compression not supported with encryption")
        self._check_usable()
        self.in_flight.enter()
        try:
            await write_compressed(self, offset, memoryview(data))
        finally:
            self.write_gen += 1
            self.in_flight.leave()

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        buf = data if isinstance(data, memoryview) else memoryview(data)
        self._check_usable()
        if self._looks_fresh(offset, len(buf)) and await allocate.write_fresh(
            self, offset, buf, offset, len(buf)
        ):
            return  # all fresh clusters: no planning pass needed
        pending: list[allocate.Pending] = []  # clusters needing allocation, in order
        await self._write_planned(offset, buf, offset, len(buf), pending)
        if not pending:
            return
        start, end = pending[0].pos, pending[-1].pos + pending[-1].n
        if (
            len(pending) > 1
            and end - start == sum(p.n for p in pending)
            and await allocate.write_fresh(self, offset, buf, start, end - start, pending[0].before)
        ):
            return  # fresh clusters: allocated, written and linked in one batch
        await allocate.write_pending(self, offset, buf, pending)

    def _looks_fresh(self, offset: int, length: int) -> bool:
        """Whether a write spans several clusters and its first has no host cluster (from
        the cached entry, no I/O): worth trying as one fresh batch before planning it
        (which then checks every cluster; the layout is the same either way, since no
        in-place cluster precedes the first one)."""
        if self.map is None or (offset >> self.cluster_bits) == (
            (offset + length - 1) >> self.cluster_bits
        ):
            return False
        entry = self.map.peek(offset >> self.cluster_bits)
        return entry is not None and entry[0] == 0

    async def _write_planned(
        self, offset: int, buf: memoryview, start: int, n: int, pending: list[allocate.Pending]
    ) -> None:
        """Write ``[start, +n)`` of a request (``buf`` at ``offset``) where it can go in
        place; the clusters that need allocating are appended to ``pending``."""
        async with self.meta_lock:
            plan = await self._write_plan(start, n, pending)
            self._hold(plan)
        try:
            for run in plan:
                part = buf[run.offset - offset : run.offset - offset + run.n]
                await self.write_in_place(run.host, part)
        finally:
            self._release(plan)

    async def _write_plan(
        self, offset: int, length: int, pending: list[allocate.Pending]
    ) -> list[Run]:
        """Split a write into in-place runs (returned) and clusters that need allocation
        or copy-on-write (appended to ``pending``, with the host end of an in-place
        cluster just before: QEMU continues the allocation there)."""
        assert self.map is not None
        runs: list[Run] = []
        pos, end = offset, offset + length
        before = -1
        while pos < end:
            guest_cluster = pos >> self.cluster_bits
            in_cluster = pos & (self.cluster_size - 1)
            n = min(end - pos, self.cluster_size - in_cluster)
            l2e, bitmap = await self.map.entry(guest_cluster)
            await self.check_write_entry(pos, l2e, bitmap, n)
            host = self.in_place_host(l2e, bitmap, in_cluster, n)
            if host >= 0:
                append_run(runs, DATA, pos, n, host)
                before = host - in_cluster + self.cluster_size
            else:
                pending.append(allocate.Pending(pos, n, before))
                before = -1
            pos += n
        return runs

    def in_place_host(self, l2e: int, bitmap: int, in_cluster: int, n: int) -> int:
        """The host offset to write ``[in_cluster, +n)`` of a cluster to without changing
        metadata, or -1: only a normal cluster of this image alone (COPIED), and with
        extended L2 only where every touched subcluster is allocated."""
        if not l2e & OFLAG_COPIED or not self.allocated(l2e):
            return -1
        offset = l2e & L2E_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            return -1
        assert self.map is not None
        if self.map.extended:
            mask = subcluster_mask(in_cluster, n, self.cluster_size)
            if bitmap & mask != mask or (bitmap >> 32) & mask:
                return -1
        elif l2e & OFLAG_ZERO:
            return -1
        return offset + in_cluster

    async def check_write_entry(self, guest_offset: int, l2e: int, bitmap: int, n: int) -> None:
        """QEMU's checks of the entry a write of ``n`` bytes meets (entry_checks.py)."""
        partial = n < self.cluster_size
        checks = self.checks
        problem = checks.on_write(guest_offset, l2e, bitmap, partial) if checks else None
        if problem is not None:
            raise await corruption_error(self, problem)

    async def write_in_place(self, host: int, part: memoryview) -> None:
        await self.check_overlap(host, len(part))
        if self.graph.debug_nodes:
            self.child_debug_event("file", "write_aio")
        await self.data_node.write(host, part)

    async def check_overlap(self, host: int, n: int) -> None:
        """Data must never land on the image's own metadata (QEMU's overlap check, as the
        ``overlap-check`` option says); a data file holds no metadata."""
        if "data-file" in self.children or self.overlap is None:
            return
        kind = self.overlap.find(host, n)
        if kind:
            raise await overlap_error(self, ol.overlap_text(kind), host, n)

    async def set_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format in the header (block-stream's end;
        None: no backing file)."""
        assert self.header is not None
        self.header.backing_file = name
        self.header.backing_format = fmt if name is not None else None
        await self.write_header()

    async def reopen_writable(self) -> None:
        """Read-only to read-write (blockdev-reopen): what opening the image for writing
        does; a corrupt image stays read-only (QEMU's text)."""
        assert self.header is not None
        if self.header.corrupt:
            raise QMPError("qcow2: Image is corrupt; cannot be opened read/write")
        await self._open_for_writing(self.header)

    async def reactivate(self) -> None:
        """Active again (blockdev-set-active): another process may have changed the image
        meanwhile, so the header and tables are read anew; the exports' cluster table stays
        the same object (their plans hold it), emptied."""
        assert self.header is not None
        first = bytearray(min(self.file.length(), 1 << hdr.MAX_CLUSTER_BITS))
        await self.file.read(0, memoryview(first))
        try:
            h = hdr.parse_header(
                first, read_only=self.read_only, data_file_given="data-file" in self.opts
            )
        except hdr.Qcow2Error as err:
            raise QMPError(str(err)) from err
        self.header, self.size = h, h.size
        table, self.table = self.table, None
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None
        await self._load_metadata(h)
        await self._load_tables(h)
        if table is not None:
            assert self.table is not None
            self.table.close()
            self.table = table
            table.clear_all()
            await table.barrier()
        fast_table.publish_missing_tables(self)

    def reopen_options(self) -> None:
        """blockdev-reopen's new options: the runtime ones (lazy refcounts, discards, ...)."""
        assert self.header is not None
        entry_size = 16 if self.header.extended_l2 else 8
        self.options = parse_options(
            self.opts, cluster_size=self.cluster_size, virtual_size=self.size,
            l2_entry_size=entry_size,
        )  # fmt: skip

    async def attach_backing(self, node: BlockNode) -> None:
        """Read unallocated clusters from ``node`` from now on (an external snapshot makes
        this node an overlay; the caller drains): the exports' table forgets the zeroes it
        published for them before any reader can use it again."""
        self.attach_child("backing", node, *self._cow_perms(*self.cumulative_perms()))
        if self.table is not None:
            self.table.clear_all()
            await self.table.barrier()

    async def prepare_fast_write(self, offset: int, length: int) -> bool:
        if self.crypt is not None:  # workers would write plaintext: never in place
            return False
        return await allocate.prepare_fast_write(self, offset, length)

    # --- flush ----------------------------------------------------------------------------
    async def do_flush_to_os(self) -> None:
        """The metadata caches written back (QEMU's qcow2 flush_to_os); :meth:`do_flush`
        then finds them clean."""
        self._check_usable()
        if self.map is not None and not self.read_only:
            async with self.meta_lock:
                await self.flush_metadata()

    async def do_flush(self) -> None:
        self._check_usable()
        if self.map is not None and not self.read_only:
            async with self.meta_lock:
                await self.flush_metadata()
        if "data-file" in self.children:
            await self.children["data-file"].node.flush()
        await self.file.flush()

    async def flush_metadata(self) -> None:
        """Write back both caches (metadata lock held)."""
        assert self.map is not None and self.refcounts is not None
        await self.map.cache.write_back()
        await self.refcounts.cache.write_back()

    # --- zeroes and discard (zeroing.py) ---------------------------------------------------
    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        self._check_usable()
        await zeroing.write_zeroes(self, offset, length, unmap, no_fallback)

    async def do_discard(self, offset: int, length: int) -> None:
        if not self.discard_unmap or self.read_only:
            return
        self._check_usable()
        await zeroing.discard(self, offset, length)

    # --- block status -----------------------------------------------------------------------
    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        self._check_usable()
        unmapped = self._without_l2_table(offset, length)
        if unmapped:
            return BlockStatus(0, unmapped)
        async with self.meta_lock:
            try:
                runs = await self._runs(offset, min(length, 64 * self.cluster_size))
            except MappingError as err:
                await signal_corruption(self, str(err))
                raise
        first = runs[0]
        if first.kind == DATA:
            if self.crypt is not None:  # the host bytes are ciphertext: no offset (QEMU's)
                return BlockStatus(STATUS_DATA, first.n)
            flags = STATUS_DATA | STATUS_OFFSET_VALID
            return BlockStatus(flags, first.n, self.data_node, first.host)
        if first.kind == ZERO:
            return BlockStatus(STATUS_ZERO, first.n)
        if first.kind == COMPRESSED:
            return BlockStatus(STATUS_DATA, first.n)
        return BlockStatus(0, first.n)

    def _without_l2_table(self, offset: int, length: int) -> int:
        """Bytes from ``offset`` (up to ``length``) that have no L2 table, to the end of the
        L2 slice as QEMU counts them (a fresh image's 512 MiB at once, where the entry walk
        would take 64 clusters a call); 0 if there is a table or entries may fail checks."""
        table_map = self.map
        if table_map is None or (self.checks is not None and self.checks.any_entry_may_fail):
            return 0
        guest_cluster = offset >> self.cluster_bits
        if guest_cluster >> table_map.l2_bits >= len(table_map.l1):
            return 0
        if table_map.l2_table(guest_cluster):
            return 0
        per_slice = table_map.slice_entries
        slice_end = (guest_cluster // per_slice + 1) * per_slice << self.cluster_bits
        return min(length, slice_end - offset)

    # --- resize (resize.py) ----------------------------------------------------------------
    async def do_truncate(self, length: int, prealloc: str) -> None:
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        self._check_usable()
        await resize.truncate(self, length, prealloc)

    # --- the exports' fast path (fast_table.py) ---------------------------------------------
    def fast_target(self) -> FastTarget | None:
        return fast_table.fast_target(self)

    # --- introspection (introspect.py) ------------------------------------------------------
    def filename(self) -> str:
        return introspect.filename(self)

    def full_options(self) -> dict[str, Any]:
        return introspect.full_options(self)

    def limits(self) -> dict[str, int]:
        return introspect.limits(self)

    def image_extra(self) -> dict[str, Any]:
        return introspect.image_extra(self)


def _print_warnings(h: hdr.Qcow2Header) -> None:
    """QEMU's warnings about the header on stderr, read-only or not (a stale bitmaps
    extension: its bitmaps are dropped, their clusters may be leaked). QEMU ends its
    advice without a newline; here the line is ended."""
    from qsd_py.main import PROG

    for text in h.warnings:
        print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def _opens_backing(driver: Any) -> bool:
    """Whether a node of ``driver`` opens a backing file of its own (an unknown driver
    opens nothing: its open fails with QEMU's text)."""
    try:
        return isinstance(driver, str) and driver_class(driver).supports_backing
    except QMPError:
        return False


def _same_file(a: str, b: str) -> bool:
    """Whether two names are one file (a name that cannot be looked up is no file)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
