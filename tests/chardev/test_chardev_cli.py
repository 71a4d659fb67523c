"""--chardev with the backends other than socket: null, ringbuf/memory, file, pty."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Qsd

#: (--chardev argument, QEMU 11.1's error); {d} is a scratch directory
STARTUP_ERRORS = [
    ("ringbuf,id=r,size=3", "size of ringbuf chardev must be power of two"),
    (
        "ringbuf,id=r,logfile=/nonexist/l",
        "Could not create '/nonexist/l': No such file or directory",
    ),
    ("file,id=f", "chardev: file: no filename given"),
    ("file,id=f,path=/nonexist/x", "Could not open '/nonexist/x': No such file or directory"),
    (
        "file,id=f,path={d}/o,input-path=/nonexist/i",
        "Could not open '/nonexist/i': No such file or directory",
    ),
    ("vc,id=v", "'vc' is not a valid char driver name"),
    ("null,id=n,foo=1", "Invalid parameter 'foo'"),
]


@pytest.mark.parametrize(("arg", "message"), STARTUP_ERRORS)
def test_startup_error(tmp_path: Path, arg: str, message: str) -> None:
    arg = arg.replace("{d}", str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "qsd_py", "--chardev", arg],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr == f"qsd-py: --chardev {arg}: {message}\n"


def test_cli_chardevs_work(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    daemon = qsd(
        "--chardev", "ringbuf,id=r,size=8",
        "--chardev", "memory,id=m",
        "--chardev", f"file,id=f,path={out},append=on",
        "--chardev", "null,id=n",
        "--chardev", "pty,id=p",
    )  # fmt: skip
    qmp = daemon.qmp()
    try:
        listed = {c["label"]: c["filename"] for c in qmp.cmd("query-chardev")}
        assert listed["r"] == "ringbuf" and listed["m"] == "memory"
        assert listed["f"] == "file" and listed["n"] == "null"
        assert listed["p"].startswith("pty:/dev/pts/")
        qmp.cmd("ringbuf-write", device="r", data="0123456789")
        assert qmp.cmd("ringbuf-read", device="r", size=100) == "23456789"
        assert out.read_bytes() == b"old"  # append=on
    finally:
        qmp.close()
    assert daemon.stop() == 0
    assert f"char device redirected to {listed['p'][4:]} (label p)\n" in daemon.proc.stderr.read()
