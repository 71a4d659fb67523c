"""Undo everything the benchmark set up, in reverse order, whatever happens.

A benchmark that dies mid-run must not leave FUSE mounts, daemons, tmpfs images or a changed
kernel knob behind: every step registers its undo here, and the undo stack runs on normal exit,
on an exception, on Ctrl-C and on SIGTERM/SIGHUP (turned into KeyboardInterrupt so ``finally``
blocks run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

URING_KNOB = Path("/sys/module/fuse/parameters/enable_uring")


class Janitor:
    """A stack of undo callbacks; ``close()`` runs them all, even if some fail."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __enter__(self) -> Janitor:
        # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Undo, on leaving the block, only what was pushed inside it (e.g. one backend)."""
        depth = len(self._undo)
        try:
            yield
        finally:
            self.unwind(depth)

    def close(self) -> None:
        self.unwind(0)

    def unwind(self, depth: int) -> None:
        # A second Ctrl-C must not abort the clean-up half-way.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while len(self._undo) > depth:
                what, undo = self._undo.pop()
                try:
                    undo()
                except Exception as exc:  # keep going: the rest must still be undone
                    print(f"bench: cleanup of {what} failed: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def is_mounted(path: str) -> bool:
    """Whether ``path`` is a mount point in our namespace (the chroot shares it)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if _unescape(line.split()[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def lazy_umount(path: str) -> None:
    """Detach a (possibly dead) mount; harmless when nothing is mounted there."""
    while is_mounted(path):
        if subprocess.run(["umount", "-l", path], capture_output=True).returncode != 0:
            break


def set_uring_knob(janitor: Janitor) -> str:
    """Turn FUSE-over-io_uring on, registering the restore of the old value; returns it."""
    old = URING_KNOB.read_text().strip()
    if old != "Y":
        URING_KNOB.write_text("Y\n")
        janitor.push("enable_uring", lambda: URING_KNOB.write_text(old + "\n"))
    return old
