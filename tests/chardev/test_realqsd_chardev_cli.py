"""--chardev start-up errors compared with QEMU 11.1's daemon (opt-in: --real-qsd)."""

from __future__ import annotations

import shutil
import uuid

import pytest
from chardev.test_chardev_cli import STARTUP_ERRORS
from realqsd_support import SHARE, run_real

pytestmark = pytest.mark.realqsd


@pytest.mark.parametrize(("arg", "message"), STARTUP_ERRORS)
def test_same_startup_error_as_qemu(arg: str, message: str) -> None:
    work = SHARE / f"chardev-cli-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        arg = arg.replace("{d}", str(work))
        code, err = run_real(["--chardev", arg])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert code == 1
    assert err == f"qemu-storage-daemon: --chardev {arg}: {message}\n"
