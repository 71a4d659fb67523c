"""The unprivileged mount path: fusermount3 mounts and passes the /dev/fuse fd back.

The daemon takes this path when it is not root. These tests run as root, so they make the
mount layer take it anyway; fusermount3 (setuid root, from Debian's fuse3) works the same for
root, and the kernel, the fd passing and the unmount are all real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import fuse_mounts_under

from qsd_py.export.fuse import mount as fmount


@pytest.fixture
def unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the mount layer behave as for a daemon without root."""
    monkeypatch.setattr(fmount, "privileged", lambda: False)


def test_export_served_through_fusermount3(unprivileged, mounted, tmp_path: Path) -> None:
    node, mnt, exp = mounted(1 << 20, writable=True)
    assert exp.mounted is not None and not exp.mounted.privileged
    (line,) = [m for m in open("/proc/self/mountinfo") if f" {mnt} " in m]
    assert " fuse " in line and "default_permissions" in line and "max_read=1048576" in line
    data = os.urandom(8192)
    with open(mnt, "r+b", buffering=0) as f:
        f.seek(4096)
        f.write(data)
        f.seek(4096)
        assert f.read(8192) == data
    assert bytes(node.data[4096 : 4096 + 8192]) == data
    assert os.stat(mnt).st_size == 1 << 20


def test_read_only_export_mounted_ro(unprivileged, mounted) -> None:
    _node, mnt, _exp = mounted(1 << 20, writable=False)
    (line,) = [m for m in open("/proc/self/mountinfo") if f" {mnt} " in m]
    assert line.split()[5].startswith("ro")
    with pytest.raises(OSError):
        open(mnt, "r+b").close()


def test_delete_unmounts_with_fusermount3(unprivileged, server, mounted, tmp_path: Path) -> None:
    _node, mnt, exp = mounted(1 << 20, writable=True)
    assert fuse_mounts_under(tmp_path) == [str(mnt)]
    server.delete(exp, "safe")
    assert fuse_mounts_under(tmp_path) == []


def test_missing_fusermount3_is_a_clear_error(
    unprivileged, server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memnode import MemNode

    from qsd_py.errors import QMPError

    monkeypatch.setenv("PATH", str(tmp_path))  # no fusermount3 to be found
    mnt = tmp_path / "mnt"
    mnt.touch()
    with pytest.raises(QMPError, match="fusermount3 not found"):
        server.export(MemNode(1 << 20), mnt)
    assert fuse_mounts_under(tmp_path) == []
