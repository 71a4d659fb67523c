"""io_uring from pure Python: the ABI (abi.py), rings (ring.py), per-loop rings (aio.py).

Nothing is imported here: a daemon that never uses io_uring never loads those modules, which
keeps start-up short.
"""

from __future__ import annotations

import sys
from typing import Any


def close_loop_ring(loop: Any = None) -> None:
    """Close the running (or given) loop's io_uring ring, if it has one.

    Rings are made by qsd_py.uring.aio; when nothing imported it, no loop has a ring, and
    importing it only to find that out would cost every start-up its import.
    """
    aio = sys.modules.get("qsd_py.uring.aio")
    if aio is not None:
        aio.close_loop_ring(loop)
