"""The rbd driver's open errors side by side with QEMU's qemu-storage-daemon 11.1 (its rbd
driver, in the real-qsd chroot) on the same mini-ceph cluster (optional: ``--real-qsd``).
The cluster's conf file is copied under /tmp/qsd-cmp, which both daemons see; the chroot
shares the host's loopback, where the monitor and the OSD listen."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from realqsd_support import SHARE, real_named_nodes, run_real
from support import run_qsd

pytestmark = pytest.mark.realqsd

DEAD_CONF = (
    "[global]\nmon host = [v2:127.0.0.1:1]\nauth client required = none\n"
    "ms bind msgr1 = false\nclient mount timeout = 2\n"
)


@pytest.fixture
def shared(ceph) -> Iterator[Path]:
    path = SHARE / f"rbd-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    shutil.copy(ceph.conf, path / "ceph.conf")
    (path / "dead.conf").write_text(DEAD_CONF)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def img(ceph) -> str:
    """An image with a snapshot ``s1``, for every case."""
    name = ceph.new_image(1 << 20, prefix="cmp")
    ceph.rbd("snap", "create", f"rbd/{name}@s1")
    return name


def _errors(text: str, program: str) -> list[str]:
    return [line.removeprefix(f"{program}: ") for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "extra",
    [
        "pool=nopool,image={img}",
        "pool=rbd,image=noimg",
        "pool=rbd,image={img},snapshot=s1",
        "pool=rbd,image={img},snapshot=nosnap,read-only=on",
        "pool=rbd,image={img},namespace=nons",
        "pool=rbd,image={img},conf={d}/none.conf",
        "pool=rbd,image={img},conf={d}/dead.conf",
        "pool=rbd,image={img},key-secret=nosec",
    ],
)
def test_open_errors_as_qemus(img: str, shared: Path, extra: str) -> None:
    opts = "driver=rbd,node-name=r0," + extra.format(img=img, d=shared)
    if "conf=" not in opts:
        opts += f",conf={shared}/ceph.conf"
    real_code, real_err = run_real(["--blockdev", opts], timeout=30)
    ours = run_qsd(["--blockdev", opts], timeout=30)
    assert real_code == ours.returncode == 1
    assert _errors(ours.stderr, "qsd-py") == _errors(real_err, "qemu-storage-daemon")


def _args(blockdevs: list[str]) -> list[str]:
    return [arg for blockdev in blockdevs for arg in ("--blockdev", blockdev)]


def test_node_info_as_qemu_shows_it(ceph, qsd, img: str, shared: Path, tmp_path: Path) -> None:
    """The same answer for an image with a snapshot, its snapshot read-only, an image in a
    namespace reached through a monitor address and a user, and raw and qcow2 over RBD."""
    qcow2 = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    qimg = ceph.import_image(qcow2.read_bytes(), prefix="cmpq")
    ceph.rbd("namespace", "create", "rbd/nscmp")
    ceph.rbd("create", "--size", "2M", "rbd/nscmp/nsimg")
    port = ceph.conf.read_text().split("mon host = [v2:127.0.0.1:")[1].split("]")[0]
    conf = f"{shared}/ceph.conf"
    cases = [
        [f"driver=rbd,node-name=r0,pool=rbd,image={img},conf={conf}"],
        [f"driver=rbd,node-name=r0,pool=rbd,image={img},snapshot=s1,read-only=on,conf={conf}"],
        [f"driver=rbd,node-name=r0,pool=rbd,namespace=nscmp,image=nsimg,user=admin,"
         f"server.0.host=127.0.0.1,server.0.port={port},conf={conf}"],
        [f"driver=rbd,node-name=r0,pool=rbd,image={img},conf={conf}",
         "driver=raw,node-name=w0,file=r0"],
        [f"driver=rbd,node-name=r0,pool=rbd,image={qimg},conf={conf}",
         "driver=qcow2,node-name=q0,file=r0"],
    ]  # fmt: skip
    for blockdevs in cases:
        theirs = real_named_nodes(_args(blockdevs), shared)
        daemon = qsd(*_args(blockdevs))
        client = daemon.qmp()
        try:
            ours = client.cmd("query-named-block-nodes")
        finally:
            with contextlib.suppress(OSError):
                client.close()
        daemon.kill()
        assert [n["drv"] for n in ours][-1] == "rbd"
        assert ours == theirs, blockdevs
