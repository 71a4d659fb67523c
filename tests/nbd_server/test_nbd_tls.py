"""TLS on the NBD server: clients must STARTTLS, certificates are checked (and their names,
with tls-authz), and a client that fails gets no data. Certificates come from the objects
tests' small CA (tests/objects/certs.py)."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from pathlib import Path

import pytest
from nbd_bytes import name_payload, option, read_option_reply, read_simple_reply, recv_exactly
from nbd_bytes import request as nbd_request
from nbd_support import MIB, run
from objects.certs import CLIENT_DN, Pki
from support import Qsd

NODE = "driver=null-co,node-name=n0,size=4194304,read-zeroes=on"
STARTTLS, GO = 5, 7
ERR_TLS_REQD = (1 << 31) | 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def tls_server(qsd, pki: Pki, tmp_path: Path):
    """``tls_server(*objects, server_opts=...)``: qsd-py with x509 server credentials
    (``tls0``) and an NBD server on TCP; returns (daemon, port)."""
    server_dir = pki.server_dir(tmp_path / "server")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 * MIB)

    def start(*objects: str, server_opts: str = "", export_opts: str = "") -> tuple[Qsd, int]:
        port = free_port()
        daemon = qsd(
            "--object", f"tls-creds-x509,id=tls0,dir={server_dir},endpoint=server",
            *objects,
            "--blockdev", f"driver=file,node-name=n0,filename={image}",
            "--nbd-server",
            f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0{server_opts}",
            "--export", f"type=nbd,id=e0,node-name=n0,writable=on{export_opts}",
        )  # fmt: skip
        return daemon, port

    return start


def nbdinfo(port: int, certs: Path | None) -> tuple[int, str]:
    if certs is None:
        uri = f"nbd://localhost:{port}/n0"
    else:
        uri = f"nbds://localhost:{port}/n0?tls-certificates={certs}"
    done = run("nbdinfo", "--json", uri, check=False, timeout=30)
    return done.returncode, done.stdout + done.stderr


def daemon_log(daemon: Qsd) -> str:
    daemon.stop()
    return daemon.stderr()


@pytest.mark.parametrize("iothread", [False, True])
def test_x509_clients_read_and_write(tls_server, pki: Pki, tmp_path: Path, iothread: bool) -> None:
    """Also with the export on an iothread: the TLS session moves there with the socket."""
    client = pki.client_dir(tmp_path / "client")
    if iothread:
        daemon, port = tls_server("--object", "iothread,id=io0", export_opts=",iothread=io0")
    else:
        daemon, port = tls_server()
    code, out = nbdinfo(port, client)
    assert code == 0, out
    info = json.loads(out)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 4 * MIB
    image = f"driver=nbd,server.type=inet,server.host=localhost,server.port={port},export=n0"
    creds = f"tls-creds-x509,id=c0,dir={client},endpoint=client"
    run("qemu-io", "--object", creds, "--image-opts", f"{image},tls-creds=c0",
        "-c", "write -P 0x42 0 65536", "-c", "read -P 0x42 0 65536")  # fmt: skip
    out_file = tmp_path / "out.raw"
    run("qemu-img", "convert", "--object", creds, "--image-opts", f"{image},tls-creds=c0",
        "-O", "raw", str(out_file))  # fmt: skip
    data = out_file.read_bytes()
    assert data[:65536] == b"\x42" * 65536 and data[65536:] == bytes(4 * MIB - 65536)


def test_clients_that_do_not_starttls_are_refused(tls_server) -> None:
    daemon, port = tls_server()
    code, out = nbdinfo(port, None)
    assert code != 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert recv_exactly(sock, 18)[:8] == b"NBDMAGIC"
        sock.sendall(struct.pack(">I", 3) + option(GO, name_payload(b"n0")))
        reply = read_option_reply(sock)
        assert (reply.rep, reply.payload) == (ERR_TLS_REQD, b"Option 0x7 not permitted before TLS")
        sock.sendall(option(1, b"n0"))  # NBD_OPT_EXPORT_NAME: no way to refuse but to close
        assert sock.recv(16) == b""


def test_starttls_by_hand(tls_server, pki: Pki, tmp_path: Path) -> None:
    """The protocol itself: STARTTLS, the handshake right after its ACK, then GO and a read
    over the encrypted stream."""
    client = pki.client_dir(tmp_path / "client")
    daemon, port = tls_server()
    ctx = ssl.create_default_context(cafile=str(client / "ca-cert.pem"))
    ctx.load_cert_chain(str(client / "client-cert.pem"), str(client / "client-key.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        recv_exactly(raw, 18)
        raw.sendall(struct.pack(">I", 3) + option(STARTTLS))
        assert read_option_reply(raw).rep == 1
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(option(GO, name_payload(b"n0")))
            while read_option_reply(tls).rep != 1:
                pass
            tls.sendall(nbd_request(0, 4096, 512, cookie=11))
            assert read_simple_reply(tls) == (0, 11)
            assert recv_exactly(tls, 512) == bytes(512)


def test_certificates_that_do_not_verify_get_no_data(tls_server, pki: Pki, tmp_path: Path) -> None:
    """A client certificate from another CA: the handshake fails and nothing is served."""
    good = pki.client_dir(tmp_path / "client")
    stranger = Pki().client_dir(tmp_path / "stranger")
    mixed = tmp_path / "mixed"  # trusts our server, shows a certificate we do not trust
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
    for name in ("client-cert.pem", "client-key.pem"):
        (mixed / name).write_bytes((stranger / name).read_bytes())
    daemon, port = tls_server()
    code, out = nbdinfo(port, mixed)
    assert code != 0 and "export-size" not in out
    assert nbdinfo(port, good)[0] == 0  # the server goes on
    assert "option negotiation failed: The certificate is not trusted" in daemon_log(daemon)


def test_authz_checks_the_client_name(tls_server, pki: Pki, tmp_path: Path) -> None:
    client = pki.client_dir(tmp_path / "client")
    daemon, port = tls_server(
        "--object",
        f"authz-simple,id=az0,identity={CLIENT_DN.replace(',', ',,')}",
        server_opts=",tls-authz=az0",
    )
    assert nbdinfo(port, client)[0] == 0
    daemon.stop()
    daemon, port = tls_server(
        "--object", "authz-list,id=az1,policy=deny,rules.0.match=CN=*,rules.0.policy=allow,"
        "rules.0.format=glob", server_opts=",tls-authz=az1",
    )  # fmt: skip
    code, out = nbdinfo(port, client)
    assert code != 0 and "export-size" not in out
    log = daemon_log(daemon)
    assert f"option negotiation failed: TLS x509 authz check for {CLIENT_DN} is denied" in log


def test_missing_authz_object_refuses_clients(tls_server, pki: Pki, tmp_path: Path) -> None:
    client = pki.client_dir(tmp_path / "client")
    daemon, port = tls_server(server_opts=",tls-authz=nothere")
    assert nbdinfo(port, client)[0] != 0
    assert "Cannot find QAuthZ object ID nothere" in daemon_log(daemon)


def test_psk(qsd, tmp_path: Path) -> None:
    keys = tmp_path / "psk"
    keys.mkdir()
    (keys / "keys.psk").write_text("alice:" + "0123456789abcdef" * 4 + "\n")
    port = free_port()
    qsd(
        "--object", f"tls-creds-psk,id=tls0,dir={keys},endpoint=server",
        "--blockdev", NODE,
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0",
        "--export", "type=nbd,id=e0,node-name=n0",
    )  # fmt: skip
    psk = keys / "keys.psk"
    good = run("nbdinfo", "--json",
               f"nbds://alice@localhost:{port}/n0?tls-psk-file={psk}", check=False)  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["TLS"] is True
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + "ff" * 32 + "\n")
    bad = run("nbdinfo", f"nbds://alice@localhost:{port}/n0?tls-psk-file={wrong}", check=False)
    assert bad.returncode != 0


def test_tls_server_start_errors(qsd, pki: Pki, tmp_path: Path) -> None:
    client_dir = pki.client_dir(tmp_path / "client")
    daemon = qsd("--object", f"tls-creds-x509,id=c0,dir={client_dir},endpoint=client")
    qmp = daemon.qmp()
    try:
        addr = {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}
        reply = qmp.cmd_raw("nbd-server-start", {"addr": addr, "tls-creds": "c0"})
        assert reply["error"]["desc"] == "Expected TLS credentials for a server endpoint"
        assert not (tmp_path / "n.sock").exists()  # the listener was closed again
    finally:
        qmp.close()
