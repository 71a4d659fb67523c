"""Compare command-line error texts with QEMU's real qemu-storage-daemon (optional)."""

from __future__ import annotations

import subprocess

import pytest
from realqsd_support import require_real_qsd, run_real
from support import run_qsd
from test_options import CLI_ERRORS

pytestmark = pytest.mark.realqsd


@pytest.mark.parametrize(("argv", "message"), CLI_ERRORS)
def test_same_error_as_qemu(argv: list[str], message: str) -> None:
    code, err = run_real(argv)
    lines = [
        line
        for line in err.splitlines()
        if "warning: short-form boolean" not in line and not line.startswith("Please use")
    ]
    assert code == 1
    assert "\n".join(lines) == f"qemu-storage-daemon: {message}"


def _real_stdout(argv: list[str]) -> str:
    tool = require_real_qsd()
    done = subprocess.run([str(tool), "run", "qemu-storage-daemon", *argv],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    return done.stdout


@pytest.mark.parametrize(
    "kind",
    ["iothread", "authz-list", "authz-simple", "secret", "secret_keyring", "throttle-group",
     "tls-creds-anon", "tls-creds-psk", "tls-creds-x509"],
)  # fmt: skip
def test_object_help_is_qemus(kind: str) -> None:
    """``--object KIND,help`` prints what QEMU 11.1 prints, line for line."""
    ours = run_qsd(["--object", f"{kind},help"])
    assert ours.stdout == _real_stdout(["--object", f"{kind},help"])
