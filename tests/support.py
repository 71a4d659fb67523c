"""Test support: run qsd-py as a subprocess, as users do, and clean up after it.

The daemon is never run inside the test process: file I/O on a FUSE mount from the loop
that serves it deadlocks, and a crash must not take the test runner with it. Whatever a
daemon mounted is lazily unmounted when its test ends, even on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
URING_KNOB = Path("/sys/module/fuse/parameters/enable_uring")
REQUIRE_URING = os.environ.get("QSD_TEST_REQUIRE_URING") == "1"


def fuse_mounts_under(prefix: str | Path) -> list[str]:
    """Mount points of FUSE file systems at or below ``prefix`` (from /proc/self/mountinfo)."""
    prefix = str(prefix)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mnt, fstype = fields[4], fields[sep + 1]
            mnt = mnt.encode().decode("unicode_escape")
            if fstype.startswith("fuse") and (mnt == prefix or mnt.startswith(prefix + "/")):
                found.append(mnt)
    return found


def umount_all_under(prefix: str | Path) -> list[str]:
    """Lazily unmount every FUSE mount below ``prefix``; returns what was unmounted."""
    mounts = fuse_mounts_under(prefix)
    for mnt in reversed(mounts):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    return mounts


def skip_or_fail(reason: str) -> None:
    """Skip for a kernel that truly lacks a feature; fail instead when CI requires it."""
    if REQUIRE_URING:
        pytest.fail(f"QSD_TEST_REQUIRE_URING=1 but: {reason}")
    pytest.skip(reason)


class Qsd:
    """One qsd-py daemon process with a QMP socket and a pidfile in ``workdir``."""

    def __init__(
        self, workdir: Path, args: list[str], qmp: bool = True, pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.workdir = workdir
        self.qmp_path = workdir / "qmp.sock"
        self.pidfile = workdir / "qsd.pid"
        argv = [sys.executable, "-m", "qsd_py", *args]
        if qmp:
            argv += [
                "--chardev",
                f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "--monitor",
                "chardev=qmp0",
            ]
        argv += ["--pidfile", str(self.pidfile)]
        self.argv = argv
        for stale in (self.pidfile, self.qmp_path):
            stale.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait for the pidfile; raise with the daemon's stderr if it exits first."""
        deadline = time.monotonic() + timeout
        while not self.pidfile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qsd-py exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError("qsd-py did not write its pidfile")
            time.sleep(0.005)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""

    def qmp(self) -> Any:
        """A connected, negotiated legacy QMP client (qemu.qmp.legacy)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        client = QEMUMonitorProtocol(str(self.qmp_path))
        client.connect()
        return client

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def run_qsd(args: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run qsd-py to completion (for CLI error tests)."""
    return subprocess.run(
        [sys.executable, "-m", "qsd_py", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def raw_image(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A 1 MiB raw image of 0xa5 bytes under ``tmp_path``, an empty file to mount on, and
    the daemon arguments for nodes ``f0`` (file) and ``d0`` (raw) over the image."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xa5" * (1 << 20))
    mnt = tmp_path / "disk.raw"
    mnt.touch()
    args = [
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
    ]  # fmt: skip
    return image, mnt, args


def extent(status: Any) -> tuple[bool, int]:
    """A block status as ``(is_data, length)``: what SEEK_DATA/SEEK_HOLE see of it."""
    return status.is_data, status.length
