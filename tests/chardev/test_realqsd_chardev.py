"""The chardev conversation held with QEMU 11.1's qemu-storage-daemon (opt-in: --real-qsd):
the replies conversation.py expects, and so qsd-py gives, are QEMU's."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest
from chardev.conversation import STEPS, expected, fill, normalize
from nbd_server.qmp_talk import Talk
from realqsd_support import SHARE, require_real_qsd

pytestmark = pytest.mark.realqsd


def test_conversation_with_qemu() -> None:
    tool = require_real_qsd()
    work = SHARE / f"chardev-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    qmp = work / "qmp.sock"
    proc = subprocess.Popen(
        [
            str(tool), "run", "qemu-storage-daemon",
            "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not qmp.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no real daemon"
            time.sleep(0.05)
        client = Talk(str(qmp))
        d = str(work)
        for (name, args), reply in STEPS:
            got = normalize(client.command(name, fill(args, d))["reply"], str(qmp))
            assert got == expected(reply, d), (name, args)
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
