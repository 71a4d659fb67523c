"""nbd nodes in a qsd-py daemon: under FUSE exports, under qcow2, through QMP, and with a
server that goes away while the daemon serves other exports."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from nbd_servers import ServerFactory
from support import Qsd, run_qsd

KiB, MiB = 1 << 10, 1 << 20


def nbd_blockdev(srv, name: str = "n0", extra: str = "") -> list[str]:
    return ["--blockdev", f"driver=nbd,node-name={name},{srv.keyval},export=disk{extra}"]


def fuse_export(node: str, mnt: Path, export: str = "e0") -> list[str]:
    mnt.touch()
    return ["--export", f"type=fuse,id={export},node-name={node},mountpoint={mnt},writable=on"]


def quit_daemon(daemon: Qsd) -> None:
    client = daemon.qmp()
    try:
        client.cmd_raw("quit")
    finally:
        with contextlib.suppress(EOFError, OSError):
            client.close()
    assert daemon.wait(20) == 0


def direct_read(path: Path, offset: int, length: int) -> bytes:
    """A read that reaches the export (O_DIRECT: no page cache in between)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, length)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def test_fuse_export_of_an_nbd_node(
    qsd: Callable[..., Qsd], nbd_server: ServerFactory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    original = random.Random(5).randbytes(2 * MiB)
    image.write_bytes(original)
    srv = nbd_server("qemu-nbd", str(image))
    mnt = tmp_path / "mnt"
    daemon = qsd(*nbd_blockdev(srv), *fuse_export("n0", mnt))
    assert mnt.stat().st_size == 2 * MiB
    assert mnt.read_bytes() == original
    data = random.Random(6).randbytes(300 * KiB)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 12345) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    expected = original[:12345] + data + original[12345 + len(data) :]
    assert image.read_bytes() == expected

    client = daemon.qmp()
    try:
        (node,) = client.cmd("query-named-block-nodes")
    finally:
        client.close()
    assert node["drv"] == "nbd" and node["node-name"] == "n0"
    assert node["file"] == f"nbd+unix:///disk?socket={srv.addr['path']}"
    assert node["image"]["virtual-size"] == 2 * MiB
    quit_daemon(daemon)


def test_qcow2_over_an_nbd_node(
    qsd: Callable[..., Qsd], nbd_server: ServerFactory, tmp_path: Path
) -> None:
    """qemu-nbd serves a qcow2 file as raw bytes; qsd-py opens the qcow2 on top and exports
    it: what the export reads and writes is what qemu-img sees in the image afterwards."""
    raw = tmp_path / "content.raw"
    raw.write_bytes(random.Random(7).randbytes(3 * MiB) + bytes(5 * MiB))
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)  # fmt: skip
    os.truncate(qcow2, 16 * MiB)  # room for new clusters: an NBD export cannot grow
    srv = nbd_server("qemu-nbd", str(qcow2))
    mnt = tmp_path / "mnt"
    daemon = qsd(*nbd_blockdev(srv), "--blockdev", "driver=qcow2,node-name=q0,file=n0",
                 *fuse_export("q0", mnt))  # fmt: skip
    assert mnt.read_bytes() == raw.read_bytes()
    data = random.Random(8).randbytes(MiB)
    fd = os.open(mnt, os.O_RDWR)
    try:
        os.pwrite(fd, data, 4 * MiB + 4096)  # into unallocated clusters
        os.pwrite(fd, b"overwritten", 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    quit_daemon(daemon)
    srv.kill()
    expected = bytearray(raw.read_bytes())
    expected[4 * MiB + 4096 : 5 * MiB + 4096] = data
    expected[100:111] = b"overwritten"
    raw.write_bytes(expected)
    check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2),
                           str(raw)], capture_output=True, text=True)  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr


