"""Fixtures of the NBD client tests: servers, killed at the end even after a failure (the
block graph fixture is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_servers import NbdServer, ServerFactory, free_port


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """``nbd_server(kind, *args, transport="unix", export="disk")``: a running server
    (its UNIX socket in ``sock_dir`` if given, else in tmp_path).

    ``kind`` is ``qemu-nbd`` (``args``: the image, then qemu-nbd options) or ``nbdkit``
    (``args``: filters, plugin and its parameters, as on nbdkit's command line)."""
    started: list[NbdServer] = []

    def make(kind: str, *args: str, transport: str = "unix", export: str = "disk",
             wait: bool = True, sock_dir: Path | None = None) -> NbdServer:  # fmt: skip
        if transport == "unix":
            path = str((sock_dir or tmp_path) / f"nbd{len(started)}.sock")
            addr = {"type": "unix", "path": path}
        else:
            addr = {"type": "inet", "host": "127.0.0.1", "port": str(free_port())}
        if kind == "qemu-nbd":
            image, *opts = args
            where = (["--socket", addr["path"]] if transport == "unix"
                     else ["--bind", addr["host"], "--port", addr["port"]])  # fmt: skip
            argv = ["qemu-nbd", "--persistent", "--shared=0", "-f", "raw", "-x", export,
                    *where, *opts, image]  # fmt: skip
        else:
            where = (["--unix", addr["path"]] if transport == "unix"
                     else ["--ipaddr", addr["host"], "--port", addr["port"]])  # fmt: skip
            argv = ["nbdkit", "--foreground", "--exit-with-parent", *where, *args]
        server = NbdServer(argv, addr)
        started.append(server)
        return server.start(wait)

    try:
        yield make
    finally:
        for server in started:
            server.kill()
