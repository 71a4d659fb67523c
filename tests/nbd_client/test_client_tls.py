"""nbd nodes over TLS (``tls-creds``, ``tls-hostname``) against qemu-nbd and nbdkit, with
certificates and pre-shared keys made by the test, and QEMU 11.1's texts when it fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nbd_servers import ServerFactory, nbd_opts
from objects.certs import Pki
from support import Qsd

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError
from qsd_py.objects.registry import ObjectRegistry

MiB = 1 << 20
PSK_KEY = "0123456789abcdef0123456789abcdef"


class Creds:
    """Credential directories: a server's and a client's of one CA, a server of another CA,
    and a pre-shared key file (user ``qemu``)."""

    def __init__(self, base: Path) -> None:
        pki = Pki()
        self.server = pki.server_dir(base / "server")
        self.client = pki.client_dir(base / "client")
        self.untrusted = Pki().server_dir(base / "untrusted")
        self.psk = base / "psk"
        self.psk.mkdir()
        (self.psk / "keys.psk").write_text(f"qemu:{PSK_KEY}\n")

    def qemu_nbd(self, kind: str = "x509", which: str = "server") -> list[str]:
        """qemu-nbd's options for a TLS server."""
        directory = self.psk if kind == "psk" else getattr(self, which)
        return ["--object", f"tls-creds-{kind},id=t0,dir={directory},endpoint=server",
                "--tls-creds", "t0"]  # fmt: skip


@pytest.fixture
def creds(tmp_path: Path) -> Creds:
    return Creds(tmp_path / "tls")


@pytest.fixture
def tls_graph(graph: BlockGraph, creds: Creds) -> Iterator[BlockGraph]:
    """A graph whose daemon objects are client credentials ``c`` (x509), ``p`` (psk) and
    server credentials ``s``."""
    objects = ObjectRegistry()
    objects.add({"qom-type": "tls-creds-x509", "id": "c", "dir": str(creds.client),
                 "endpoint": "client"})  # fmt: skip
    objects.add({"qom-type": "tls-creds-psk", "id": "p", "dir": str(creds.psk),
                 "endpoint": "client"})  # fmt: skip
    objects.add({"qom-type": "tls-creds-x509", "id": "s", "dir": str(creds.server),
                 "endpoint": "server"})  # fmt: skip
    graph.objects = objects
    try:
        yield graph
    finally:
        objects.stop_all()


def image(tmp_path: Path, name: str = "tls.img") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(MiB))
    return path


async def roundtrip(node, path: Path) -> None:
    """Write through the node, read back through it, and find it in the image."""
    await node.write(4096, b"over tls" * 512)
    await node.flush()
    buf = bytearray(MiB)
    await node.read(0, memoryview(buf))
    assert buf == path.read_bytes()
    assert buf[4096 : 4096 + 4096] == b"over tls" * 512


async def test_x509_over_tcp_checks_the_host_name(
    tls_graph: BlockGraph, nbd_server: ServerFactory, creds: Creds, tmp_path: Path
) -> None:
    path = image(tmp_path)
    srv = nbd_server("qemu-nbd", str(path), *creds.qemu_nbd(), transport="inet")
    srv.addr["host"] = "localhost"  # the certificate's name; 127.0.0.1 is not in it
    node = await tls_graph.add(nbd_opts(srv, **{"tls-creds": "c"}))
    await roundtrip(node, path)
    assert node.filename() == f"nbd://localhost:{srv.addr['port']}/disk"


async def test_x509_over_unix_with_tls_hostname(
    tls_graph: BlockGraph, nbd_server: ServerFactory, creds: Creds, tmp_path: Path
) -> None:
    path = image(tmp_path)
    srv = nbd_server("qemu-nbd", str(path), *creds.qemu_nbd())
    node = await tls_graph.add(nbd_opts(srv, **{"tls-creds": "c", "tls-hostname": "localhost"}))
    await roundtrip(node, path)


async def test_psk(
    tls_graph: BlockGraph, nbd_server: ServerFactory, creds: Creds, tmp_path: Path
) -> None:
    path = image(tmp_path)
    srv = nbd_server("qemu-nbd", str(path), *creds.qemu_nbd("psk"))
    node = await tls_graph.add(nbd_opts(srv, **{"tls-creds": "p"}))
    await roundtrip(node, path)


