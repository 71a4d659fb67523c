"""A fuzz of the qcow2 driver: valid images (host qemu-img) with random bytes of their metadata
changed, opened read-only and read-write, read and written.

What must hold for every mutated image, whatever the driver makes of it:

- only QMPError escapes an open, only OSError escapes a request (nothing else, no hang);
- a read-only open changes no byte of the file;
- a read-write session writes only where it may: the header cluster, the active L1 and L2
  tables and the data clusters they point at, the refcount table and blocks, clusters the
  refcounts say are free, and past the end of the file; with the dirty bit set the repair may
  rewrite refcounts and reuse any cluster nothing references, so then only the protected
  clusters below are held;
- whatever else happens, the snapshot table and the snapshots' L1 tables (metadata the driver
  never updates, guarded by the overlap checks) keep their bytes.

``run(seconds, seed)`` fuzzes until the time is up and returns the failures; the test runs it
for a few seconds, ``scripts/qcow2-fuzz`` for as long as asked.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import images

from qsd_py.block.graph import BlockGraph
from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.header import MAX_L1_SIZE, Qcow2Error, Qcow2Header, parse_header
from qsd_py.block.qcow2.metadata import stored_table_size
from qsd_py.block.qcow2.snapshots import SnapshotTableShort, parse_snapshot_table
from qsd_py.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20
READ_LIMIT = 8 * MiB  # how much of the guest a session reads (a mutated size may be huge)
SESSION_TIMEOUT = 60.0  # seconds one open-use-close may take before it counts as a hang


# --- valid images ---------------------------------------------------------------------------


def _patterns(img: Path, spots: list[tuple[int, int]]) -> Path:
    for i, (offset, length) in enumerate(spots):
        images.write(img, offset, length, 0x21 + i)
    return img


SPOTS = [(0, 64 * KiB), (200 * KiB, 100 * KiB), (1 * MiB, 4 * KiB), (3 * MiB, 192 * KiB)]


def _plain(**opts: Any) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        return _patterns(images.create(d / "img.qcow2", "4M", **opts), SPOTS)

    return make


def _compressed(d: Path) -> Path:
    src = images.raw_file(d / "src.raw", images.compressible_data(400 * KiB), 4 * MiB)
    img = images.convert_compressed(src, d / "img.qcow2")
    return _patterns(img, [(1 * MiB, 64 * KiB)])


def _snapshots(d: Path) -> Path:
    img = _patterns(images.create(d / "img.qcow2", "4M"), SPOTS)
    images.snapshot(img, "one")
    _patterns(img, [(32 * KiB, 64 * KiB), (3 * MiB, 4 * KiB)])
    images.snapshot(img, "two")
    return _patterns(img, [(2 * MiB, 64 * KiB)])


def _dirty(d: Path) -> Path:
    img = _patterns(images.create(d / "img.qcow2", "4M", lazy_refcounts=True), SPOTS[:2])
    argv = [images.QEMU_IO, "-f", "qcow2", "-c", "write -P 9 2M 128k", "-c", "abort", str(img)]
    subprocess.run(argv, capture_output=True, timeout=60, cwd=d)
    return img


KINDS: dict[str, Callable[[Path], Path]] = {
    "default": _plain(),
    "4k-1bit": _plain(cluster_size=4096, refcount_bits=1),
    "512": _plain(cluster_size=512),
    "extended-l2": _plain(extended_l2=True),
    "v2": _plain(compat="0.10"),
    "64bit": _plain(refcount_bits=64),
    "compressed": _compressed,
    "snapshots": _snapshots,
    "dirty": _dirty,
}


# --- reading an image's layout from its bytes -----------------------------------------------


def _u64(data: bytes, offset: int) -> int:
    chunk = data[offset : offset + 8]
    return int.from_bytes(chunk + bytes(8 - len(chunk)), "big")


def _read(data: bytes, offset: int, length: int) -> bytes:
    chunk = data[offset : offset + length]
    return chunk + bytes(length - len(chunk))


def _clusters(offset: int, length: int, cluster_bits: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1)


@dataclass
class Layout:
    """Where an image's metadata is, as far as its bytes tell (a damaged image's tables may
    point anywhere; nothing here trusts them beyond reading)."""

    h: Qcow2Header
    regions: list[tuple[str, int, int]] = field(default_factory=list)  # (what, offset, bytes)
    active_l2: list[int] = field(default_factory=list)
    data: list[tuple[int, int]] = field(default_factory=list)  # (offset, bytes) of active data
    refblocks: list[int] = field(default_factory=list)
    protected: list[tuple[int, int]] = field(default_factory=list)  # never written

    @property
    def cluster_bits(self) -> int:
        return self.h.cluster_bits


def layout(data: bytes) -> Layout | None:
    """The layout of an image, or None when QEMU (and the driver) would not open it."""
    try:
        h = parse_header(data[: 2 * MiB], read_only=True)
    except Qcow2Error:
        return None
    lay = Layout(h)
    cs, ext = h.cluster_size, h.extended_l2
    lay.regions.append(("header", 0, min(h.header_length, cs)))
    l1_bytes = 8 * h.l1_size
    lay.regions.append(("L1", h.l1_table_offset, l1_bytes))
    l1 = _read(data, h.l1_table_offset, min(l1_bytes, 64 * KiB))
    for i in range(0, len(l1), 8):
        l2 = _u64(l1, i) & e.L1E_OFFSET_MASK
        if not l2 or l2 in lay.active_l2:
            continue
        lay.active_l2.append(l2)
        lay.regions.append(("L2", l2, cs))
        table = _read(data, l2, cs)
        for index in range(cs // (16 if ext else 8)):
            entry = e.read_l2_entry(table, index, ext)
            ctype = e.cluster_type(entry, ext)
            if ctype == e.CLUSTER_COMPRESSED:
                lay.data.append(e.compressed_range(entry, h.cluster_bits))
            elif ctype in (e.CLUSTER_NORMAL, e.CLUSTER_ZERO_ALLOC):
                lay.data.append((entry & e.L2E_OFFSET_MASK, cs))
    table_bytes = h.refcount_table_clusters * cs
    lay.regions.append(("reftable", h.refcount_table_offset, table_bytes))
    reftable = _read(data, h.refcount_table_offset, min(table_bytes, 64 * KiB))
    for i in range(0, len(reftable), 8):
        block = _u64(reftable, i) & e.REFT_OFFSET_MASK
        if block:
            lay.refblocks.append(block)
            lay.regions.append(("refblock", block, cs))
    _snapshot_layout(data, lay)
    return lay


def _snapshot_layout(data: bytes, lay: Layout) -> None:
    """The snapshot table and the snapshots' L1 tables: metadata the driver never writes.
    Only what QEMU's refcount check counts is protected (the repair frees anything else)."""
    h = lay.h
    if not h.nb_snapshots:
        return
    raw = _read(data, h.snapshots_offset, 64 * KiB)
    try:
        snapshots = parse_snapshot_table(raw, h.nb_snapshots, h.size & ~511)
    except (Qcow2Error, SnapshotTableShort):
        return
    size = stored_table_size(raw, h.nb_snapshots)
    lay.regions.append(("snapshot table", h.snapshots_offset, size))
    end = len(data)
    if h.snapshots_offset + size - end < h.cluster_size:
        lay.protected.append((h.snapshots_offset, size))
    for sn in snapshots:
        aligned = not sn.l1_table_offset & (h.cluster_size - 1)
        if not aligned or sn.l1_size > MAX_L1_SIZE // 8 or not sn.l1_size:
            continue
        lay.regions.append(("snapshot L1", sn.l1_table_offset, 8 * sn.l1_size))
        if sn.l1_table_offset + 8 * sn.l1_size - end < h.cluster_size:
            lay.protected.append((sn.l1_table_offset, 8 * sn.l1_size))


