"""``throttle-group`` objects: I/O limits shared by the throttle nodes that name the group.

The limits are QEMU's ThrottleLimits: an average rate (``bps-*``, ``iops-*``), an optional
burst rate (``*-max``) sustained for ``*-max-length`` seconds, and ``iops-size`` (a larger
request counts as several operations). Each limit is a leaky bucket as in QEMU's
util/throttle.c: a request is let through when the bucket's level is below its size (a tenth
of a second of the average rate, or burst rate times burst length), then its bytes or
operations are added; the level leaks at the average rate. A request that finds a bucket
too full waits the time the excess takes to leak. Members of a group share its buckets, so
together they get the group's rate; the level is kept under a lock, so members on
different event loops (iothreads) share it too. When budget frees up and several members
have requests waiting, the members take turns (round-robin, in the order they joined), as
QEMU's throttle groups do, so a member with many requests in flight cannot starve the others.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from qsd_py.errors import QMPError

POLL = 0.001  # seconds a waiter whose member's turn it is not sleeps before looking again
VALUE_MAX = 10**15  # QEMU's THROTTLE_VALUE_MAX
KINDS = ("iops-total", "iops-read", "iops-write", "bps-total", "bps-read", "bps-write")
KEYS = [k + s for k in KINDS for s in ("", "-max", "-max-length")] + ["iops-size"]
FLAT = {f"x-{k}": k for k in KEYS}  # the legacy flat properties


def default_limits() -> dict[str, int]:
    return {k: 1 if k.endswith("-length") else 0 for k in KEYS}


def check_limits(cfg: dict[str, int]) -> None:
    """QEMU's throttle_is_valid, in its order and with its texts."""
    for kind in ("bps", "iops"):
        for sfx in ("", "-max"):
            if cfg[f"{kind}-total{sfx}"] and (
                cfg[f"{kind}-read{sfx}"] or cfg[f"{kind}-write{sfx}"]
            ):
                raise QMPError(
                    "bps/iops/max total values and read/write values cannot be used at the "
                    "same time"
                )
    if cfg["iops-size"] and not any(cfg[f"iops-{d}"] for d in ("total", "read", "write")):
        raise QMPError("iops size requires an iops value to be set")
    for kind in KINDS:
        avg, top, length = cfg[kind], cfg[f"{kind}-max"], cfg[f"{kind}-max-length"]
        if not (0 <= avg <= VALUE_MAX and 0 <= top <= VALUE_MAX):
            raise QMPError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
        if not length:
            raise QMPError("the burst length cannot be 0")
        if length > 1 and not top:
            raise QMPError("burst length set without burst rate")
        if top and length > VALUE_MAX // top:
            raise QMPError("burst length too high for this burst rate")
        if top and not avg:
            raise QMPError("bps_max/iops_max require corresponding bps/iops values")
        if top and top < avg:
            raise QMPError("bps_max/iops_max cannot be lower than bps/iops")


class Bucket:
    """One leaky bucket: its level and its burst level, in bytes or operations."""

    def __init__(self) -> None:
        self.level = 0.0
        self.burst_level = 0.0

    def leak(self, avg: int, top: int, length: int, delta: float) -> None:
        self.level = max(0.0, self.level - avg * delta)
        if length > 1:
            self.burst_level = max(0.0, self.burst_level - top * delta)

    def wait(self, avg: int, top: int, length: int) -> float:
        """Seconds until a request may go (QEMU's throttle_compute_wait)."""
        if not avg:
            return 0.0
        size = top * length if top else avg / 10
        extra = self.level - size
        if extra > 0:
            return extra / avg
        if length > 1:
            extra = self.burst_level - top / 10
            if extra > 0:
                return extra / top
        return 0.0


class ThrottleGroup:
    """The group's limits (``limits``, settable at run time) and its buckets."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        self.id = obj_id
        self.opts = opts
        cfg = default_limits()
        cfg.update({FLAT[k]: v for k, v in opts.items() if k in FLAT})
        cfg.update(opts.get("limits") or {})
        check_limits(cfg)
        self.cfg = cfg
        self.members = 0
        self._ring: list[Any] = []  # the members, in the order they joined
        self._waiting: dict[str, dict[Any, int]] = {"read": {}, "write": {}}
        self._last: dict[str, Any] = {}  # the member served last, per direction
        self._lock = threading.Lock()
        self._buckets = {k: Bucket() for k in KINDS}
        self._stamp = time.monotonic()

    def set_limits(self, limits: dict[str, int]) -> None:
        """qom-set of ``limits``: the given keys change, the rest stay (as QEMU)."""
        cfg = dict(self.cfg, **limits)
        check_limits(cfg)
        with self._lock:
            self.cfg = cfg

    def check_delete(self) -> None:
        if self.members:
            raise QMPError(f"Cannot delete throttle group '{self.id}' with active references")

    def join(self, member: Any) -> None:
        with self._lock:
            self._ring.append(member)
            self.members += 1

    def leave(self, member: Any) -> None:
        with self._lock:
            self._ring.remove(member)
            self.members -= 1

    async def admit(self, member: Any, is_write: bool, nbytes: int) -> None:
        """Wait until the group's buckets let a request of ``nbytes`` of ``member`` through,
        and it is ``member``'s turn among those waiting; account it."""
        direction = "write" if is_write else "read"
        kinds = [f"{k}-{d}" for k in ("bps", "iops") for d in ("total", direction)]
        waiting = self._waiting[direction]
        queued = False
        try:
            while True:
                with self._lock:
                    delay = self._try(kinds, nbytes, self._turn(member, direction, queued))
                    if delay <= 0:
                        self._last[direction] = member
                        return
                    if not queued:
                        waiting[member] = waiting.get(member, 0) + 1
                        queued = True
                await asyncio.sleep(delay)
        finally:
            if queued:
                with self._lock:
                    waiting[member] -= 1
                    if not waiting[member]:
                        del waiting[member]

    def _turn(self, member: Any, direction: str, queued: bool) -> bool:
        """Whether ``member`` may go now: nobody else waits, or the round-robin after the
        member served last comes to it (a newcomer queues behind the waiters)."""
        waiting = self._waiting[direction]
        if not waiting or (queued and list(waiting) == [member]):
            return True
        if not queued:
            return False
        ring = self._ring
        last = self._last.get(direction)
        start = ring.index(last) + 1 if last in ring else 0
        for i in range(len(ring)):
            candidate = ring[(start + i) % len(ring)]
            if candidate in waiting:
                return candidate is member
        return True

    def _try(self, kinds: list[str], nbytes: int, my_turn: bool) -> float:
        """Leak the buckets; then the seconds to wait, or 0 when the request went (its
        bytes and operations accounted)."""
        now = time.monotonic()
        cfg, delta = self.cfg, now - self._stamp
        self._stamp = now
        for kind in KINDS:
            self._buckets[kind].leak(cfg[kind], cfg[f"{kind}-max"], cfg[f"{kind}-max-length"],
                                     delta)  # fmt: skip
        delay = max(
            self._buckets[k].wait(cfg[k], cfg[f"{k}-max"], cfg[f"{k}-max-length"]) for k in kinds
        )
        if delay > 0:
            return delay
        if not my_turn:
            return POLL
        size = cfg["iops-size"]
        ops = nbytes / size if size and nbytes > size else 1
        for kind in kinds:
            units = nbytes if kind.startswith("bps") else ops
            self._buckets[kind].level += units
            self._buckets[kind].burst_level += units
        return 0.0

    def stop(self) -> None:
        """Nothing to release (object-del, shutdown)."""
