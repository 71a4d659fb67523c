"""Fixtures for the end-to-end tests of qcow2 exports: daemons run as subprocesses, over both
FUSE transports, killed and unmounted at the end of every test whatever happened."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qcow2_export_support import ExportDaemon
from support import fuse_mounts_under, skip_or_fail, umount_all_under


@pytest.fixture(params=["dev-fuse", "io_uring"])
def transport(request: pytest.FixtureRequest) -> str:
    """The FUSE transport of the test's exports. io_uring needs the kernel's knob, which
    the session sets (never touched here): without it the test skips, or fails under
    QSD_TEST_REQUIRE_URING=1."""
    if request.param == "io_uring":
        from qsd_py.export.fuse.uring_checks import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            skip_or_fail(reason)
    return request.param


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("qemu-img", "qemu-io", "fio"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (apt-get install qemu-utils fio)")


@pytest.fixture
def export(tmp_path: Path, transport: str) -> Iterator[Callable[..., ExportDaemon]]:
    """``export(image, **opts)``: a started :class:`ExportDaemon` serving ``image`` at
    tmp_path/mnt over ``transport``. Whatever still runs at the end is killed, and every
    FUSE mount under tmp_path is lazily unmounted."""
    daemons: list[ExportDaemon] = []

    def start(image: Path, *, mnt: str = "mnt", **opts: str) -> ExportDaemon:
        workdir = tmp_path / f"d{len(daemons)}"
        workdir.mkdir()
        daemon = ExportDaemon(workdir, image, tmp_path / mnt, transport, **opts)
        daemons.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.kill()
        umount_all_under(tmp_path)
        assert not fuse_mounts_under(tmp_path)
