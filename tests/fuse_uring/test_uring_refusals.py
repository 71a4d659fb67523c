"""When io_uring cannot be had, block-export-add fails clearly and leaves nothing behind:
no mount, no node user, no silent /dev/fuse export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import URING_KNOB, fuse_mounts_under, skip_or_fail
from uring_support import UringServer

from qsd_py.errors import QMPError


@pytest.fixture
def knob_off() -> Iterator[str]:
    """enable_uring switched to N for the test; restored as found (and checked) afterwards."""
    if not URING_KNOB.exists():
        skip_or_fail("kernel without FUSE-over-io_uring (no enable_uring parameter)")
    before = URING_KNOB.read_text().strip()
    URING_KNOB.write_text("N")
    try:
        yield before
    finally:
        URING_KNOB.write_text(before)
        assert URING_KNOB.read_text().strip() == before


@pytest.fixture
def host(tmp_path: Path) -> Iterator[UringServer]:
    srv = UringServer(tmp_path)
    try:
        yield srv
    finally:
        srv.close()


def _refused(host: UringServer, tmp_path: Path, **opts) -> str:
    node = host.node(host.image(1 << 20))
    with pytest.raises(QMPError) as err:
        host.export(node, tmp_path / "mnt", writable=True, **opts)
    assert not fuse_mounts_under(tmp_path)
    assert not host.exports
    assert not node.users  # the export gave the node back
    return err.value.desc


def test_knob_off_refuses_with_the_fix(knob_off, host: UringServer, tmp_path: Path):
    desc = _refused(host, tmp_path, io_uring=True)
    assert "not enabled" in desc
    assert "echo Y > /sys/module/fuse/parameters/enable_uring" in desc


def test_knob_off_io_uring_spelling(knob_off, host: UringServer, tmp_path: Path):
    assert "enable_uring" in _refused(host, tmp_path, **{"io-uring": True})


def test_knob_off_dev_fuse_still_works(knob_off, host: UringServer, tmp_path: Path):
    exp = host.export(host.node(host.image(1 << 20)), tmp_path / "mnt", writable=True)
    assert exp.stats()["transport"] == "dev-fuse"
    assert (tmp_path / "mnt").stat().st_size == 1 << 20


@pytest.mark.parametrize("depth", [0, -1, 1025])
def test_bad_queue_depth(uring_knob, host: UringServer, tmp_path: Path, depth: int):
    desc = _refused(host, tmp_path, io_uring=True, **{"queue-depth": depth})
    assert desc == "Parameter 'queue-depth' expects a value between 1 and 1024"


def test_queue_depth_needs_io_uring(host: UringServer, tmp_path: Path):
    desc = _refused(host, tmp_path, **{"queue-depth": 8})
    assert desc == "queue-depth is only valid with io_uring=on"


def test_knob_on_after_refusal_works(uring_knob, host: UringServer, tmp_path: Path):
    """A refusal leaves the mountpoint reusable: the same path then exports fine."""
    URING_KNOB.write_text("N")
    _refused(host, tmp_path, io_uring=True)
    URING_KNOB.write_text("Y")
    exp = host.export(host.node(host.image(1 << 20)), tmp_path / "mnt", io_uring=True)
    assert exp.stats()["transport"] == "io_uring"
    assert (tmp_path / "mnt").stat().st_size == 1 << 20
