"""Compare QMP argument errors with QEMU's real qemu-storage-daemon (optional)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from realqsd_support import SHARE, require_real_qsd
from test_validation import QMP_ERRORS

pytestmark = pytest.mark.realqsd


class RealMonitor:
    """A minimal QMP client for the comparison (one command at a time)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())  # greeting
        self.execute("qmp_capabilities", None)

    def execute(self, name: str, args: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = json.loads(self.reader.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture(scope="module")
def real_monitor() -> Iterator[RealMonitor]:
    tool = require_real_qsd()
    SHARE.mkdir(exist_ok=True)
    path = SHARE / f"qmp-{uuid.uuid4().hex[:8]}.sock"
    proc = subprocess.Popen(
        [
            str(tool), "run", "qemu-storage-daemon",
            "--chardev", f"socket,id=m,path={path},server=on,wait=off",
            "--monitor", "chardev=m",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("the real daemon did not come up")
            time.sleep(0.05)
        monitor = RealMonitor(str(path))
        yield monitor
        monitor.close()
    finally:
        proc.terminate()
        proc.wait(10)
        if path.exists():
            os.unlink(path)


@pytest.mark.parametrize(("command", "args", "desc"), QMP_ERRORS)
def test_same_error_as_qemu(real_monitor: RealMonitor, command: str, args: Any, desc: str) -> None:
    reply = real_monitor.execute(command, args)
    assert reply.get("error", {}).get("desc") == desc
