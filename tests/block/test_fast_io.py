"""The fast path's inline copy (qsd_py/block/fast_io.py, copy_inline, Prefixes)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qsd_py.block.fast_io import PREFIXES_KEPT, Prefixes, copy_inline


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


def test_prefixes_reused_bounded_and_released(tmp_path: Path) -> None:
    """A buffer's iovecs are made once per size and copy through copy_inline; past
    PREFIXES_KEPT sizes the oldest view is released, and release() frees them all, so the
    buffer can be released after."""
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 64)
    store = bytearray(16384)
    base = memoryview(store)
    prefixes = Prefixes(base)
    first = prefixes[4096]
    assert prefixes[4096] is first and first[0].nbytes == 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        assert copy_inline(fd, base, 4096, 256, False, prefixes[4096]) == 4096
    finally:
        os.close(fd)
    assert bytes(base[:256]) == bytes(range(256))
    for size in range(1, PREFIXES_KEPT + 1):
        prefixes[size]
    assert len(prefixes) == PREFIXES_KEPT and 4096 not in prefixes
    with pytest.raises(ValueError):
        first[0].tobytes()  # released when it was dropped
    base.release()
    with pytest.raises(BufferError):
        store.append(0)  # the views kept still hold the bytes
    prefixes.release()
    assert not prefixes
    store.append(0)  # no view of them is left
