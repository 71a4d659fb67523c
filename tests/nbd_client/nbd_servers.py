"""NBD servers for the client tests: qemu-nbd (qemu-utils) and nbdkit, over UNIX or TCP,
each a subprocess of the test (the ``nbd_server`` fixture of conftest.py kills them)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NbdServer:
    """One NBD server process; :meth:`restart` brings it back at the same address."""

    def __init__(self, argv: list[str], addr: dict[str, str]) -> None:
        self.argv = argv
        self.addr = addr
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def keyval(self) -> str:
        """The address as ``--blockdev`` keys (``server.type=...``)."""
        return ",".join(f"server.{k}={v}" for k, v in self.addr.items())

    def start(self, wait: bool = True) -> NbdServer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._accepts():
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.argv[0]} does not accept connections")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        if self.addr["type"] == "unix":
            family, where = socket.AF_UNIX, self.addr["path"]
        else:
            family, where = socket.AF_INET, (self.addr["host"], int(self.addr["port"]))
        with socket.socket(family) as sock:
            try:
                sock.connect(where)
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """Gone at once, as a crashed server (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        if self.addr["type"] == "unix":
            Path(self.addr["path"]).unlink(missing_ok=True)

    def restart(self) -> None:
        self.kill()
        self.start()


ServerFactory = Callable[..., NbdServer]


def nbd_opts(server: NbdServer, name: str = "n0", **extra: Any) -> dict[str, Any]:
    """blockdev-add options of an nbd node on ``server``'s export ``disk``."""
    return {"driver": "nbd", "node-name": name, "server": dict(server.addr), "export": "disk",
            **extra}  # fmt: skip
