"""Fixtures for FUSE-over-io_uring tests (see uring_support.py for the export host).

Every mount made here is lazily unmounted at the end, even on failure, and the io_uring knob
is restored as it was found (the ``uring_knob`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import fuse_mounts_under, umount_all_under
from uring_support import UringServer


@pytest.fixture
def userver(tmp_path: Path, uring_knob: Path) -> Iterator[UringServer]:
    """An export host with FUSE-over-io_uring switched on (restored afterwards)."""
    srv = UringServer(tmp_path)
    try:
        yield srv
    finally:
        srv.close()
        umount_all_under(tmp_path)
        assert not fuse_mounts_under(tmp_path)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)``: a tmpfs of its own under tmp_path (a test may fill it up), mounted on
    demand and lazily unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str = "64M") -> Path:
        path = tmp_path / f"shm{len(mounted)}"
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
