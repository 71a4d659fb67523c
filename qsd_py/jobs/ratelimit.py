"""A speed limit measured over time slices, as QEMU's block jobs keep it.

A job reports the bytes it moved; once a slice's quota is used up, the job sleeps until the
time those bytes are worth at the limit has passed, and a new slice starts. The limit thus
holds over seconds whatever the size of single requests (a request larger than a slice's
quota makes the job sleep several slices).
"""

from __future__ import annotations

import time

SLICE_S = 0.1  # QEMU's BLOCK_JOB_SLICE_TIME: 100 ms


class RateLimit:
    """Bytes per second over slices of ``SLICE_S``; a speed of 0 means no limit."""

    def __init__(self, speed: int = 0, clock=time.monotonic) -> None:
        self._clock = clock
        self.speed = 0
        self._quota = 0.0
        self._start = self._end = 0.0
        self._done = 0
        self.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        self.speed = speed
        self._quota = speed * SLICE_S

    def delay(self, nbytes: int) -> float:
        """Account ``nbytes``; the seconds to wait before moving more (0: go on)."""
        if not self._quota:
            return 0.0
        now = self._clock()
        if self._end < now:  # the last slice (perhaps stretched) is over: a fresh one
            self._start, self._end, self._done = now, now + SLICE_S, 0
        self._done += nbytes
        if self._done < self._quota:
            return 0.0
        # Over quota: stretch the slice to the time these bytes take at the limit.
        self._end = self._start + self._done / self._quota * SLICE_S
        return self._end - now
