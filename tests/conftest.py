"""Shared fixtures: daemon processes, mount clean-up and the io_uring knob."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from support import REQUIRE_URING, URING_KNOB, Qsd, skip_or_fail, umount_all_under

from qsd_py.block.graph import BlockGraph


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Callable[..., Qsd]]:
    """Start qsd-py daemons in ``tmp_path``: ``qsd(*args)`` returns a ready :class:`Qsd`.

    At the end every daemon is killed and every FUSE mount under tmp_path unmounted.
    """
    started: list[Qsd] = []

    def start(
        *args: str, qmp: bool = True, wait: bool = True, pass_fds: tuple[int, ...] = ()
    ) -> Qsd:
        daemon = Qsd(tmp_path, list(args), qmp=qmp, pass_fds=pass_fds)
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.kill()
        umount_all_under(tmp_path)


@pytest.fixture
def uring_knob() -> Iterator[Path]:
    """FUSE-over-io_uring switched on for the test, restored as found afterwards."""
    if not URING_KNOB.exists():
        skip_or_fail("kernel without FUSE-over-io_uring (no enable_uring parameter)")
    before = URING_KNOB.read_text().strip()
    try:
        URING_KNOB.write_text("Y")
    except OSError as err:
        skip_or_fail(f"cannot turn on {URING_KNOB}: {err}")
    try:
        yield URING_KNOB
    finally:
        URING_KNOB.write_text(before)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--real-qsd",
        action="store_true",
        help="also run the comparisons with QEMU's real qemu-storage-daemon "
        "(needs ../shared/tools/real-qsd set up; never in CI)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``--real-qsd`` the comparisons with QEMU's daemon are deselected, not skipped:
    they need a tool outside the project, not a kernel feature."""
    if config.getoption("--real-qsd"):
        return
    comparisons = [item for item in items if item.get_closest_marker("realqsd")]
    if comparisons:
        config.hook.pytest_deselected(items=comparisons)
        items[:] = [item for item in items if not item.get_closest_marker("realqsd")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With QSD_TEST_REQUIRE_URING=1 (CI) a skipped test counts as failed: the only skips
    left are for a kernel without io_uring or FUSE-over-io_uring."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_URING and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped, but QSD_TEST_REQUIRE_URING=1 forbids skips: {report.longrepr}"


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    """A fresh block graph on the test's loop, closed when the test ends (fds and locks
    released; qcow2 nodes write back what they cache, as blockdev-del does)."""
    g = BlockGraph()
    try:
        yield g
    finally:
        await g.close_all()
