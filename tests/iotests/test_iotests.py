"""Every iotests scenario as a pytest test, so the one test command runs them too.

FUSE scenarios run over both transports (the io_uring run switches the kernel knob on through
the ``uring_knob`` fixture and restores it); a mismatch fails with the runner's unified diff.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check  # noqa: E402 - the runner lives beside this file


def cases() -> list[pytest.param]:
    params = []
    for scenario in check.discover():
        transports = check.TRANSPORTS if scenario.is_fuse else ("fuse",)
        for transport in transports:
            marks = [pytest.mark.uring] if transport == "io_uring" else []
            if "fuse-uring" in scenario.groups:
                marks.append(pytest.mark.uring)
            label = scenario.name if transport == "fuse" else f"{scenario.name}-io_uring"
            params.append(pytest.param(scenario, transport, id=label, marks=marks))
    return params


@pytest.mark.parametrize(("scenario", "transport"), cases())
def test_iotest(scenario: check.Scenario, transport: str, request: pytest.FixtureRequest) -> None:
    if transport == "io_uring" or "fuse-uring" in scenario.groups:
        request.getfixturevalue("uring_knob")  # skips (or fails in CI) without the knob
    result = check.run_scenario(scenario, transport)
    assert result.passed, f"{scenario.name} over {transport} differs:\n{result.diff}"
