"""The nbd driver next to QEMU 11.1 (optional, ``--real-qsd``): against QEMU 11.1's qemu-nbd,
which offers extended headers, and its query-named-block-nodes answer for an nbd node."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbd_servers import NbdServer, nbd_opts
from realqsd_support import SHARE, real_named_nodes, require_real_qsd
from support import Qsd
from test_client_tls import TLS_FAILURES, Creds, tls_server

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import STATUS_DATA
from qsd_py.nbd.client import Mode

pytestmark = pytest.mark.realqsd
MiB = 1 << 20


@pytest.fixture
def share() -> Iterator[Path]:
    """A directory both sides see (bind-mounted into real-qsd's chroot)."""
    path = SHARE / f"nbdc-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def real_server(share: Path) -> Iterator[Callable[[Path], NbdServer]]:
    """QEMU 11.1's qemu-nbd serving an image under ``share``."""
    tool = require_real_qsd()
    started: list[NbdServer] = []

    def make(image: Path) -> NbdServer:
        path = str(share / f"s{len(started)}.sock")
        argv = [str(tool), "run", "qemu-nbd", "--persistent", "--shared=8", "-f", "raw",
                "-x", "disk", "--socket", path, str(image)]  # fmt: skip
        server = NbdServer(argv, {"type": "unix", "path": path})
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.kill()


async def test_extended_headers_with_qemu_11(real_server, share: Path) -> None:
    image = share / "disk.img"
    image.write_bytes(b"\x11" * MiB)
    os.truncate(image, 2 * MiB)
    srv = real_server(image)
    graph = BlockGraph()
    try:
        node = await graph.add(nbd_opts(srv, discard="unmap"))
        assert node.export_info.mode == Mode.EXTENDED
        assert "max-discard" not in node.limits()
        await node.write(MiB + 5, b"ext" * 1000)
        await node.write_zeroes(0, 64 * 1024)
        buf = bytearray(2 * MiB)
        await node.read(0, memoryview(buf))
        expected = bytearray(b"\x11" * MiB + bytes(MiB))
        expected[MiB + 5 : MiB + 3005] = b"ext" * 1000
        expected[: 64 * 1024] = bytes(64 * 1024)
        assert buf == expected
        st = await node.block_status(MiB + 256 * 1024, MiB - 256 * 1024)
        assert not st.flags & STATUS_DATA
    finally:
        await graph.close_all()
    assert image.read_bytes() == expected


def test_node_info_as_qemu_shows_it(qsd: Callable[..., Qsd], nbd_server, share: Path) -> None:
    image = share / "info.img"
    image.write_bytes(bytes(3 * MiB))
    socket = share / "host.sock"
    srv = NbdServer(
        ["qemu-nbd", "--persistent", "--shared=8", "-f", "raw", "-x", "disk",
         "--socket", str(socket), str(image)],
        {"type": "unix", "path": str(socket)},
    )  # fmt: skip
    srv.start()
    try:
        blockdev = f"driver=nbd,node-name=n0,{srv.keyval},export=disk"
        theirs = real_named_nodes(["--blockdev", blockdev], share)
        daemon = qsd("--blockdev", blockdev)
        client = daemon.qmp()
        try:
            ours = client.cmd("query-named-block-nodes")
        finally:
            with contextlib.suppress(OSError):
                client.close()
    finally:
        srv.kill()
    assert ours == theirs


def test_tls_failure_texts_are_qemus(nbd_server, share: Path) -> None:
    """Each refusal of test_client_tls.TLS_FAILURES, asked of QEMU 11.1's daemon with the
    same credentials and servers."""
    creds = Creds(share / "tls")
    path = share / "tls.img"
    path.write_bytes(bytes(MiB))
    servers = {kind: tls_server(nbd_server, creds, kind, path, sock_dir=share)
               for kind in ("plain", "x509", "untrusted")}  # fmt: skip
    tool = require_real_qsd()
    qmp = share / "tls-qmp.sock"
    proc = subprocess.Popen(
        [str(tool), "run", "qemu-storage-daemon",
         "--object", f"tls-creds-x509,id=c,dir={creds.client},endpoint=client",
         "--object", f"tls-creds-x509,id=s,dir={creds.server},endpoint=server",
         "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not qmp.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "real daemon failed"
            time.sleep(0.05)
        from qemu.qmp.legacy import QEMUMonitorProtocol

        client = QEMUMonitorProtocol(str(qmp))
        client.connect()
        try:
            for i, (kind, options, text) in enumerate(TLS_FAILURES):
                reply = client.cmd_raw("blockdev-add", nbd_opts(servers[kind], f"t{i}", **options))
                assert reply["error"]["desc"] == text, (kind, options)
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
