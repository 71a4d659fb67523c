"""Encrypted images made by the host's qemu-img (Debian's QEMU 7.2), for the tests to open."""

from __future__ import annotations

import subprocess
from pathlib import Path


def create_encrypted(path: Path, fmt: str, secret: str, opts: str, size: int | str) -> None:
    """``qemu-img create -f FMT --object SECRET -o OPTS PATH SIZE``, tried again while it
    fails its PBKDF2 timing: qemu-img 7.2 times the hash with the thread's CPU clock, which
    moves in ticks here, so a fast hash (sha1) measures 0 ms and fails "Unable to get
    accurate CPU usage" in about 14 of 20 tries, on a quiet machine too. A try that fails
    so costs milliseconds; any other failure is the test's."""
    made = None
    for _attempt in range(60):
        made = subprocess.run(
            ["qemu-img", "create", "-q", "-f", fmt, "--object", secret, "-o", opts,
             str(path), str(size)],
            capture_output=True, text=True,
        )  # fmt: skip
        if made.returncode == 0:
            return
        assert "accurate CPU usage" in made.stderr, made.stderr
    assert made is not None
    raise AssertionError(made.stderr)
