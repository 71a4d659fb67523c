"""A cluster that stops answering (its OSD stopped with SIGSTOP): requests to the RBD node
fail within ``rados osd op timeout`` instead of hanging, the daemon keeps serving its other
exports meanwhile, and the image works again once the OSD continues. The OSD is always
continued, so the session's cluster is whole for the tests after this one.

QEMU 11.1's daemon, measured the same way (FUSE export, cache.direct=on, op timeout 3 s):
the read fails after 3.0 s with ETIMEDOUT (librbd's error, passed through, not EIO) and
stderr gets ``rbd request failed: cmd 0 offset 4194304 bytes 4096 flags 0 task.ret -110
(Connection timed out)``."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

MiB = 1 << 20
OP_TIMEOUT = 3  # seconds: rados osd op timeout of the daemon's client


def _pread(path: Path, n: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def test_stopped_osd_fails_requests_in_time_and_others_keep_serving(
    ceph, qsd, tmp_path: Path
) -> None:
    image = ceph.import_image(b"\x33" * (8 * MiB))
    conf = tmp_path / "client.conf"
    conf.write_text(ceph.conf.read_text() + f"\n[client]\nrados osd op timeout = {OP_TIMEOUT}\n")
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x44" * MiB)
    rbd_mnt, other_mnt = tmp_path / "rbd-mnt", tmp_path / "other-mnt"
    rbd_mnt.touch()
    other_mnt.touch()
    daemon = qsd(
        # cache.direct: librbd's cache off, so every read goes to the OSD
        "--blockdev", f"driver=rbd,node-name=r0,pool=rbd,image={image},conf={conf},"
                      "cache.direct=on",
        "--blockdev", f"driver=file,node-name=f0,filename={other}",
        "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={rbd_mnt},writable=on",
        "--export", f"type=fuse,id=e1,node-name=f0,mountpoint={other_mnt}",
    )  # fmt: skip
    assert _pread(rbd_mnt, 4096, 0) == b"\x33" * 4096
    osd = ceph.pid("osd.0")
    outcome: list[BaseException | bytes] = []

    def stalled_read() -> None:
        try:
            outcome.append(_pread(rbd_mnt, 4096, 4 * MiB))
        except OSError as err:
            outcome.append(err)

    os.kill(osd, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reader = threading.Thread(target=stalled_read)
        reader.start()
        time.sleep(0.5)
        assert reader.is_alive()  # waiting for the OSD
        assert _pread(other_mnt, 4096, 0) == b"\x44" * 4096  # the daemon serves on
        reader.join(OP_TIMEOUT * 5)
        took = time.monotonic() - started
        assert not reader.is_alive()
        (err,) = outcome
        assert isinstance(err, OSError), err
        assert err.errno == errno.ETIMEDOUT
        assert took < OP_TIMEOUT * 5
    finally:
        os.kill(osd, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert _pread(rbd_mnt, 4096, 4 * MiB) == b"\x33" * 4096
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    fd = os.open(rbd_mnt, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x55" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert ceph.export(image)[:8192] == b"\x55" * 4096 + b"\x33" * 4096
    daemon.stop()
    assert (
        "qsd-py: rbd request failed: cmd 0 offset 4194304 bytes 4096 flags 0 "
        "task.ret -110 (Connection timed out)\n"
    ) in daemon.stderr()
