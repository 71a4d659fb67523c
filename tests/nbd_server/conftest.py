"""Fixtures of the NBD server tests (helpers in nbd_support.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from nbd_support import NbdDaemon, require_tools
from support import Qsd


@pytest.fixture
def nbd_daemon(qsd: Callable[..., Qsd], tmp_path: Path) -> Callable[..., NbdDaemon]:
    """``nbd_daemon(*args, server_opts="")``: qsd-py with ``--nbd-server`` on a UNIX socket
    in tmp_path and the given options (blockdevs, exports)."""
    require_tools()

    def start(*args: str, server_opts: str = "") -> NbdDaemon:
        sock = tmp_path / "nbd.sock"
        server = f"addr.type=unix,addr.path={sock}{server_opts}"
        daemon = qsd("--nbd-server", server, *args)
        return NbdDaemon(daemon, sock)

    return start
