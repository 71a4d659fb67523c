"""Finding and running QEMU's real qemu-storage-daemon (``../shared/tools/real-qsd``).

The comparison tests (marker ``realqsd``) run only when asked for with ``--real-qsd``
(``scripts/test --real-qsd``); otherwise they are not collected, so CI, which never has QEMU,
neither runs nor skips them. Asked for without the tool set up, they fail and say so.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

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