def test_lost_server_fails_its_export_but_the_daemon_serves_others(
    qsd: Callable[..., Qsd], nbd_server: ServerFactory, tmp_path: Path
) -> None:
    image = tmp_path / "remote.img"
    image.write_bytes(b"R" * MiB)
    local = tmp_path / "local.img"
    local.write_bytes(b"L" * MiB)
    srv = nbd_server("qemu-nbd", str(image))
    remote_mnt, local_mnt = tmp_path / "remote", tmp_path / "local"
    daemon = qsd(
        *nbd_blockdev(srv, extra=",reconnect-delay=1"), *fuse_export("n0", remote_mnt),
        "--blockdev", f"driver=file,node-name=f0,filename={local}",
        *fuse_export("f0", local_mnt, "e1"),
    )  # fmt: skip
    assert direct_read(remote_mnt, 0, 4096) == b"R" * 4096
    srv.kill()
    start = time.monotonic()
    try:
        direct_read(remote_mnt, 4096, 4096)
    except OSError as err:
        assert err.errno == errno.EIO
    else:
        raise AssertionError("read of a lost server's export succeeded")
    assert time.monotonic() - start < 10
    assert direct_read(local_mnt, 0, 4096) == b"L" * 4096  # the other export goes on
    client = daemon.qmp()
    try:
        names = [n["node-name"] for n in client.cmd("query-named-block-nodes")]
        assert sorted(names) == ["f0", "n0"]
    finally:
        client.close()
    srv.start()  # back: the export serves again once the node has reconnected
    deadline = time.monotonic() + 15
    while True:
        try:
            assert direct_read(remote_mnt, 8192, 4096) == b"R" * 4096
            break
        except OSError:
            assert time.monotonic() < deadline, "export did not recover"
            time.sleep(0.1)
    quit_daemon(daemon)


def test_blockdev_add_errors(qsd: Callable[..., Qsd], nbd_server: ServerFactory,
                             tmp_path: Path) -> None:  # fmt: skip
    image = tmp_path / "x.img"
    image.write_bytes(bytes(MiB))
    srv = nbd_server("qemu-nbd", str(image))
    daemon = qsd()
    client = daemon.qmp()
    missing = str(tmp_path / "none.sock")
    try:
        reply = client.cmd_raw(
            "blockdev-add",
            {"driver": "nbd", "node-name": "a", "server": {"type": "unix", "path": missing}},
        )
        assert (
            reply["error"]["desc"] == f"Failed to connect to '{missing}': No such file or directory"
        )
        reply = client.cmd_raw(
            "blockdev-add",
            {"driver": "nbd", "node-name": "b", "server": srv.addr, "export": "nope"},
        )
        assert reply["error"]["desc"] == "Requested export not available"
        reply = client.cmd_raw(
            "blockdev-add",
            {"driver": "nbd", "node-name": "c", "server": srv.addr, "export": "disk"},
        )
        assert reply == {"return": {}}
        assert [n["node-name"] for n in client.cmd("query-named-block-nodes")] == ["c"]
    finally:
        client.close()
    quit_daemon(daemon)


def test_cli_connection_refused(tmp_path: Path) -> None:
    from nbd_servers import free_port

    port = free_port()
    arg = f"driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port={port}"
    out = run_qsd(["--blockdev", arg])
    assert out.returncode == 1
    assert out.stderr == (
        f"qsd-py: --blockdev {arg}: Failed to connect to '127.0.0.1:{port}': Connection refused\n"
    )


def test_export_in_an_iothread_reaches_the_nodes_loop(
    qsd: Callable[..., Qsd], nbd_server: ServerFactory, tmp_path: Path
) -> None:
    """An export served by an iothread calls the node from another loop than the one its
    connection lives on: requests are handed over to that loop."""
    image = tmp_path / "io.img"
    image.write_bytes(bytes(MiB))
    srv = nbd_server("qemu-nbd", str(image))
    mnt = tmp_path / "mnt"
    mnt.touch()
    export = f"type=fuse,id=e0,node-name=n0,mountpoint={mnt},writable=on,iothread=io0"
    daemon = qsd("--object", "iothread,id=io0", *nbd_blockdev(srv), "--export", export)
    data = random.Random(9).randbytes(256 * KiB)
    fd = os.open(mnt, os.O_RDWR)
    try:
        os.pwrite(fd, data, 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert direct_read(mnt, 4096, 256 * KiB) == data
    assert image.read_bytes()[4096 : 4096 + len(data)] == data
    quit_daemon(daemon)
