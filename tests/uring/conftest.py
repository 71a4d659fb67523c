"""Shared fixtures for the io_uring binding tests: skip only when the kernel truly lacks io_uring
(and fail instead under QSD_TEST_REQUIRE_URING=1)."""

from __future__ import annotations

import os

import pytest

from qsd_py.uring.ring import check_available


@pytest.fixture(autouse=True)
def _need_uring() -> None:
    reason = check_available()
    if reason is None:
        return
    if os.environ.get("QSD_TEST_REQUIRE_URING") == "1":
        pytest.fail(f"io_uring required but unusable: {reason}")
    pytest.skip(reason)
