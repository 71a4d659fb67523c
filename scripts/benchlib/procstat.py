"""Daemon CPU time from /proc, so cost per I/O can be compared across implementations.

The counters of ``/proc/PID/stat`` (utime + stime) cover every thread of the process, live or
exited. The whole process tree is summed so a daemon that spreads work over child processes is
charged for them too. Resolution is one clock tick (10 ms), which is why the sampling window is
seconds long.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, int, int]:
    """Return (ppid, utime, stime) in ticks from the text of a /proc/PID/stat file.

    The command name (field 2) may hold spaces and parentheses, so split after the *last* ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]), int(rest[12])


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and all its live descendants, in seconds."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    if root not in stats:
        return float("nan")
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        _, utime, stime = stats[pid]
        total += utime + stime
        todo.extend(children.get(pid, ()))
    return total / CLK_TCK


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``'s threads alone (children not counted until reaped)."""
    st = _read_stat(pid)
    return float("nan") if st is None else (st[1] + st[2]) / CLK_TCK


@dataclass
class CpuWindow:
    """CPU seconds a daemon spent over a wall-clock window, and the window's length.

    ``main_cpu_s`` is the daemon's first process alone: with qsd-py's queue worker processes,
    what the daemon itself did (its engine answering the requests the workers handed over).
    """

    cpu_s: float = float("nan")
    wall_s: float = float("nan")
    main_cpu_s: float = float("nan")

    @property
    def utilisation(self) -> float:
        """Cores kept busy on average (1.0 = one core at 100%)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def main_utilisation(self) -> float:
        return self.main_cpu_s / self.wall_s if self.wall_s > 0 else float("nan")


class CpuSampler:
    """Samples a daemon's CPU over [start + delay, start + delay + length] in a thread.

    fio's figures cover its time-based window, which starts after the ramp; sampling the same
    stretch (trimmed a little at both ends for fio's own start-up) gives CPU *per second of
    steady load*, which divided by IOPS is CPU per I/O without counting the ramp.
    """

    def __init__(self, pid: int, delay: float, length: float | None) -> None:
        """``length`` None: the window lasts until :meth:`finish` (a run of unknown length,
        such as a whole copy)."""
        self.pid, self.delay, self.length = pid, delay, length
        self.window = CpuWindow()
        self._stop = threading.Event()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        t0, c0, m0 = time.monotonic(), tree_cpu_seconds(self.pid), own_cpu_seconds(self.pid)
        if self.length is None:
            self._stop.wait()
            if self._cancelled:
                return
        elif self._stop.wait(self.length):
            return
        t1, c1, m1 = time.monotonic(), tree_cpu_seconds(self.pid), own_cpu_seconds(self.pid)
        self.window = CpuWindow(c1 - c0, t1 - t0, m1 - m0)

    def finish(self) -> CpuWindow:
        """Wait for the window to close (fio has exited by then) and return it."""
        if self.length is None:
            self._stop.set()
        self._thread.join()
        return self.window

    def cancel(self) -> None:
        self._cancelled = True
        self._stop.set()
        self._thread.join()
