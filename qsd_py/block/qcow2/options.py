"""BlockdevOptionsQcow2 beyond the children: cache sizes, discard pass-through, lazy
refcounts, with QEMU 11.1's defaults and error texts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qsd_py.errors import QMPError

MiB = 1 << 20
DEFAULT_L2_CACHE_MAX = 32 * MiB  # what covers the whole image, at most this (Linux)
MIN_L2_CACHE_ENTRIES = 2
MIN_REFCOUNT_CACHE_ENTRIES = 4
DEFAULT_CACHE_CLEAN_INTERVAL = 600  # seconds; Linux can give back unused cache memory


@dataclass
class Qcow2Options:
    l2_cache_size: int
    l2_cache_entry_size: int
    refcount_cache_size: int
    cache_clean_interval: int
    lazy_refcounts: bool | None  # None: what the image says
    pass_discard_request: bool
    pass_discard_snapshot: bool
    pass_discard_other: bool
    discard_no_unref: bool


def parse_options(
    opts: dict[str, Any], *, cluster_size: int, virtual_size: int, l2_entry_size: int
) -> Qcow2Options:
    """The options of a qcow2 node for an image with these geometry facts, or QMPError."""
    l2, refcount = _cache_sizes(opts, cluster_size, virtual_size, l2_entry_size)
    covers_disk = l2 >= _l2_covering(cluster_size, virtual_size, l2_entry_size)
    # Whole tables when the cache holds every one of them, else 4 KiB slices (QEMU's rule).
    entry_size = opts.get(
        "l2-cache-entry-size", cluster_size if covers_disk else min(cluster_size, 4096)
    )
    if entry_size < 512 or entry_size > cluster_size or entry_size & (entry_size - 1):
        raise QMPError(
            "L2 cache entry size must be a power of two between 512 and the cluster size "
            f"({cluster_size})"
        )
    l2 = max(l2, MIN_L2_CACHE_ENTRIES * entry_size)
    refcount = max(refcount, MIN_REFCOUNT_CACHE_ENTRIES * cluster_size)
    interval = opts.get("cache-clean-interval", DEFAULT_CACHE_CLEAN_INTERVAL)
    if interval < 0 or interval > 0xFFFFFFFF:
        raise QMPError("Cache clean interval too big")
    discard_unmap = opts.get("discard", "ignore") == "unmap"
    return Qcow2Options(
        l2_cache_size=l2,
        l2_cache_entry_size=entry_size,
        refcount_cache_size=refcount,
        cache_clean_interval=interval,
        lazy_refcounts=opts.get("lazy-refcounts"),
        pass_discard_request=opts.get("pass-discard-request", discard_unmap),
        pass_discard_snapshot=opts.get("pass-discard-snapshot", True),
        pass_discard_other=opts.get("pass-discard-other", False),
        discard_no_unref=opts.get("discard-no-unref", False),
    )


def _cache_sizes(
    opts: dict[str, Any], cluster_size: int, virtual_size: int, l2_entry_size: int
) -> tuple[int, int]:
    """QEMU's read_cache_sizes: ``(l2 cache bytes, refcount cache bytes)``."""
    combined = opts.get("cache-size")
    l2 = opts.get("l2-cache-size")
    refcount = opts.get("refcount-cache-size")
    l2_max = _l2_covering(cluster_size, virtual_size, l2_entry_size)
    default_refcount = MIN_REFCOUNT_CACHE_ENTRIES * cluster_size
    if combined is not None:
        if l2 is not None and refcount is not None:
            raise QMPError(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
            )
        if l2 is not None and l2 > combined:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if refcount is not None and refcount > combined:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if l2 is not None:
            return l2, combined - l2
        if refcount is not None:
            return combined - refcount, refcount
        if combined < l2_max + default_refcount:
            return combined - default_refcount, default_refcount
        return l2_max, combined - l2_max
    if l2 is None:
        l2 = min(l2_max, DEFAULT_L2_CACHE_MAX)
    if refcount is None:
        refcount = default_refcount
    return l2, refcount


def _l2_covering(cluster_size: int, virtual_size: int, l2_entry_size: int) -> int:
    """Bytes of L2 tables that map the whole virtual disk."""
    return _round_up(-(-virtual_size // cluster_size) * l2_entry_size, cluster_size)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to
