"""The ``qcow2`` format driver: QEMU's copy-on-write image format, read and written.

A guest offset maps through the L1 and L2 tables (mapping.py) to a host cluster of the
image file (or of the external data file), reads as zeroes, is compressed, or is not
allocated here and reads from the ``backing`` child. Writes go in place where the cluster
belongs to this image alone (its L2 entry has the COPIED flag); elsewhere a new cluster is
allocated (refcount.py), the untouched parts of the cluster are copied into it from where
they read now, and only then does the L2 entry point at it.

Concurrency: ``_meta_lock`` guards the caches and tables, held only for lookups and updates,
never across data I/O. An allocating write registers its guest cluster (a second write to
the same cluster waits for it, then looks again) and runs its copy and data write unlocked,
so allocations of different clusters overlap. Changes of many entries at once (discard,
zeroing, resize) take ``_change_lock`` and wait until no allocation is in flight; allocations
take it only to register. Reads and in-place writes take only the metadata lock, briefly.
Data clusters with I/O in flight are marked busy in the refcounts so that a discard cannot
free one into another guest range's hands meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import itertools
import json
import logging
import os
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.block import fast_map
from qsd_py.block.drain import InFlight
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
from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2 import overlap as ol
from qsd_py.block.qcow2.bitmaps import mark_in_use
from qsd_py.block.qcow2.cache import MetaCache
from qsd_py.block.qcow2.entries import (
    BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZEROES,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_UNALLOCATED_ALLOC,
    SUBCLUSTER_UNALLOCATED_PLAIN,
    SUBCLUSTER_ZERO_ALLOC,
    SUBCLUSTER_ZERO_PLAIN,
    SUBCLUSTERS,
    alloc_range,
    c_hex,
    compressed_range,
    corruption_report,
    subcluster_index,
    subcluster_type,
)
from qsd_py.block.qcow2.entry_checks import EntryChecks
from qsd_py.block.qcow2.mapping import ClusterMap, MappingError
from qsd_py.block.qcow2.metadata import Metadata, load_metadata
from qsd_py.block.qcow2.options import Qcow2Options, parse_options
from qsd_py.block.qcow2.refcount import Refcounts
from qsd_py.block.qcow2.snapshots import NO_ICOUNT
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
_INCOMPAT_AT = 72  # incompatible_features in the header
_SIZE_AT = 24
_L1_HEADER = struct.Struct(">IQ")  # l1_size, l1_table_offset
_L1_HEADER_AT = 36

# The qcow2 nodes whose backing chain is being opened (to find loops).
_OPENING: contextvars.ContextVar[tuple[Qcow2Node, ...]] = contextvars.ContextVar(
    "qcow2_opening", default=()
)

# What a range of the guest reads from.
UNALLOC, ZERO, DATA, COMPRESSED = range(4)

# Grains that hold no data of their own: zeroing part of one may flag the whole grain zero.
_WITHOUT_DATA = frozenset(
    {
        SUBCLUSTER_UNALLOCATED_PLAIN,
        SUBCLUSTER_UNALLOCATED_ALLOC,
        SUBCLUSTER_ZERO_PLAIN,
        SUBCLUSTER_ZERO_ALLOC,
    }
)

_FAST_ZEROES = fast_map.ZERO | fast_map.VALID

# Discard pass-through types (QEMU's QCOW2_DISCARD_*).
DISCARD_REQUEST, DISCARD_SNAPSHOT, DISCARD_OTHER, DISCARD_ALWAYS = range(4)


@dataclass(slots=True)
class Run:
    """A piece of a request that reads from one place: ``kind``, ``n`` bytes at guest
    ``offset``, from ``host`` (DATA: a host offset; COMPRESSED: the L2 entry)."""

    kind: int
    offset: int
    n: int
    host: int = 0


class CorruptImage(OSError):
    """Metadata found wrong while serving a request: the image is marked corrupt."""


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
        self._corruption_signaled = False  # QEMU reports one corruption (or one fatal)
        self._opened = False  # a node whose open failed writes nothing back on close
        self.metadata: Metadata | None = None  # snapshots, bitmap directory (metadata.py)
        self.overlap: ol.OverlapCheck | None = None  # keeps writes off metadata (overlap.py)
        self.checks: EntryChecks | None = None  # what a lookup refuses (entry_checks.py)
        self._change_lock = CrossLoopLock()
        self._allocating: dict[int, InFlight] = {}  # guest cluster -> its allocation
        self._allocations = InFlight()  # allocating writes in flight
        self._meta_lock = CrossLoopLock()
        self._decompressed: tuple[int, bytes] | None = None  # (L2 entry, cluster) cache
        self.table: ClusterTable | None = None  # what exports' fast paths may use
        self._cleaner: asyncio.TimerHandle | None = None
        self._dirty_marked = False  # lazy refcounts: the dirty bit is set in the file

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
        """Where data clusters live: the external data file, or the image file."""
        child = self.children.get("data-file")
        return (child or self.children["file"]).node

    @property
    def backing(self) -> BlockNode | None:
        return self.child_node("backing")

    def _file_node(self) -> BlockNode:
        return self.children["file"].node

    def _allocated(self, l2e: int) -> bool:
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
        self.graph.register(self)  # after its files, before its backing chain (QEMU's order)
        await self._open_backing(h)
        self._publish_missing_tables()
        if not self.read_only:
            await self._open_for_writing(h)
        self._opened = True

    async def _open_data_file(self, h: hdr.Qcow2Header) -> None:
        ref = self.opts.get("data-file")
        if ref is None and h.has_data_file:
            if h.data_file is None:
                raise QMPError("Image has an external data file but no data-file option was given")
            ref = {"driver": "file", "filename": self._relative(h.data_file)}
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
        self.refcounts.high_water = -(-file.length() // h.cluster_size)
        self.refcounts.file_end = file.length()
        self.refcounts.on_free = self._discard_freed
        self.map = ClusterMap(
            self._guarded(ol.ROLE_MAP), h.cluster_bits, h.extended_l2, h.l1_table_offset, l1,
            l2cache, self.refcounts,
        )  # fmt: skip
        self.table = ClusterTable(h.cluster_bits, -(-h.size // h.cluster_size))
        self.map.publish = self._publish
        if opts.cache_clean_interval:
            loop = asyncio.get_running_loop()
            self._cleaner = loop.call_later(opts.cache_clean_interval, self._clean_caches)
        self.map.on_corruption = self._signal_corruption
        self.refcounts.on_corruption = self._signal_corruption

    def _clean_caches(self) -> None:
        """Every ``cache-clean-interval`` seconds: drop cache pieces unused since last time."""
        assert self.options is not None and self.map is not None
        loop = asyncio.get_running_loop()
        loop.create_task(self._clean_caches_now())
        self._cleaner = loop.call_later(self.options.cache_clean_interval, self._clean_caches)

    async def _clean_caches_now(self) -> None:
        assert self.map is not None and self.refcounts is not None
        async with self._meta_lock:
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
        guarded = ol.GuardedFile(self._file_node, lambda: self.overlap, role, self._overlapping)
        return lambda: guarded

    async def _overlapping(self, msg: str, offset: int, size: int) -> OSError:
        await self._signal_corruption(msg, offset, size)
        return CorruptImage(errno.EIO, msg)

    async def reload_tables(self) -> None:
        """Read the tables again after the repair rewrote them behind the caches' backs."""
        assert self.header is not None
        await self._load_tables(self.header)

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
            path = self._relative(h.backing_name)
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

    def _relative(self, name: str) -> str:
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
                await self._set_incompatible(h.incompatible_features & ~hdr.INCOMPAT_DIRTY)

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
        await self.do_flush()
        assert self.header is not None
        if self._dirty_marked or self.header.dirty:  # QEMU marks the image clean on close
            await self._set_incompatible(self.header.incompatible_features & ~hdr.INCOMPAT_DIRTY)
            await self.file.flush()
            self._dirty_marked = False

    # --- permissions ----------------------------------------------------------------------
    def _storage_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """The ``file`` child holds data and metadata: QEMU's rule for storage children."""
        passthrough = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        perm = (perm & passthrough) | Perm.CONSISTENT_READ
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

    # --- header writes --------------------------------------------------------------------
    async def _set_incompatible(self, bits: int) -> None:
        assert self.header is not None
        self.header.incompatible_features = bits
        await self.file.write(_INCOMPAT_AT, _U64.pack(bits))

    async def _write_header(self) -> None:
        assert self.header is not None
        await self.file.write(0, hdr.serialize_header(self.header))
        await self.file.flush()

    async def _mark_dirty(self) -> None:
        """Lazy refcounts: set the dirty bit (on disk) before the first unordered write."""
        if self._dirty_marked or not self._lazy():
            return
        assert self.header is not None
        await self._set_incompatible(self.header.incompatible_features | hdr.INCOMPAT_DIRTY)
        await self.file.flush()
        self._dirty_marked = True

    def _lazy(self) -> bool:
        assert self.header is not None and self.options is not None
        lazy = self.options.lazy_refcounts
        return self.header.lazy_refcounts if lazy is None else lazy

    async def _signal_corruption(
        self, msg: str, offset: int = -1, size: int = -1, fatal: bool = True
    ) -> None:
        """QEMU's reaction to metadata found wrong at run time: report, emit
        BLOCK_IMAGE_CORRUPTED and, when fatal on a writable node, set the corrupt bit and
        fail every request from now on. A read-only node only reports (fatal: false) and
        goes on. After the first report only a fatal one on a node not yet marked is told."""
        fatal = fatal and not self.read_only
        if self._corruption_signaled and (not fatal or self.corrupt):
            return
        self._corruption_signaled = True
        print(corruption_report(msg, fatal), file=sys.stderr, flush=True)  # QEMU's fprintf
        data: dict[str, Any] = {"device": "", "node-name": self.node_name, "msg": msg}
        if offset >= 0:
            data["offset"] = offset
            data["size"] = size
        data["fatal"] = fatal
        self.graph.emit_event("BLOCK_IMAGE_CORRUPTED", data)
        if not fatal:
            return
        self.corrupt = True
        if self.table is not None:
            self.table.clear_all()  # the fast path asks the node, which refuses
        if self.header is not None and self.header.version >= 3:
            try:
                await self._set_incompatible(
                    self.header.incompatible_features | hdr.INCOMPAT_CORRUPT
                )
                await self.file.flush()
            except OSError:
                log.exception("qcow2: could not set the corrupt bit")

    async def _corruption(self, msg: str) -> MappingError:
        """Report ``msg`` (fatal) and return the error the request fails with."""
        await self._signal_corruption(msg)
        return MappingError(msg)

    def _check_usable(self) -> None:
        """QEMU takes the driver away from an image marked corrupt: ENOMEDIUM from then on."""
        if self.corrupt:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))

    def info(self, flat: bool = False) -> dict[str, Any]:
        if self.corrupt:
            raise QMPError(f"Block device {self.node_name} is ejected")
        return super().info(flat)

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return self.size

    async def do_allocated_size(self) -> int:
        total = await self.file.allocated_size()
        if "data-file" in self.children:
            total += await self.children["data-file"].node.allocated_size()
        return total

    def allocated_size_now(self) -> int:
        total = self.file.allocated_size_now()
        if "data-file" in self.children:
            total += self.children["data-file"].node.allocated_size_now()
        return total

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
            for kind, host, piece in self._classify(guest_cluster, l2e, bitmap, in_cluster, n):
                _append_run(runs, kind, pos, piece, host)
                pos += piece
        return runs

    def _classify(
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
            if self._allocated(l2e):
                return [(DATA, offset + in_cluster, n)]
            return [(UNALLOC, 0, n)]
        return self._classify_subclusters(bitmap, offset, self._allocated(l2e), in_cluster, n)

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
        async with self._meta_lock:
            try:
                runs = await self._runs(offset, length)
            except MappingError as err:
                await self._signal_corruption(str(err))
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
                await self._read_run(run, part)
        finally:
            self._release(runs)

    async def _read_run(self, run: Run, part: memoryview) -> None:
        if run.kind == DATA:
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
    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        buf = data if isinstance(data, memoryview) else memoryview(data)
        self._check_usable()
        pending: list[tuple[int, int]] = []  # (offset, n) of clusters needing allocation
        await self._write_planned(offset, buf, offset, len(buf), pending)
        if len(pending) > 1 and await self._prepare_run(pending):
            # Fresh clusters, now allocated as one run: the data goes in place, in one go.
            start = pending[0][0]
            end = pending[-1][0] + pending[-1][1]
            pending = []
            await self._write_planned(offset, buf, start, end - start, pending)
        for start, n in pending:
            await self._allocating_write(start, buf[start - offset : start - offset + n])

    async def _write_planned(
        self, offset: int, buf: memoryview, start: int, n: int, pending: list[tuple[int, int]]
    ) -> None:
        """Write ``[start, +n)`` of a request (``buf`` at ``offset``) where it can go in
        place; the clusters that need allocating are appended to ``pending``."""
        async with self._meta_lock:
            plan = await self._write_plan(start, n, pending)
            self._hold(plan)
        try:
            for run in plan:
                part = buf[run.offset - offset : run.offset - offset + run.n]
                await self._write_in_place(run.host, part)
        finally:
            self._release(plan)

    async def _prepare_run(self, pending: list[tuple[int, int]]) -> bool:
        """Whether the clusters a write must allocate are consecutive, fresh, and were
        allocated together (:meth:`prepare_fast_write`)."""
        for (start, n), (after, _) in itertools.pairwise(pending):
            if start + n != after:
                return False
        start = pending[0][0]
        return await self.prepare_fast_write(start, pending[-1][0] + pending[-1][1] - start)

    async def _write_plan(
        self, offset: int, length: int, pending: list[tuple[int, int]]
    ) -> list[Run]:
        """Split a write into in-place runs (returned) and clusters that need allocation
        or copy-on-write (appended to ``pending``)."""
        assert self.map is not None
        runs: list[Run] = []
        pos, end = offset, offset + length
        while pos < end:
            guest_cluster = pos >> self.cluster_bits
            in_cluster = pos & (self.cluster_size - 1)
            n = min(end - pos, self.cluster_size - in_cluster)
            l2e, bitmap = await self.map.entry(guest_cluster)
            await self._check_write_entry(pos, l2e, bitmap, n)
            host = self._in_place_host(l2e, bitmap, in_cluster, n)
            if host >= 0:
                _append_run(runs, DATA, pos, n, host)
            else:
                pending.append((pos, n))
            pos += n
        return runs

    def _in_place_host(self, l2e: int, bitmap: int, in_cluster: int, n: int) -> int:
        """The host offset to write ``[in_cluster, +n)`` of a cluster to without changing
        metadata, or -1: only a normal cluster of this image alone (COPIED), and with
        extended L2 only where every touched subcluster is allocated."""
        if not l2e & OFLAG_COPIED or not self._allocated(l2e):
            return -1
        offset = l2e & L2E_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            return -1
        assert self.map is not None
        if self.map.extended:
            mask = _subcluster_mask(in_cluster, n, self.cluster_size)
            if bitmap & mask != mask or (bitmap >> 32) & mask:
                return -1
        elif l2e & OFLAG_ZERO:
            return -1
        return offset + in_cluster

    async def _check_write_entry(self, guest_offset: int, l2e: int, bitmap: int, n: int) -> None:
        """QEMU's checks of the entry a write of ``n`` bytes meets (entry_checks.py)."""
        partial = n < self.cluster_size
        checks = self.checks
        problem = checks.on_write(guest_offset, l2e, bitmap, partial) if checks else None
        if problem is not None:
            raise await self._corruption(problem)

    async def _write_in_place(self, host: int, part: memoryview) -> None:
        await self._check_overlap(host, len(part))
        await self.data_node.write(host, part)

    async def _check_overlap(self, host: int, n: int) -> None:
        """Data must never land on the image's own metadata (QEMU's overlap check, as the
        ``overlap-check`` option says); a data file holds no metadata."""
        if "data-file" in self.children or self.overlap is None:
            return
        kind = self.overlap.find(host, n)
        if kind:
            raise await self._overlapping(ol.overlap_text(kind), host, n)

    async def _allocating_write(self, offset: int, part: memoryview) -> None:
        """Write into one cluster that needs metadata changes (looked up again: an earlier
        write may have made it writable in place meanwhile)."""
        assert self.refcounts is not None
        guest_cluster = offset >> self.cluster_bits
        in_cluster = offset & (self.cluster_size - 1)
        l2e, bitmap = await self._begin_allocation(guest_cluster)
        try:
            await self._check_write_entry(offset, l2e, bitmap, len(part))
            host = self._in_place_host(l2e, bitmap, in_cluster, len(part))
            if host < 0:
                await self._cow_write(guest_cluster, l2e, bitmap, in_cluster, part)
                return
            self.refcounts.hold(host >> self.cluster_bits)
            try:
                await self._write_in_place(host, part)
            finally:
                self.refcounts.release(host >> self.cluster_bits)
        finally:
            self._end_allocation(guest_cluster)

    async def _begin_allocation(self, guest_cluster: int) -> tuple[int, int]:
        """Become the one allocation of ``guest_cluster`` (a second write to it waits for
        the first, allocations of other clusters run in parallel; discards, zeroing and
        resizes wait until none is in flight, see ``_exclusive``). Returns the entry, which
        nobody else changes until :meth:`_end_allocation`."""
        assert self.map is not None
        while True:
            async with self._change_lock, self._meta_lock:
                other = self._allocating.get(guest_cluster)
                if other is None:
                    mine = self._allocating[guest_cluster] = InFlight()
                    mine.enter()
                    self._allocations.enter()
                    await self._mark_dirty()
                    return await self.map.entry(guest_cluster)
            await other.wait_idle()

    def _end_allocation(self, guest_cluster: int) -> None:
        self._allocating.pop(guest_cluster).leave()
        self._allocations.leave()

    async def prepare_fast_write(self, offset: int, length: int) -> bool:
        """Give the fresh clusters of a write (no host cluster, reading as zeroes) host
        clusters of zeroes, allocated as one run, so that the data can go in place in one
        request (a queue worker writes it itself: no data passes through the daemon).
        False where a cluster needs its data copied, or another write is allocating it."""
        if self.read_only or self.corrupt or self.map is None or "data-file" in self.children:
            return False
        bits = self.cluster_bits
        clusters = range(offset >> bits, ((offset + length - 1) >> bits) + 1)
        entries = await self._begin_allocations(clusters)
        if entries is None:
            return False
        try:
            fresh = []
            for guest_cluster, (l2e, bitmap) in zip(clusters, entries, strict=True):
                if self._in_place_host(l2e, bitmap, 0, self.cluster_size) >= 0:
                    continue  # an earlier write got there first
                if self._allocated(l2e) or not self._reads_zero_everywhere(l2e, bitmap):
                    return False
                fresh.append((guest_cluster, l2e, bitmap))
            if fresh:
                await self._allocate_fresh(fresh)
            return True
        finally:
            for guest_cluster in clusters:
                self._end_allocation(guest_cluster)

    async def _begin_allocations(self, clusters: range) -> list[tuple[int, int]] | None:
        """:meth:`_begin_allocation` of several clusters at once; None (nothing registered)
        if one of them is being allocated already."""
        assert self.map is not None
        async with self._change_lock, self._meta_lock:
            if any(c in self._allocating for c in clusters):
                return None
            for guest_cluster in clusters:
                mine = self._allocating[guest_cluster] = InFlight()
                mine.enter()
                self._allocations.enter()
            await self._mark_dirty()
            return [await self.map.entry(c) for c in clusters]

    async def _allocate_fresh(self, fresh: list[tuple[int, int, int]]) -> None:
        """Consecutive host clusters of zeroes for ``fresh`` (guest cluster, entry, bitmap),
        linked in order."""
        assert self.refcounts is not None and self.map is not None
        cs = self.cluster_size
        async with self._meta_lock:
            for guest_cluster, _, _ in fresh:
                await self.map.prepare_table(guest_cluster)
            never_used = self.refcounts.high_water
            host = await self.refcounts.allocate(len(fresh) * cs)
        held = range(host >> self.cluster_bits, (host >> self.cluster_bits) + len(fresh))
        for index in held:
            self.refcounts.hold(index)
        try:
            if held.start < never_used:  # reused clusters: zero them
                await self.data_node.write_zeroes(host, len(fresh) * cs, False)
            async with self._meta_lock:
                for i, (guest_cluster, l2e, bitmap) in enumerate(fresh):
                    await self._link(guest_cluster, l2e, bitmap, host + i * cs, 0, cs, False)
        finally:
            for index in held:
                self.refcounts.release(index)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """For changes of many entries at once (discard, zeroing, resize): no allocation in
        flight, none starting, and the metadata lock held."""
        async with self._change_lock:
            await self._allocations.wait_idle()
            async with self._meta_lock:
                yield

    async def _cow_write(
        self, guest_cluster: int, l2e: int, bitmap: int, in_cluster: int, part: memoryview
    ) -> None:
        """Allocate (or reuse, for a subcluster of a cluster of ours) a host cluster, fill
        it from where the cluster reads now around the new data, then point the L2 entry at
        it and drop the old cluster's reference."""
        assert self.map is not None and self.refcounts is not None
        cs = self.cluster_size
        extended = self.map.extended
        own = (
            extended and l2e & OFLAG_COPIED and self._allocated(l2e)
        )
        # The span to write: the whole cluster, or (extended L2) whole subclusters.
        if extended:
            sc = cs // SUBCLUSTERS
            lo = in_cluster - in_cluster % sc
            hi = -(-(in_cluster + len(part)) // sc) * sc
            if not own and l2e & OFLAG_COMPRESSED:
                lo, hi = 0, cs  # a compressed cluster is copied whole
            elif not own and bitmap & BITMAP_ALL_ALLOC and self._allocated(l2e):
                lo, hi = 0, cs  # a shared cluster with data: copied whole
        else:
            lo, hi = 0, cs
        guest_base = guest_cluster << self.cluster_bits
        async with self._meta_lock:
            await self.map.prepare_table(guest_cluster)
            # Fresh: past every cluster ever used, so it reads as zeroes already.
            never_used = self.refcounts.high_water
            if own:
                new_host = l2e & L2E_OFFSET_MASK
            elif "data-file" in self.children:
                new_host = guest_base  # an external data file maps guest = host offsets
                never_used = 1 << 62
            else:
                new_host = await self.refcounts.allocate(cs)
            fresh = not own and (new_host >> self.cluster_bits) >= never_used
            self.refcounts.hold(new_host >> self.cluster_bits)
        try:
            span = bytearray(hi - lo)
            view = memoryview(span)
            head = in_cluster - lo
            tail = head + len(part)
            skip_zero_cow = fresh and self._reads_zero_everywhere(l2e, bitmap)
            if not skip_zero_cow:
                if head:
                    await self._read_old(guest_base + lo, l2e, bitmap, view[:head])
                if tail < len(span):
                    await self._read_old(guest_base + lo + tail, l2e, bitmap, view[tail:])
                view[head:tail] = part
                await self._check_overlap(new_host + lo, len(span))
                await self.data_node.write(new_host + lo, view)
            else:
                await self._check_overlap(new_host + in_cluster, len(part))
                await self.data_node.write(new_host + in_cluster, part)
            async with self._meta_lock:
                await self._link(guest_cluster, l2e, bitmap, new_host, lo, hi, own)
        finally:
            self.refcounts.release(new_host >> self.cluster_bits)

    def _reads_zero_everywhere(self, l2e: int, bitmap: int) -> bool:
        """Whether the cluster's old content is all zeroes without reading anything."""
        if l2e & OFLAG_COMPRESSED:
            return False
        if self.map is not None and self.map.extended:
            if bitmap & BITMAP_ALL_ALLOC:
                return False
            if bitmap >> 32 == BITMAP_ALL_ALLOC:
                return True
        elif l2e & OFLAG_ZERO:
            return True
        elif self._allocated(l2e):
            return False
        return self.backing is None

    async def _read_old(self, offset: int, l2e: int, bitmap: int, out: memoryview) -> None:
        """What ``out``'s range of the guest reads now (copy-on-write source)."""
        in_cluster = offset & (self.cluster_size - 1)
        guest_cluster = offset >> self.cluster_bits
        pos = 0
        try:
            pieces = self._classify(guest_cluster, l2e, bitmap, in_cluster, len(out))
        except MappingError as err:
            raise await self._corruption(str(err)) from err
        for kind, host, n in pieces:
            await self._read_run(Run(kind, offset + pos, n, host), out[pos : pos + n])
            pos += n

    async def _link(
        self,
        guest_cluster: int,
        old: int,
        bitmap: int,
        new_host: int,
        lo: int,
        hi: int,
        own: bool,
    ) -> None:
        """Point the entry at the new cluster (after its refcount: the L2 cache depends on
        the refcount cache), then drop the old cluster's reference."""
        assert self.map is not None and self.refcounts is not None
        new_bitmap = 0
        if self.map.extended:
            mask = _subcluster_mask(lo, hi - lo, self.cluster_size)
            new_bitmap = (bitmap | mask) & ~(mask << 32)
            if not own and (lo, hi) == (0, self.cluster_size):
                new_bitmap = BITMAP_ALL_ALLOC
            elif not own:
                new_bitmap = mask | (bitmap & ~mask & BITMAP_ALL_ZEROES)
        if not self._lazy():
            await self.map.cache.depend_on(self.refcounts.cache)
        await self.map.set_entry(guest_cluster, new_host | OFLAG_COPIED, new_bitmap)
        if not own:
            await self._free_entry(old, DISCARD_OTHER)

    async def _free_entry(self, l2e: int, discard_type: int) -> None:
        """Drop the reference an old L2 entry held (data or compressed clusters); the L2
        update must reach the disk first (the refcount cache depends on the L2 cache)."""
        assert self.map is not None and self.refcounts is not None
        if l2e & OFLAG_COMPRESSED:
            host, nbytes = compressed_range(l2e, self.cluster_bits)
            start, n = host & ~511, nbytes
        else:
            start, n = l2e & L2E_OFFSET_MASK, self.cluster_size
            if not start or "data-file" in self.children:
                return  # nothing allocated, or data clusters are not refcounted
            if start & (self.cluster_size - 1):
                text = f"Cannot free unaligned cluster {c_hex(start)}"
                await self._signal_corruption(text, fatal=False)
                return
        if not self._lazy():
            await self.refcounts.cache.depend_on(self.map.cache)
        if self.table is not None and not await self.table.barrier():
            log.error("qcow2: leaking cluster %#x: a fast-path request still uses it", start)
            return
        await self.refcounts.free(start, n, discard_type)

    async def _discard_freed(self, offset: int, nbytes: int, kind: int) -> None:
        """A cluster's last reference went: pass the discard to the file if allowed."""
        opts = self.options
        assert opts is not None
        allowed = {
            DISCARD_REQUEST: opts.pass_discard_request,
            DISCARD_SNAPSHOT: opts.pass_discard_snapshot,
            DISCARD_OTHER: opts.pass_discard_other,
            DISCARD_ALWAYS: True,
        }[kind]
        if allowed:
            await self.file.discard(offset, nbytes)

    # --- flush ----------------------------------------------------------------------------
    async def do_flush(self) -> None:
        self._check_usable()
        if self.map is not None and not self.read_only:
            assert self.refcounts is not None
            async with self._meta_lock:
                await self.map.cache.write_back()
                await self.refcounts.cache.write_back()
        if "data-file" in self.children:
            await self.children["data-file"].node.flush()
        await self.file.flush()

    # --- zeroes and discard ----------------------------------------------------------------
    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        self._check_usable()
        assert self.header is not None
        unmap = unmap and self.discard_unmap
        if self.header.data_file_raw:
            # A raw data file is the guest's disk itself: it must read as zeroes too.
            await self.data_node.write_zeroes(offset, length, unmap, no_fallback)
        end = offset + length
        if self.header.version < 3:  # no zero flag: only zeroes written as data will do
            await self._zeroes_as_data(offset, end, no_fallback)
            return
        # As QEMU's generic layer splits it: the part of a grain at the head, whole grains
        # (the image's last one counts as whole), the part of a grain at the tail.
        grain = self._grain()
        head_end = min(-(-offset // grain) * grain, end)
        tail_start = end if end == self.size else max(end // grain * grain, head_end)
        if head_end > offset:
            await self._zero_part_of_grain(offset, head_end, unmap, no_fallback)
        if tail_start > head_end:
            await self._zero_clusters(head_end, tail_start - head_end, unmap)
        if end > tail_start:
            await self._zero_part_of_grain(tail_start, end, unmap, no_fallback)

    async def _zero_part_of_grain(
        self, start: int, end: int, unmap: bool, no_fallback: bool
    ) -> None:
        """Zeroes for part of one grain. As in QEMU, the whole grain becomes a zero one when
        the rest of it reads as zeroes already and it holds no data here (zeroing 4 KiB of an
        unallocated cluster allocates nothing); otherwise the zeroes are written as data."""
        grain = self._grain()
        first = start // grain * grain
        last = min(first + grain, self.size)
        if await self._reads_as_zeroes(first, start) and await self._reads_as_zeroes(end, last):
            if await self._zero_grain_without_data(first, last - first, unmap):
                return
        await self._zeroes_as_data(start, end, no_fallback)

    async def _reads_as_zeroes(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` reads as zeroes by block status through the backing
        chain (QEMU's test: zero clusters and unallocated ranges count, data does not)."""
        while start < end:
            st = await self.block_status_above(start, end - start)
            if not st.flags & STATUS_ZERO or st.length <= 0:
                return False
            start += st.length
        return True

    async def _zero_grain_without_data(self, offset: int, n: int, unmap: bool) -> bool:
        """Flag the grain at ``offset`` zero if it is unallocated or zero here, checked
        under the locks (a write may have allocated it since the caller looked)."""
        assert self.map is not None
        async with self._change_lock, self._meta_lock:
            guest_cluster = offset >> self.cluster_bits
            old, bitmap = await self.map.entry(guest_cluster)
            index = subcluster_index(offset, self.cluster_bits) if self.map.extended else 0
            has_data_file = "data-file" in self.children
            kind = subcluster_type(old, bitmap, index, self.map.extended, has_data_file)
            shared = self._allocated(old) and not old & OFLAG_COPIED
            if kind not in _WITHOUT_DATA or (shared and self.map.extended):
                return False  # a shared cluster's subcluster is zeroed by copy-on-write
            await self._mark_dirty()
            if self.map.extended:
                in_cluster = offset & (self.cluster_size - 1)
                await self._zero_subclusters(guest_cluster, old, bitmap, in_cluster, n, unmap)
            else:
                await self._zero_cluster(guest_cluster, old, unmap)
        return True

    async def _zeroes_as_data(self, start: int, end: int, no_fallback: bool) -> None:
        """QEMU's generic fallback: the driver could not express these zeroes by flags, so
        they are written; a caller that asked for no fallback gets ENOTSUP instead."""
        if no_fallback:
            raise OSError(errno.ENOTSUP, "zeroing this range would write zeroes as data")
        await self.write_zero_buffers(start, end - start)

    def _grain(self) -> int:
        assert self.map is not None
        return self.cluster_size // SUBCLUSTERS if self.map.extended else self.cluster_size

    async def _zero_clusters(self, offset: int, length: int, unmap: bool) -> None:
        """Set the zero flag on whole clusters (subclusters); deallocate with ``unmap``."""
        assert self.map is not None
        as_data: list[tuple[int, int]] = []  # what flags cannot zero: written as zeroes after
        async with self._exclusive():
            await self._mark_dirty()
            pos, end = offset, offset + length
            while pos < end:
                guest_cluster = pos >> self.cluster_bits
                in_cluster = pos & (self.cluster_size - 1)
                n = min(end - pos, self.cluster_size - in_cluster)
                old, bitmap = await self.map.entry(guest_cluster)
                if not self.map.extended:
                    await self._zero_cluster(guest_cluster, old, unmap)
                elif not await self._zero_subclusters(
                    guest_cluster, old, bitmap, in_cluster, n, unmap
                ):
                    as_data.append((pos, n))
                pos += n
        for pos, n in as_data:
            await self.write_zero_buffers(pos, n)

    async def _zero_cluster(self, guest_cluster: int, old: int, unmap: bool) -> None:
        assert self.map is not None
        keep = not unmap and old & OFLAG_COPIED and self._allocated(old)
        new = (old | OFLAG_ZERO) if keep else OFLAG_ZERO
        if new == old:
            return
        await self.map.set_entry(guest_cluster, new)
        if not keep:
            await self._free_entry(old, DISCARD_REQUEST)

    async def _zero_subclusters(
        self, guest_cluster: int, old: int, bitmap: int, in_cluster: int, n: int, unmap: bool
    ) -> bool:
        """Zero subclusters by their bits; False where flags cannot do it (part of a shared
        or compressed cluster: the caller writes zeroes, which copies the cluster)."""
        assert self.map is not None
        mask = _subcluster_mask(in_cluster, n, self.cluster_size)
        whole = mask == BITMAP_ALL_ALLOC
        if old & OFLAG_COMPRESSED or (self._allocated(old) and not old & OFLAG_COPIED):
            if not whole:
                return False
            await self.map.set_entry(guest_cluster, 0, BITMAP_ALL_ZEROES)
            await self._free_entry(old, DISCARD_REQUEST)
            return True
        if whole and unmap and self._allocated(old):
            await self.map.set_entry(guest_cluster, 0, BITMAP_ALL_ZEROES)
            await self._free_entry(old, DISCARD_REQUEST)
            return True
        new_bitmap = (bitmap & ~mask) | (mask << 32)
        if new_bitmap != bitmap:
            await self.map.set_entry(guest_cluster, old, new_bitmap)
        return True

    async def do_discard(self, offset: int, length: int) -> None:
        """Whole clusters (subclusters) only, as QEMU's generic layer aligns discards; the
        entry becomes unallocated, or reads as zero where a backing node would show
        through (v3), and the cluster's reference is dropped unless ``discard-no-unref``."""
        if not self.discard_unmap or self.read_only:
            return
        self._check_usable()
        assert self.map is not None and self.options is not None
        grain = self._grain()
        start = -(-offset // grain) * grain
        end = (offset + length) // grain * grain
        if offset + length >= self.size:
            end = self.size
        if start >= end:
            return
        assert self.header is not None
        if self.header.data_file_raw:
            await self.data_node.write_zeroes(start, end - start, True)
        async with self._exclusive():
            pos = start
            while pos < end:
                guest_cluster = pos >> self.cluster_bits
                in_cluster = pos & (self.cluster_size - 1)
                n = min(end - pos, self.cluster_size - in_cluster)
                old, bitmap = await self.map.entry(guest_cluster)
                await self._discard_cluster(guest_cluster, old, bitmap, in_cluster, n)
                pos += n

    async def _discard_cluster(
        self, guest_cluster: int, old: int, bitmap: int, in_cluster: int, n: int
    ) -> None:
        assert self.map is not None and self.header is not None and self.options is not None
        allocated = self._allocated(old) or bool(old & OFLAG_COMPRESSED)
        if self.map.extended and n < self.cluster_size:
            mask = _subcluster_mask(in_cluster, n, self.cluster_size)
            new_bitmap = (bitmap & ~mask) | ((mask << 32) if self.backing is not None else 0)
            if not old & OFLAG_COMPRESSED and new_bitmap != bitmap:
                await self.map.set_entry(guest_cluster, old, new_bitmap)
            return
        if self.backing is not None or allocated:
            if self.map.extended:
                new, new_bitmap = 0, BITMAP_ALL_ZEROES
            else:
                new, new_bitmap = (OFLAG_ZERO if self.header.version >= 3 else 0), 0
        else:
            new, new_bitmap = 0, 0
        if self.options.discard_no_unref and allocated and not old & OFLAG_COMPRESSED:
            # Keep the cluster (and its reference): only say it reads as zeroes.
            if self.map.extended:
                new, new_bitmap = old, BITMAP_ALL_ZEROES
            else:
                new = old | OFLAG_ZERO
            if (new, new_bitmap) != (old, bitmap):
                await self.map.set_entry(guest_cluster, new, new_bitmap)
            return
        if (new, new_bitmap) == (old, bitmap):
            return
        await self.map.set_entry(guest_cluster, new, new_bitmap)
        if allocated:
            await self._free_entry(old, DISCARD_REQUEST)

    # --- block status -----------------------------------------------------------------------
    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        self._check_usable()
        async with self._meta_lock:
            try:
                runs = await self._runs(offset, min(length, 64 * self.cluster_size))
            except MappingError as err:
                await self._signal_corruption(str(err))
                raise
        first = runs[0]
        if first.kind == DATA:
            flags = STATUS_DATA | STATUS_OFFSET_VALID
            return BlockStatus(flags, first.n, self.data_node, first.host)
        if first.kind == ZERO:
            return BlockStatus(STATUS_ZERO, first.n)
        if first.kind == COMPRESSED:
            return BlockStatus(STATUS_DATA, first.n)
        return BlockStatus(0, first.n)

    # --- resize ---------------------------------------------------------------------------
    async def do_truncate(self, length: int, prealloc: str) -> None:
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        self._check_usable()
        assert self.header is not None and self.map is not None
        if length % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        if self.header.version < 3 and self.snapshots:
            raise OSError(errno.ENOTSUP, "Can't resize a v2 image which has snapshots")
        old = self.size
        if length < old:
            await self._shrink(length)
            return
        async with self._exclusive():
            need = -(-length // (self.cluster_size << self.map.l2_bits))
            if need * 8 > hdr.MAX_L1_SIZE:
                msg = f"Failed to grow the L1 table: {os.strerror(errno.EFBIG)}"
                raise OSError(errno.EFBIG, msg)
            if need > len(self.map.l1):
                await self._grow_l1(need)
            await self.file.write(_SIZE_AT, _U64.pack(length))
            await self.file.flush()
            self.size = self.header.size = length
            if prealloc != "off" and length > old:
                await self._preallocate(old, length, prealloc)
        backing = self.backing
        if backing is not None and backing.length() > old and length > old:
            # The new range must read as zeroes, not as the backing file's data.
            await self.do_write_zeroes(old, min(length, backing.length()) - old, False)

    async def _shrink(self, length: int) -> None:
        """Drop everything past ``length``, as QMP's block_resize does to a qcow2 node in
        QEMU: the tail of the last cluster zeroed, the clusters after it discarded (their
        references dropped), the L2 tables past the end freed, then the new size."""
        assert self.map is not None and self.refcounts is not None and self.header is not None
        cs = self.cluster_size
        first_gone = -(-length // cs)
        if length % cs:
            await self.do_write_zeroes(length, min(first_gone * cs, self.size) - length, False)
        async with self._exclusive():
            for guest_cluster in range(first_gone, -(-self.size // cs)):
                if not self.map.l2_table(guest_cluster):
                    continue
                old, bitmap = await self.map.entry(guest_cluster)
                if old or bitmap:
                    await self.map.set_entry(guest_cluster, 0, 0)
                    if self._allocated(old) or old & OFLAG_COMPRESSED:
                        await self._free_entry(old, DISCARD_ALWAYS)
            await self.flush_metadata()
            tables_kept = (first_gone + self.map.l2_entries - 1) >> self.map.l2_bits
            for l1_index in range(tables_kept, len(self.map.l1)):
                table = self.map.l1[l1_index] & L1E_OFFSET_MASK
                if not table:
                    continue
                await self.map.write_l1(l1_index, 0)
                await self.file.flush()  # the L1 entry is gone on disk before the table is
                self.map.cache.discard(table, table + cs)
                await self.refcounts.free(table, cs, DISCARD_ALWAYS)
            await self.file.write(_SIZE_AT, _U64.pack(length))
            await self.file.flush()
            self.size = self.header.size = length

    async def flush_metadata(self) -> None:
        """Write back both caches (metadata lock held)."""
        assert self.map is not None and self.refcounts is not None
        await self.map.cache.write_back()
        await self.refcounts.cache.write_back()

    async def _preallocate(self, start: int, end: int, mode: str) -> None:
        """Give the unallocated clusters of ``[start, end)`` host clusters reading as zeroes,
        allocated on the host too (``falloc``: zero ranges; ``full``: zeroes written), as
        QEMU's preallocate_co does."""
        assert self.map is not None and self.refcounts is not None
        data = self.data_node
        if "data-file" in self.children:
            if end > data.length():
                await data.truncate(end, mode)
            return
        cs = self.cluster_size
        for guest_cluster in range(start >> self.cluster_bits, -(-end // cs)):
            l2e, _ = await self.map.entry(guest_cluster)
            partial = guest_cluster << self.cluster_bits < start
            if self._allocated(l2e) or l2e & OFLAG_COMPRESSED or (partial and self.backing):
                continue  # allocated, or the old part reads from the backing node
            await self.map.prepare_table(guest_cluster)
            host = await self.refcounts.allocate(cs)
            await data.write_zeroes(host, cs, False)  # allocates it on the host, zeroed
            await self.map.cache.depend_on(self.refcounts.cache)
            await self.map.set_entry(guest_cluster, host | OFLAG_COPIED, BITMAP_ALL_ALLOC)

    async def _grow_l1(self, entries: int) -> None:
        """A new L1 table of ``entries`` (copied, written, flushed), the header switched to
        it in one write, then the old one freed."""
        assert self.map is not None and self.refcounts is not None
        nbytes = -(-entries * 8 // self.cluster_size) * self.cluster_size
        new = await self.refcounts.allocate(nbytes)
        grown = self.map.l1 + [0] * (entries - len(self.map.l1))
        table = b"".join(_U64.pack(e) for e in grown)
        await self.refcounts.cache.flush()
        await self.file.write(new, table + bytes(nbytes - len(table)))
        await self.file.flush()
        await self.file.write(_L1_HEADER_AT, _L1_HEADER.pack(entries, new))
        await self.file.flush()
        old_offset, old_bytes = self.map.l1_offset, len(self.map.l1) * 8
        self.map.l1 = grown
        self.map.l1_version += 1
        self.map.l1_offset = new
        assert self.header is not None
        self.header.l1_size, self.header.l1_table_offset = entries, new
        if old_bytes:
            await self.refcounts.free(old_offset, old_bytes)

    # --- the exports' fast path ---------------------------------------------------------------
    def fast_target(self) -> FastTarget | None:
        """The data file's target, mapped through the cluster table."""
        if self.table is None or self.corrupt:
            return None
        target = self.data_node.fast_target()
        if target is None or target.file is None or target.table is not None or target.null:
            return None
        writable = target.writable and not self.read_only
        return FastTarget(file=target.file, base=target.base, table=self.table, writable=writable)

    def _publish_missing_tables(self) -> None:
        """Ranges without an L2 table are unallocated: without a backing node they read as
        zeroes, which the fast path can answer without asking (a fresh image's reads)."""
        assert self.map is not None and self.table is not None
        if self.backing is not None:
            return
        span = self.map.l2_entries
        for l1_index, l1e in enumerate(self.map.l1):
            if not l1e & L1E_OFFSET_MASK:
                self.table.publish_range(l1_index * span, span, _FAST_ZEROES)

    def _publish(self, guest_cluster: int, l2e: int, bitmap: int) -> None:
        """Put what an L2 entry says into the cluster table (see qsd_py/block/fast_map.py):
        a host cluster (written in place only when it is this image's alone), zeroes, or
        0 for anything only the node can serve (backing data, compression, partial
        subclusters)."""
        assert self.table is not None and self.map is not None
        value = self._fast_value(l2e, bitmap)
        checks = self.checks
        if value and checks is not None and checks.on_read(guest_cluster, l2e, bitmap, 0):
            value = 0  # an entry a lookup refuses: the node reports it, never the fast path
        if value & fast_map.WRITABLE and self.overlap is not None:
            if self.overlap.find(value & fast_map.OFFSET_MASK, self.cluster_size):
                value &= ~fast_map.WRITABLE  # writes there are the overlap check's to refuse
        self.table.publish(guest_cluster, value)

    def _fast_value(self, l2e: int, bitmap: int) -> int:
        if l2e & OFLAG_COMPRESSED:
            return 0
        offset = l2e & L2E_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            return 0  # corrupt: the slow road finds and reports it
        assert self.map is not None
        if self.map.extended:
            if bitmap == BITMAP_ALL_ZEROES:
                return _FAST_ZEROES
            if bitmap != BITMAP_ALL_ALLOC:
                return _FAST_ZEROES if bitmap == 0 and self.backing is None else 0
        elif l2e & OFLAG_ZERO:
            return _FAST_ZEROES
        if not self._allocated(l2e):
            return _FAST_ZEROES if self.backing is None else 0
        if l2e & OFLAG_COPIED and not self.read_only:
            return offset | fast_map.VALID | fast_map.WRITABLE
        return offset | fast_map.VALID

    # --- introspection ----------------------------------------------------------------------
    def filename(self) -> str:
        """The image file's name, or QEMU's ``json:`` description once the backing node is
        not the one the header names (given by reference, or null over a named one)."""
        assert self.header is not None
        overridden = "backing" in self.opts
        if not overridden or (self.backing is None and self.header.backing_name is None):
            return self.file.filename()
        return "json:" + json.dumps(self.full_options(), sort_keys=True)

    def full_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": "qcow2"}
        backing = self.backing
        if backing is not None:
            opts["backing"] = backing.full_options()
        elif "backing" in self.opts and self.header and self.header.backing_name is not None:
            opts["backing"] = None  # null over the one the header names
        opts["file"] = self.file.full_options()
        return opts

    def limits(self) -> dict[str, int]:
        """The file's alignment, and discards and zeroes in whole (sub)clusters."""
        limits = self.file.limits()
        limits["discard-alignment"] = self.cluster_size
        limits["write-zeroes-alignment"] = self._grain()
        return limits

    def image_extra(self) -> dict[str, Any]:
        assert self.header is not None
        h = self.header
        extra: dict[str, Any] = {"dirty-flag": h.dirty, "cluster-size": self.cluster_size}
        if h.backing_name is not None:
            extra["backing-filename"] = h.backing_name
            extra["full-backing-filename"] = self._relative(h.backing_name)
            if h.backing_format is not None:
                extra["backing-filename-format"] = h.backing_format
        if self.snapshots:
            extra["snapshots"] = [_snapshot_info(sn) for sn in self.snapshots]
        extra["format-specific"] = {"type": "qcow2", "data": self._format_specific()}
        return extra

    def _format_specific(self) -> dict[str, Any]:
        """ImageInfoSpecificQCow2, members in the schema's order."""
        assert self.header is not None
        h = self.header
        ctype = "zstd" if h.compression_type == hdr.COMPRESSION_ZSTD else "zlib"
        if h.version < 3:
            return {"compat": "0.10", "refcount-bits": h.refcount_bits, "compression-type": ctype}
        data: dict[str, Any] = {"compat": "1.1"}
        if h.has_data_file:
            data["data-file"] = self.children["data-file"].node.filename()
            data["data-file-raw"] = h.data_file_raw
        data["extended-l2"] = h.extended_l2
        data["lazy-refcounts"] = self._lazy()
        data["corrupt"] = h.corrupt
        data["refcount-bits"] = h.refcount_bits
        if self.metadata is not None and self.metadata.bitmaps:
            data["bitmaps"] = [bitmap.info() for bitmap in self.metadata.bitmaps]
        data["compression-type"] = ctype
        return data


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


def _snapshot_info(sn: Any) -> dict[str, Any]:
    """SnapshotInfo of one internal snapshot."""
    info = {
        "id": sn.id,
        "name": sn.name,
        "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    }
    if sn.icount != NO_ICOUNT:
        info["icount"] = sn.icount
    return info


def _append_run(runs: list[Run], kind: int, offset: int, n: int, host: int) -> None:
    """Add a piece, merged into the last run when it continues it."""
    if runs:
        last = runs[-1]
        if last.kind == kind and last.offset + last.n == offset:
            if kind in (ZERO, UNALLOC) or (kind == DATA and last.host + last.n == host):
                last.n += n
                return
    runs.append(Run(kind, offset, n, host))


def _subcluster_mask(in_cluster: int, n: int, cluster_size: int) -> int:
    """The bits of the subclusters that ``[in_cluster, +n)`` touches."""
    sc = cluster_size // SUBCLUSTERS
    return alloc_range(in_cluster // sc, (in_cluster + n - 1) // sc + 1)
