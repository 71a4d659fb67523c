"""Shared fixtures for the io_uring binding tests: skip only when the kernel truly lacks io_uring
(and fail instead under QSD_TEST_REQUIRE_URING=1)."""

from __future__ import annotations

import pytest
from support import skip_or_fail

from qsd_py.uring.ring import check_available


@pytest.fixture(autouse=True)
def _need_uring() -> None:
    reason = check_available()
    if reason is not None:
        skip_or_fail(f"io_uring is unusable: {reason}")