def writable_clusters(data: bytes, lay: Layout) -> set[int] | None:
    """The clusters a read-write session may change (None: any but the protected ones)."""
    h = lay.h
    if h.dirty:
        return None
    cb, cs = h.cluster_bits, h.cluster_size
    ok = {0}
    for what, offset, length in lay.regions:
        if what in ("L1", "L2", "reftable", "refblock"):
            ok.update(_clusters(offset, length, cb))
    for offset, length in lay.data:
        ok.update(_clusters(offset, length, cb))
    # Clusters the refcounts call free may be allocated.
    order = h.refcount_order
    block_bits = cb + 3 - order
    reftable = _read(data, h.refcount_table_offset, h.refcount_table_clusters * cs)
    blocks: dict[int, bytes] = {}
    for cluster in range(-(-len(data) // cs)):
        slot = cluster >> block_bits
        entry = _u64(reftable, 8 * slot) if 8 * slot < len(reftable) else 0
        block_offset = entry & e.REFT_OFFSET_MASK
        if not block_offset:
            ok.add(cluster)
            continue
        if block_offset not in blocks:
            blocks[block_offset] = _read(data, block_offset, cs)
        if not e.get_refcount(blocks[block_offset], cluster & ((1 << block_bits) - 1), order):
            ok.add(cluster)
    return ok


# --- mutations ------------------------------------------------------------------------------


def mutate(data: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, list[str]]:
    """A few random changes in the metadata regions; returns the bytes and what was done."""
    out = bytearray(data)
    done = []
    targets = [r for r in lay.regions if r[2] > 0 and r[1] < len(data)]
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        what, offset, length = rng.choice(targets)
        length = min(length, len(data) - offset)
        if what == "header" and rng.random() < 0.25:
            bit = rng.choice([0, 0, 1, 2, 3, 4, 5])  # dirty (most), corrupt, others
            out[79 - bit // 8] ^= 1 << (bit % 8)
            done.append(f"header: incompatible bit {bit} flipped")
            continue
        pos = offset + rng.randrange(length)
        if rng.random() < 0.5 and length >= 8:
            pos = offset + rng.randrange(length // 8) * 8
            if what != "header":
                pos = _busy_entry(out, offset, length, rng) or pos
            old = _u64(out, pos)
            new = _interesting(old, lay, rng)
            out[pos : pos + 8] = new.to_bytes(8, "big")
            done.append(f"{what}: u64 at {pos:#x} {old:#x} -> {new:#x}")
        else:
            old_byte = out[pos]
            flip = rng.random() < 0.5
            out[pos] = old_byte ^ (1 << rng.randrange(8)) if flip else rng.randrange(256)
            done.append(f"{what}: byte at {pos:#x} {old_byte:#x} -> {out[pos]:#x}")
    return bytes(out), done


def _busy_entry(data: bytearray, offset: int, length: int, rng: random.Random) -> int:
    """An 8-byte slot holding something (tables are mostly zeroes), if one is found soon."""
    for _ in range(16):
        pos = offset + rng.randrange(length // 8) * 8
        if _u64(data, pos):
            return pos
    return 0


def _interesting(old: int, lay: Layout, rng: random.Random) -> int:
    """A replacement entry likely to meet the driver's checks."""
    cs = lay.h.cluster_size
    metadata = [offset for _, offset, _ in lay.regions if offset] or [cs]
    choices = [
        lambda: 0,
        lambda: old + 0x200,
        lambda: old ^ e.OFLAG_COPIED,
        lambda: old | e.OFLAG_COMPRESSED,
        lambda: old ^ 1,
        lambda: old | 1 << rng.randrange(56, 62),
        lambda: e.OFLAG_COPIED | rng.choice(metadata),
        lambda: rng.choice(metadata),
        lambda: e.OFLAG_COPIED | (rng.randrange(1, 64) * cs),
        lambda: e.OFLAG_COPIED | 1 << rng.randrange(30, 56),
        lambda: rng.getrandbits(64),
        lambda: old ^ (1 << rng.randrange(64)),
    ]
    return rng.choice(choices)() & 0xFFFF_FFFF_FFFF_FFFF


# --- one image --------------------------------------------------------------------------------


class Failure(Exception):
    pass


async def _session(img: Path, read_only: bool, rng: random.Random) -> None:
    """Open, read, (write,) close; QMPError from the open and OSError from requests are what
    a damaged image may give, anything else is a failure."""
    graph = BlockGraph()
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": "q",
        "file": {"driver": "file", "filename": str(img)},
        "read-only": read_only,
        "discard": "unmap",
        "overlap-check": rng.choice(["cached", "all"]),
    }
    try:
        try:
            node = await graph.add(opts)
        except QMPError:
            return
        size = min(node.length(), READ_LIMIT)
        step = 256 * KiB
        for pos in range(0, size, step):
            n = min(step, size - pos)
            try:
                await node.read(pos, memoryview(bytearray(n)))
            except OSError:
                pass
        for _ in range(3):
            try:
                await node.block_status(rng.randrange(max(size, 1)) & ~511, 64 * KiB)
            except OSError:
                pass
        if read_only or not size:
            return
        for i in range(rng.randrange(2, 7)):
            offset = rng.randrange(size) & ~511
            length = min(rng.choice([512, 4 * KiB, 64 * KiB, 100 * KiB]), size - offset)
            request = rng.random()
            try:
                if request < 0.7:
                    await node.write(offset, bytes([0x80 + i]) * length)
                elif request < 0.85:
                    await node.write_zeroes(offset, length, unmap=rng.random() < 0.5)
                else:
                    await node.discard(offset, length)
            except OSError:
                pass
        try:
            await node.flush()
        except OSError:
            pass
    finally:
        await graph.close_all()


async def fuzz_one(base: bytes, lay: Layout, img: Path, rng: random.Random) -> list[str]:
    """Mutate ``base``, run a read-only and a read-write session; the mutations done."""
    data, done = mutate(base, lay, rng)
    try:
        await _sessions(data, img, rng)
    except Failure as err:
        raise Failure(f"{err} (mutations: {'; '.join(done)})") from err
    return done


async def _sessions(data: bytes, img: Path, rng: random.Random) -> None:
    mutated = layout(data)
    img.write_bytes(data)
    try:
        await asyncio.wait_for(_session(img, True, rng), SESSION_TIMEOUT)
    except TimeoutError as err:
        raise Failure("read-only session hangs") from err
    except Exception as err:
        raise Failure(f"read-only session: {err!r}\n{traceback.format_exc()}") from err
    if _head(img, len(data)) != data or img.stat().st_size != len(data):
        raise Failure("the read-only session changed the file")
    try:
        await asyncio.wait_for(_session(img, False, rng), SESSION_TIMEOUT)
    except TimeoutError as err:
        raise Failure("read-write session hangs") from err
    except Exception as err:
        raise Failure(f"read-write session: {err!r}\n{traceback.format_exc()}") from err
    _check_writes(data, _head(img, len(data)), mutated)


def _head(img: Path, length: int) -> bytes:
    """The file's first ``length`` bytes (a damaged table may have sent a write far past
    the end: the file is sparse there, and not read whole)."""
    with open(img, "rb") as f:
        return f.read(length)


def _check_writes(before: bytes, after: bytes, lay: Layout | None) -> None:
    if lay is None:  # not a qcow2 image the driver opens: nothing may change
        if after != before:
            raise Failure("a failed open changed the file")
        return
    cb = lay.cluster_bits
    cs = 1 << cb
    allowed = writable_clusters(before, lay)
    protected: set[int] = set()
    for offset, length in lay.protected:
        protected.update(c for c in _clusters(offset, length, cb) if c)
    for cluster in range(len(before) // cs):
        start = cluster << cb
        if before[start : start + cs] == after[start : start + cs]:
            continue
        if cluster in protected:
            raise Failure(f"cluster {cluster} ({start:#x}) of snapshot metadata was written")
        if allowed is not None and cluster not in allowed:
            raise Failure(f"cluster {cluster} ({start:#x}) was written but nothing owns it")


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class Report:
    images: int = 0
    failures: list[str] = field(default_factory=list)


async def run(seconds: float, seed: int, workdir: Path, kinds: list[str] | None = None) -> Report:
    """Fuzz for ``seconds`` (after making the valid images); every failure with how to
    reproduce it (kind, seed, iteration, the mutations)."""
    bases = {}
    for kind in kinds or list(KINDS):
        d = workdir / f"base-{kind}"
        d.mkdir(parents=True, exist_ok=True)
        data = KINDS[kind](d).read_bytes()
        lay = layout(data)
        assert lay is not None, kind
        bases[kind] = (data, lay)
    report = Report()
    rng = random.Random(seed)
    img = workdir / "fuzzed.qcow2"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kind = rng.choice(sorted(bases))
        iteration_seed = rng.getrandbits(32)
        data, lay = bases[kind]
        try:
            await fuzz_one(data, lay, img, random.Random(iteration_seed))
        except Failure as err:
            report.failures.append(f"{kind} seed={iteration_seed}: {err}")
        report.images += 1
    return report


def replay(kind: str, iteration_seed: int, workdir: Path) -> tuple[bytes, list[str]]:
    """The mutated image of a reported failure (for a closer look)."""
    d = workdir / f"base-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    data = KINDS[kind](d).read_bytes()
    lay = layout(data)
    assert lay is not None
    return mutate(data, lay, random.Random(iteration_seed))
