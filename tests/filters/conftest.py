"""Fixtures of the filter tests: qsd-py with an NBD server and a raw QMP client."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbd_server.qmp_talk import Talk
from support import Qsd


@pytest.fixture
def served(qsd: Callable[..., Qsd], tmp_path: Path) -> Iterator[tuple[Talk, Path]]:
    """qsd-py serving NBD on a UNIX socket in tmp_path: its QMP client and the socket."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} (Debian's qemu-utils) is needed by the filter tests")
    sock = tmp_path / "nbd.sock"
    daemon = qsd("--nbd-server", f"addr.type=unix,addr.path={sock}")
    talk = Talk(str(daemon.qmp_path))
    try:
        yield talk, sock
    finally:
        talk.close()
