"""The rbd node itself: QEMU 11.1's error texts and query-named-block-nodes (recorded from
its qemu-storage-daemon against a mini-ceph cluster), snapshots, resizing, and a qcow2
image stored in RBD."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20


@pytest.fixture
def qmp(qsd):
    """A daemon with no nodes and its QMP client."""
    client = qsd().qmp()
    yield client
    client.close()


def _add(qmp: Any, **opts: Any) -> dict[str, Any]:
    return qmp.cmd_raw("blockdev-add", {"driver": "rbd", "node-name": "r0", **opts})


def _error(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    assert reply["error"]["class"] == "GenericError"
    return reply["error"]["desc"]


def test_open_errors_are_qemus(ceph, qmp, tmp_path: Path) -> None:
    image = ceph.new_image(MiB)
    conf = str(ceph.conf)
    missing = str(tmp_path / "none.conf")
    cases = [
        ({"pool": "nopool", "image": image, "conf": conf},
         "error opening pool nopool: No such file or directory"),
        ({"pool": "rbd", "image": "noimg", "conf": conf},
         "error reading header from noimg: No such file or directory"),
        ({"pool": "rbd", "image": image, "snapshot": "nosnap", "read-only": True, "conf": conf},
         f"error reading header from {image}: No such file or directory"),
        ({"pool": "rbd", "image": image, "namespace": "nons", "conf": conf},
         "namespace 'nons' does not exist"),
        ({"pool": "rbd", "image": image, "conf": missing},
         f"error reading conf file {missing}: No such file or directory"),
        ({"pool": "rbd", "image": image, "key-secret": "nosec", "conf": conf},
         "No secret with id 'nosec'"),
        ({"pool": "rbd", "image": image, "key-secret": "io0", "conf": conf},
         "Object with id 'io0' is not a secret"),
        # the conf file is read first, as QEMU does: its error wins over the secret's
        ({"pool": "rbd", "image": image, "key-secret": "nosec", "conf": missing},
         f"error reading conf file {missing}: No such file or directory"),
    ]  # fmt: skip
    assert qmp.cmd_raw("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
    for opts, text in cases:
        assert _error(_add(qmp, **opts)) == text
    assert qmp.cmd_raw("query-named-block-nodes") == {"return": []}


def test_key_secret_is_a_secret_object(ceph, qmp) -> None:
    """``key-secret`` names a ``secret`` object whose bytes become librbd's ``key`` (this
    cluster has authentication off, so any key opens it; a wrong kind of object or a
    missing one does not, see above)."""
    image = ceph.new_image(MiB)
    key = {"qom-type": "secret", "id": "k0", "data": "QVFCdmRHVnpkQT09", "format": "base64"}
    assert qmp.cmd_raw("object-add", key) == {"return": {}}
    reply = _add(qmp, pool="rbd", image=image, conf=str(ceph.conf), **{"key-secret": "k0"})
    assert reply == {"return": {}}
    assert qmp.cmd_raw("object-del", {"id": "k0"}) == {"return": {}}  # read once, at open
    assert qmp.cmd_raw("blockdev-del", {"node-name": "r0"}) == {"return": {}}


def test_unreachable_cluster_fails_within_the_mount_timeout(qmp, tmp_path: Path) -> None:
    """No monitor answers: the open gives up after ``client mount timeout`` with QEMU's
    text, and the daemon answers other commands meanwhile (the connect runs on a thread)."""
    conf = tmp_path / "dead.conf"
    conf.write_text(
        "[global]\nmon host = [v2:127.0.0.1:1]\nauth client required = none\n"
        "ms bind msgr1 = false\nclient mount timeout = 2\n"
    )
    started = time.monotonic()
    reply = _add(qmp, pool="rbd", image="x", conf=str(conf))
    took = time.monotonic() - started
    assert _error(reply) == "error connecting: Connection timed out"
    assert took < 15


def test_snapshot_opens_read_only_and_refuses_writable(ceph, qmp, tmp_path: Path) -> None:
    image = ceph.import_image(b"\x11" * MiB)
    ceph.rbd("snap", "create", f"rbd/{image}@s1")
    # the image changes after the snapshot; the snapshot keeps the old bytes
    ceph.rbd("bench", "--io-type", "write", "--io-size", "4096", "--io-total", "4096",
             "--io-pattern", "seq", f"rbd/{image}")  # fmt: skip
    opts = {"pool": "rbd", "image": image, "snapshot": "s1", "conf": str(ceph.conf)}
    assert _error(_add(qmp, **opts)) == "rbd snapshots are read-only"
    assert _add(qmp, **opts, **{"auto-read-only": True}) == {"return": {}}
    (node,) = qmp.cmd("query-named-block-nodes")
    assert node["ro"] is True
    mnt = tmp_path / "mnt"
    mnt.touch()
    export = {"type": "fuse", "id": "e0", "node-name": "r0", "mountpoint": str(mnt)}
    assert qmp.cmd_raw("block-export-add", export) == {"return": {}}
    assert mnt.read_bytes() == b"\x11" * MiB
    with pytest.raises(OSError) as err:
        os.open(mnt, os.O_WRONLY)
    assert err.value.errno == errno.EROFS


def test_query_named_block_nodes_is_qemus(ceph, qmp) -> None:
    """QEMU 11.1's answer for an image with a snapshot, opened with a namespace, a user and
    a monitor address (its json: filename lists the options in QEMU's QDict order)."""
    ceph.rbd("namespace", "create", "rbd/ns1")
    ceph.rbd("create", "--size", "1M", "rbd/ns1/nsimg")
    ceph.rbd("snap", "create", "rbd/ns1/nsimg@s1")
    port = ceph.conf.read_text().split("mon host = [v2:127.0.0.1:")[1].split("]")[0]
    conf = str(ceph.conf)
    opts = {
        "pool": "rbd", "namespace": "ns1", "image": "nsimg", "user": "admin", "conf": conf,
        "server": [{"host": "127.0.0.1", "port": port}], "auth-client-required": ["none"],
    }  # fmt: skip
    assert _add(qmp, **opts) == {"return": {}}
    (node,) = qmp.cmd("query-named-block-nodes")
    filename = "json:" + json.dumps(
        {"pool": "rbd", "image": "nsimg", "conf": conf, "server.0.host": "127.0.0.1",
         "driver": "rbd", "namespace": "ns1", "server.0.port": port, "user": "admin",
         "auth-client-required.0": "none"}
    )  # fmt: skip
    image = {
        "filename": filename,
        "format": "rbd",
        "dirty-flag": False,
        "virtual-size": MiB,
        "cluster-size": 4 * MiB,
        "snapshots": [
            {"id": "s1", "name": "s1", "vm-state-size": MiB, "date-sec": 0, "date-nsec": 0,
             "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0},
        ],
        "limits": {"request-alignment": 1, "min-mem-alignment": 512,
                   "opt-mem-alignment": 4096, "max-iov": 1024},
        "format-specific": {"type": "rbd", "data": {}},
    }  # fmt: skip
    assert node["image"] == image
    assert node["file"] == filename
    assert (node["drv"], node["ro"], node["children"]) == ("rbd", False, [])


def test_raw_over_rbd_shows_the_image_through(ceph, qmp) -> None:
    """QEMU 11.1's raw over an rbd node: a json: name, the image's object size, snapshots
    and memory alignment, no actual-size."""
    image = ceph.new_image(MiB)
    ceph.rbd("snap", "create", f"rbd/{image}@s1")
    assert _add(qmp, pool="rbd", image=image, conf=str(ceph.conf)) == {"return": {}}
    raw = {"driver": "raw", "node-name": "w0", "file": "r0"}
    assert qmp.cmd_raw("blockdev-add", raw) == {"return": {}}
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
    rbd_opts = f'{{"pool": "rbd", "image": "{image}", "conf": "{ceph.conf}", "driver": "rbd"}}'
    w0 = nodes["w0"]["image"]
    assert w0["filename"] == f'json:{{"driver": "raw", "file": {rbd_opts}}}'
    assert "actual-size" not in w0
    assert w0["cluster-size"] == 4 * MiB
    assert [s["name"] for s in w0["snapshots"]] == ["s1"]
    assert w0["limits"]["min-mem-alignment"] == 512


def test_block_resize_resizes_the_image(ceph, qmp) -> None:
    image = ceph.new_image(MiB)
    assert _add(qmp, pool="rbd", image=image, conf=str(ceph.conf)) == {"return": {}}
    assert qmp.cmd_raw("block_resize", {"node-name": "r0", "size": 3 * MiB}) == {"return": {}}
    info = json.loads(ceph.rbd("info", "--format", "json", f"rbd/{image}"))
    assert info["size"] == 3 * MiB
    (node,) = qmp.cmd("query-named-block-nodes")
    assert node["image"]["virtual-size"] == 3 * MiB
    assert qmp.cmd_raw("blockdev-del", {"node-name": "r0"}) == {"return": {}}
    assert qmp.cmd_raw("query-named-block-nodes") == {"return": []}


def test_qcow2_stored_in_rbd(ceph, qsd, tmp_path: Path) -> None:
    """A qcow2 image made by qemu-img and imported into RBD opens with driver=qcow2 over
    driver=rbd; what is written through it is a valid qcow2 image in the cluster."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(src)],
                   check=True, capture_output=True)  # fmt: skip
    image = ceph.import_image(src.read_bytes())
    mnt = tmp_path / "mnt"
    mnt.touch()
    rbd_node = f"file.driver=rbd,file.pool=rbd,file.image={image},file.conf={ceph.conf}"
    daemon = qsd(
        "--blockdev", f"driver=qcow2,node-name=q0,{rbd_node}",
        "--export", f"type=fuse,id=e0,node-name=q0,mountpoint={mnt},writable=on",
    )  # fmt: skip
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pread(fd, MiB, 0) == b"\x61" * MiB
        os.pwrite(fd, b"\x62" * MiB, 4 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    qmp = daemon.qmp()
    nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
    # QEMU 11.1's answer: a json: name with the RBD node's options, no actual-size
    rbd_opts = f'{{"pool": "rbd", "image": "{image}", "conf": "{ceph.conf}", "driver": "rbd"}}'
    assert nodes["q0"]["file"] == f'json:{{"driver": "qcow2", "file": {rbd_opts}}}'
    assert "actual-size" not in nodes["q0"]["image"]
    assert nodes["q0"]["image"]["limits"]["min-mem-alignment"] == 512
    try:
        qmp.cmd("quit")
    except EOFError:
        pass
    assert daemon.wait() == 0
    out = tmp_path / "out.qcow2"
    out.write_bytes(ceph.export(image))
    subprocess.run(["qemu-img", "check", "-q", str(out)], check=True)
    for pattern, offset in (("0x61", 0), ("0x62", 4 * MiB), ("0", 2 * MiB)):
        done = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} {offset} 1M", str(out)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "Pattern verification failed" not in done.stdout


def test_rbd_node_as_a_backing_node(ceph, qsd, tmp_path: Path) -> None:
    """A qcow2 overlay in a local file over an RBD image: reads of what the overlay does not
    hold come from the cluster, writes stay in the overlay, the image is left as it was."""
    base = b"\x71" * (2 * MiB)
    image = ceph.import_image(base)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), "2M"], check=True)
    mnt = tmp_path / "mnt"
    mnt.touch()
    daemon = qsd(
        "--blockdev", ceph.blockdev("r0", image, **{"read-only": "on"}),
        "--blockdev", f"driver=file,node-name=f0,filename={overlay}",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0,backing=r0",
        "--export", f"type=fuse,id=e0,node-name=q0,mountpoint={mnt},writable=on",
    )  # fmt: skip
    fd = os.open(mnt, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x72" * 65536, MiB)
        os.fsync(fd)
        got = os.pread(fd, 2 * MiB, 0)
    finally:
        os.close(fd)
    assert got == base[:MiB] + b"\x72" * 65536 + base[MiB + 65536 :]
    qmp = daemon.qmp()
    (q0,) = [n for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == "q0"]
    assert q0["backing_file"].startswith('json:{"pool": "rbd", "image": ')
    qmp.close()
    assert ceph.export(image) == base
