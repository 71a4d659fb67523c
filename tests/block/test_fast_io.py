"""The fast path's inline copy (qsd_py/block/fast_io.py, copy_inline)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from qsd_py.block.fast_io import copy_inline


def test_copy_inline_short_read_and_failed_write(tmp_path: Path) -> None:
    """The fast path's inline copy: a read that meets EOF answers its whole size, the part
    past EOF zeroes (as the node's read); a write the fd refuses is its ``-errno``."""
    path = tmp_path / "short"
    path.write_bytes(b"\x11" * 1000)
    buf = memoryview(bytearray(b"\xff" * 8192))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert copy_inline(fd, buf, 4096, 0, False) == 4096
        assert bytes(buf[:1000]) == b"\x11" * 1000 and bytes(buf[1000:4096]) == bytes(3096)
        assert bytes(buf[4096:]) == b"\xff" * 4096  # nothing past the request
        assert copy_inline(fd, buf, 4096, 0, True) == -errno.EBADF
    finally:
        os.close(fd)
