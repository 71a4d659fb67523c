"""Helpers of the NBD server tests: a qsd-py daemon serving NBD on a UNIX socket, and the
real clients (libnbd's tools, qemu-img/qemu-io/qemu-nbd) pointed at it. (A module of its
own, not conftest.py: other test folders have a conftest too.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import Qsd

CLIENT_TOOLS = ("nbdinfo", "nbdsh", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libnbd


def require_tools() -> None:
    """The clients are part of the test environment (scripts/test installs them)."""
    missing = [tool for tool in CLIENT_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"NBD client tools missing: {missing} (apt-get install libnbd-bin qemu-utils)")


def uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} failed ({done.returncode}): {done.stderr}")
    return done


def nbdinfo_json(sock: Path, export: str = "", *extra: str) -> dict[str, Any]:
    return json.loads(run("nbdinfo", "--json", *extra, uri(sock, export)).stdout)


def libnbd(script: str, *args: str, timeout: float = 60) -> str:
    """Run ``script`` under Debian's python3 (python3-libnbd lives there); its stdout."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(f"libnbd script failed: {done.stderr}")
    return done.stdout


class NbdDaemon:
    """A qsd-py daemon with its NBD server on ``sock``."""

    def __init__(self, daemon: Qsd, sock: Path) -> None:
        self.daemon = daemon
        self.sock = sock

    def uri(self, export: str = "") -> str:
        return uri(self.sock, export)

    def qmp(self) -> Any:
        return self.daemon.qmp()


MIB = 1 << 20


def data_image(path: Path) -> bytes:
    """A 4 MiB raw image: a pattern in MiB 0 and 3, written zeroes in MiB 1, a hole
    (never written) in MiB 2. Returns its content."""
    data = bytearray(4 * MIB)
    for i in list(range(0, MIB, 4096)) + list(range(3 * MIB, 4 * MIB, 4096)):
        data[i : i + 8] = (i + 1).to_bytes(8, "little")
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
        f.write(data[:MIB])
        f.write(bytes(MIB))
        f.seek(3 * MIB)
        f.write(data[3 * MIB :])
    return bytes(data)
