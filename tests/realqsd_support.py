"""Finding and running QEMU's real qemu-storage-daemon (``../shared/tools/real-qsd``).

The comparison tests (marker ``realqsd``) run only when asked for with ``--real-qsd``
(``scripts/test --real-qsd``); otherwise they are not collected, so CI, which never has QEMU,
neither runs nor skips them. Asked for without the tool set up, they fail and say so.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [Path("/work/shared/tools/real-qsd"), REPO.parent / "shared/tools/real-qsd"]
SHARE = Path("/tmp/qsd-cmp")  # bind-mounted into the chroot at the same path


@functools.cache
def real_qsd() -> Path | None:
    """The real-qsd tool if it exists and its chroot runs qemu-storage-daemon."""
    for tool in CANDIDATES:
        if not tool.exists():
            continue
        try:
            done = subprocess.run(
                [str(tool), "run", "qemu-storage-daemon", "--version"],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return tool
    return None


def require_real_qsd() -> Path:
    tool = real_qsd()
    if tool is None:
        pytest.fail(
            "--real-qsd was given but real-qsd (QEMU's qemu-storage-daemon in a chroot) is not "
            "set up: run ../shared/tools/real-qsd setup"
        )
    return tool


def run_real(argv: list[str], timeout: float = 10) -> tuple[int | None, str]:
    """Run the real daemon with ``argv``; return (exit code or None if it kept running, stderr)."""
    tool = require_real_qsd()
    proc = subprocess.Popen(
        [str(tool), "run", "qemu-storage-daemon", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate()
        return None, err


@contextlib.contextmanager
def real_daemon(args: list[str], qmp: Path, timeout: float = 30) -> Iterator[subprocess.Popen]:
    """QEMU's daemon with ``args`` and a QMP monitor on the socket ``qmp`` (a path under
    :data:`SHARE`, which the chroot sees at the same place): yielded once the socket is
    there, terminated on the way out."""
    tool = require_real_qsd()
    monitor = ["--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
               "--monitor", "chardev=qmp0"]  # fmt: skip
    proc = subprocess.Popen(
        [str(tool), "run", "qemu-storage-daemon", *args, *monitor],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not qmp.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the real daemon did not come up")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        qmp.unlink(missing_ok=True)


def real_named_nodes(args: list[str], share: Path) -> list[dict[str, Any]]:
    """query-named-block-nodes of QEMU's daemon started with ``args`` (e.g. --blockdev)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = share / "real-qmp.sock"
    with real_daemon(args, qmp):
        client = QEMUMonitorProtocol(str(qmp))
        client.connect()
        try:
            return client.cmd("query-named-block-nodes")
        finally:
            client.close()


@contextlib.contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under :data:`SHARE` (both daemons see it), removed afterwards."""
    import shutil
    import uuid

    path = SHARE / f"{prefix}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        _unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)


def _unmount_under(path: Path) -> None:
    """Lazily unmount what a daemon left mounted under ``path`` (a test that failed before
    stopping it): the host's view, and the chroot's, where QEMU's daemon mounted it."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in reversed(points):  # innermost first
        if point.startswith(str(path) + "/") or f"{path}/" in point:
            subprocess.run(["umount", "-l", point], capture_output=True)
