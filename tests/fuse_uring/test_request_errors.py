"""A FUSE request whose fast path raises (a bug) gets EIO, over /dev/fuse and over io_uring,
and the export goes on serving: the reader sees an error, never a request the kernel waits
on forever. The bug is injected by the test helper fault_export.py (reads and writes at
offset 0 raise while they are decided)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import umount_all_under

SIZE = 4 << 20


def _serve(tmp_path: Path, transport: str, image: bytes) -> tuple[subprocess.Popen[str], Path]:
    img = tmp_path / "img.raw"
    img.write_bytes(image)
    mnt, ready = tmp_path / "mnt", tmp_path / "ready"
    mnt.touch()
    helper = Path(__file__).with_name("fault_export.py")
    proc = subprocess.Popen(
        [sys.executable, str(helper), str(img), str(mnt), str(ready), transport],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the export never came up"
        time.sleep(0.02)
    return proc, mnt


#: What a client does, in a process of its own (a request left unanswered would hang it: it
#: is killed by the timeout instead): reads and writes at 0 (the bug) and beside it.
CLIENT = """
import errno, json, mmap, os, sys
path = sys.argv[1]
buf = mmap.mmap(-1, 4096)
def op(write, offset):
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        if write:
            buf[:] = bytes([0x5A]) * 4096
            return os.pwritev(fd, [buf], offset)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n]).hex()
    except OSError as err:
        return errno.errorcode[err.errno]
    finally:
        os.close(fd)
print(json.dumps([op(False, 0), op(False, 4096), op(True, 0), op(True, 8192), op(False, 8192)]))
"""


def _client(server: subprocess.Popen[str], mnt: Path) -> str:
    """Run CLIENT; its output. A request left unanswered fails the test: the server is
    killed (its workers die with it), which ends the FUSE connection and frees the client
    (a request the kernel already handed over cannot be given up otherwise)."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = client.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        client.kill()
        client.communicate()
        pytest.fail("a FUSE request was never answered")
    assert client.returncode == 0, err
    return out


@pytest.mark.parametrize("transport", ["devfuse", "uring"])
def test_a_fast_request_that_raises_gets_eio(
    request: pytest.FixtureRequest, tmp_path: Path, transport: str
) -> None:
    if transport == "uring":
        request.getfixturevalue("uring_knob")
    image = random.Random(2).randbytes(SIZE)
    proc, mnt = _serve(tmp_path, transport, image)
    try:
        out = _client(proc, mnt)
        assert json.loads(out) == [
            "EIO",
            image[4096:8192].hex(),
            "EIO",
            4096,
            (b"\x5a" * 4096).hex(),
        ]
        proc.terminate()
        assert proc.wait(20) == 0, proc.communicate()[1]
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        umount_all_under(tmp_path)
    assert "fast-path request" in err and "a fast-path bug (test)" in err
    assert (tmp_path / "img.raw").read_bytes()[:4096] == image[:4096]  # the failed write
    assert os.path.getsize(tmp_path / "img.raw") == SIZE
