"""The nbd driver against qsd-py's own NBD server (a daemon with ``--nbd-server`` and an NBD
export): extended headers, block status, TLS, and a server daemon restarted under I/O."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from objects.certs import Pki
from support import Qsd

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import STATUS_DATA, STATUS_ZERO
from qsd_py.nbd.client import Mode
from qsd_py.objects.registry import ObjectRegistry

KiB, MiB = 1 << 10, 1 << 20


class OwnServer:
    """A qsd-py daemon exporting ``image`` as NBD export ``disk`` on a UNIX socket."""

    def __init__(self, workdir: Path, image: Path, tls_dir: Path | None) -> None:
        workdir.mkdir(exist_ok=True)
        self.workdir = workdir
        self.socket = workdir / "nbd.sock"
        server = f"addr.type=unix,addr.path={self.socket}"
        tls = []
        if tls_dir is not None:
            tls = ["--object", f"tls-creds-x509,id=t0,dir={tls_dir},endpoint=server"]
            server += ",tls-creds=t0"
        self.args = [
            "--blockdev", f"driver=file,node-name=f0,filename={image}", *tls,
            "--nbd-server", server,
            "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on",
        ]  # fmt: skip
        self.daemon: Qsd | None = None

    def start(self) -> OwnServer:
        self.daemon = Qsd(self.workdir, self.args, qmp=False)
        self.daemon.wait_ready()
        return self

    def kill(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()

    def opts(self, name: str = "n0", **extra: object) -> dict:
        return {"driver": "nbd", "node-name": name, "export": "disk",
                "server": {"type": "unix", "path": str(self.socket)}, **extra}  # fmt: skip


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Callable[..., OwnServer]]:
    started: list[OwnServer] = []

    def make(image: Path, tls_dir: Path | None = None) -> OwnServer:
        server = OwnServer(tmp_path / f"server{len(started)}", image, tls_dir)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.kill()


async def test_io_and_block_status(graph: BlockGraph, own_server, tmp_path: Path) -> None:
    image = tmp_path / "own.img"
    model = bytearray(random.Random(1).randbytes(MiB)) + bytearray(3 * MiB)
    image.write_bytes(model[:MiB])
    os.truncate(image, 4 * MiB)
    server = own_server(image)
    node = await graph.add(server.opts(discard="unmap"))
    assert node.export_info.mode == Mode.EXTENDED
    assert "base:allocation" in node.export_info.contexts
    data = random.Random(2).randbytes(200 * KiB)
    await asyncio.gather(node.write(MiB + 77, data), node.write_zeroes(4096, 4096))
    model[MiB + 77 : MiB + 77 + len(data)] = data
    model[4096:8192] = bytes(4096)
    await node.flush()
    buf = bytearray(4 * MiB)
    await node.read(0, memoryview(buf))
    assert buf == model == image.read_bytes()
    st = await node.block_status(2 * MiB, 2 * MiB)
    assert st.flags & STATUS_ZERO and not st.flags & STATUS_DATA
    st = await node.block_status(0, MiB)
    assert st.flags & STATUS_DATA


async def test_tls_with_own_server(graph: BlockGraph, own_server, tmp_path: Path) -> None:
    pki = Pki()
    server_dir = pki.server_dir(tmp_path / "server-creds")
    client_dir = pki.client_dir(tmp_path / "client-creds")
    image = tmp_path / "tls.img"
    image.write_bytes(random.Random(3).randbytes(MiB))
    server = own_server(image, server_dir)
    objects = ObjectRegistry()
    objects.add({"qom-type": "tls-creds-x509", "id": "c", "dir": str(client_dir),
                 "endpoint": "client"})  # fmt: skip
    graph.objects = objects
    node = await graph.add(server.opts(**{"tls-creds": "c", "tls-hostname": "localhost"}))
    buf = bytearray(MiB)
    await node.read(0, memoryview(buf))
    assert buf == image.read_bytes()
    objects.stop_all()


async def test_own_server_restarted_under_io(graph: BlockGraph, own_server, tmp_path: Path) -> None:
    image = tmp_path / "restart.img"
    image.write_bytes(bytes(2 * MiB))
    server = own_server(image)
    node = await graph.add(server.opts(**{"reconnect-delay": 10}))
    await node.write(0, b"first")
    server.kill()
    blocks = [random.Random(i).randbytes(64 * KiB) for i in range(16)]
    writes = asyncio.gather(*(node.write(i * 64 * KiB, b) for i, b in enumerate(blocks)))
    await asyncio.sleep(0.3)
    assert not writes.done()
    await asyncio.get_running_loop().run_in_executor(None, server.start)
    await asyncio.wait_for(writes, 30)
    await node.flush()
    assert image.read_bytes()[: 16 * 64 * KiB] == b"".join(blocks)


def test_daemon_chain_qcow2_over_nbd(qsd, own_server, tmp_path: Path) -> None:
    """One qsd-py daemon serves a qcow2 image's bytes over NBD, a second opens the qcow2
    over an nbd node and exports it with FUSE: what the FUSE file holds is what qemu-img
    reads from the image."""
    raw = tmp_path / "content.raw"
    raw.write_bytes(random.Random(4).randbytes(2 * MiB) + bytes(2 * MiB))
    qcow2 = tmp_path / "chain.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)  # fmt: skip
    server = own_server(qcow2)
    mnt = tmp_path / "mnt"
    mnt.touch()
    socket = server.socket
    daemon = qsd(
        "--blockdev", f"driver=nbd,node-name=n0,server.type=unix,server.path={socket},export=disk",
        "--blockdev", "driver=qcow2,node-name=q0,file=n0,read-only=on",
        "--export", f"type=fuse,id=e0,node-name=q0,mountpoint={mnt}",
    )  # fmt: skip
    assert mnt.read_bytes() == raw.read_bytes()
    client = daemon.qmp()
    try:
        client.cmd("quit")
    finally:
        with contextlib.suppress(EOFError, OSError):
            client.close()
    assert daemon.wait(20) == 0