async def test_nbdkit_requiring_tls(
    tls_graph: BlockGraph, nbd_server: ServerFactory, creds: Creds
) -> None:
    srv = nbd_server("nbdkit", "--tls=require", f"--tls-certificates={creds.server}", "memory",
                     "size=1M")  # fmt: skip
    node = await tls_graph.add(nbd_opts(srv, **{"tls-creds": "c", "tls-hostname": "localhost"}))
    await node.write(0, b"kit" * 100)
    buf = bytearray(300)
    await node.read(0, memoryview(buf))
    assert buf == b"kit" * 100
    with pytest.raises(QMPError, match=r"^TLS negotiation required before option 7 \(go\)$"):
        await tls_graph.add(nbd_opts(srv, "plain"))


async def test_reconnect_over_tls(
    tls_graph: BlockGraph, nbd_server: ServerFactory, creds: Creds, tmp_path: Path
) -> None:
    path = image(tmp_path)
    srv = nbd_server("qemu-nbd", str(path), *creds.qemu_nbd())
    node = await tls_graph.add(
        nbd_opts(srv, **{"tls-creds": "c", "tls-hostname": "localhost", "reconnect-delay": 10})
    )
    srv.kill()
    write = asyncio.ensure_future(node.write(0, b"again" * 100))
    await asyncio.sleep(0.2)
    srv.start()
    await asyncio.wait_for(write, 20)
    await node.flush()
    assert path.read_bytes()[:500] == b"again" * 100


# (server kind, node options, QEMU 11.1's text), checked with real-qsd in
# test_client_realqsd.py.
TLS_FAILURES = [
    ("x509", {"tls-creds": "c"}, "No hostname for certificate validation"),
    ("x509", {"tls-creds": "c", "tls-hostname": "wrong"},
     "Certificate does not match the hostname wrong"),
    ("untrusted", {"tls-creds": "c", "tls-hostname": "localhost"},
     "The certificate is not trusted"),
    ("x509", {}, "TLS negotiation required before option 7 (go)"),
    ("plain", {"tls-creds": "c", "tls-hostname": "localhost"},
     "Denied by server for option 5 (starttls)"),
    ("plain", {"tls-creds": "nope"}, "No TLS credentials with id 'nope'"),
    ("plain", {"tls-creds": "s"}, "Expected TLS credentials for a client endpoint"),
]  # fmt: skip


def tls_server(nbd_server: ServerFactory, creds: Creds, kind: str, path: Path, **kw: Any):
    """qemu-nbd without TLS (``plain``), with the CA's server certificate (``x509``) or
    another CA's (``untrusted``)."""
    if kind == "plain":
        return nbd_server("qemu-nbd", str(path), **kw)
    which = "untrusted" if kind == "untrusted" else "server"
    return nbd_server("qemu-nbd", str(path), *creds.qemu_nbd(which=which), **kw)


@pytest.mark.parametrize(("server", "options", "text"), TLS_FAILURES)
async def test_tls_failures_have_qemus_texts(
    tls_graph: BlockGraph,
    nbd_server: ServerFactory,
    creds: Creds,
    tmp_path: Path,
    server: str,
    options: dict,
    text: str,
) -> None:
    srv = tls_server(nbd_server, creds, server, image(tmp_path))
    with pytest.raises(QMPError) as err:
        await tls_graph.add(nbd_opts(srv, **options))
    assert str(err.value) == text
    assert len(tls_graph) == 0


def test_daemon_with_tls_creds_object(
    qsd: Callable[..., Qsd], nbd_server: ServerFactory, creds: Creds, tmp_path: Path
) -> None:
    """--object tls-creds-x509 on the command line, the nbd node using it under a FUSE
    export."""
    path = image(tmp_path)
    srv = nbd_server("qemu-nbd", str(path), *creds.qemu_nbd())
    mnt = tmp_path / "mnt"
    mnt.touch()
    daemon = qsd(
        "--object", f"tls-creds-x509,id=c,dir={creds.client},endpoint=client",
        "--blockdev", f"driver=nbd,node-name=n0,{srv.keyval},export=disk,tls-creds=c,"
                      "tls-hostname=localhost",
        "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={mnt}",
    )  # fmt: skip
    assert mnt.read_bytes() == path.read_bytes()
    client = daemon.qmp()
    try:
        client.cmd("quit")
    finally:
        with contextlib.suppress(EOFError, OSError):
            client.close()
    assert daemon.wait(20) == 0
