"""What FUSE-over-io_uring asks of the kernel and of the export's options, checked before
and while the transport starts, and the errors that say what to fix.

Kept apart from the transport (uring.py) so that refusing an export needs none of it: the
checks run before mounting, and a refused export leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.export.fuse import proto as p
from qsd_py.uring.aio import uring_unavailable_reason

if TYPE_CHECKING:
    from qsd_py.export.fuse.engine import FuseEngine

ENABLE_URING_KNOB = "/sys/module/fuse/parameters/enable_uring"
DEFAULT_QUEUE_DEPTH = 64
MAX_QUEUE_DEPTH = 1024


def possible_cpus() -> int:
    """The kernel's queue count: one per *possible* CPU (qid 0..n-1)."""
    return max(1, os.sysconf("SC_NPROCESSORS_CONF"))


def unavailable_reason() -> str | None:
    """Why FUSE-over-io_uring cannot work here (cause and fix), or None. Checked before
    mounting so a refused export leaves nothing behind."""
    try:
        with open(ENABLE_URING_KNOB) as f:
            knob = f.read().strip()
    except FileNotFoundError:
        return (
            "FUSE-over-io_uring is not supported by this kernel (no "
            f"{ENABLE_URING_KNOB}): it needs Linux 6.14 or later built with "
            "CONFIG_FUSE_IO_URING; export without io_uring"
        )
    except OSError as err:
        return f"cannot read {ENABLE_URING_KNOB}: {err.strerror}"
    if knob not in ("Y", "1"):
        return (
            "FUSE-over-io_uring is not enabled in the kernel "
            f"({ENABLE_URING_KNOB} is {knob}): run 'echo Y > {ENABLE_URING_KNOB}' "
            "as root, or export without io_uring"
        )
    return uring_unavailable_reason()


def check_negotiated(engine: FuseEngine) -> None:
    """After ``engine.init(want=OVER_IO_URING)``: refuse (before the INIT reply is written)
    when the kernel did not grant the flag; never fall back to /dev/fuse silently."""
    if not engine.flags & p.OVER_IO_URING:
        raise QMPError(
            "FUSE-over-io_uring was not offered by the kernel in FUSE_INIT (is "
            f"{ENABLE_URING_KNOB} Y? run 'echo Y > {ENABLE_URING_KNOB}' as root), "
            "or export without io_uring"
        )


def queue_depth(opts: dict[str, Any]) -> int:
    """``queue-depth`` with its default, range-checked."""
    depth = opts.get("queue-depth", DEFAULT_QUEUE_DEPTH)
    if not 1 <= depth <= MAX_QUEUE_DEPTH:
        raise QMPError(f"Parameter 'queue-depth' expects a value between 1 and {MAX_QUEUE_DEPTH}")
    return depth


def register_failure(qid: int, err: int) -> str:
    """The error of a refused REGISTER (``err``: the errno)."""
    hint = f" (is {ENABLE_URING_KNOB} still Y?)" if err == errno.EOPNOTSUPP else ""
    return f"FUSE-over-io_uring: registering queue {qid} failed: {os.strerror(err)}{hint}"
