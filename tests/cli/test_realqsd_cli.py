"""Compare command-line error texts with QEMU's real qemu-storage-daemon (optional)."""

from __future__ import annotations

import pytest
from realqsd_support import run_real
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
