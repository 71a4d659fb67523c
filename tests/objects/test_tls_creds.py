"""TLS credentials objects: the contexts they build handshake (or refuse) as QEMU's do.

Each handshake runs over a socketpair in this process, the server side in a thread; what is
asserted is what each side ends up with: a finished handshake, or an ssl error.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from certs import CLIENT_DN, DAY, NOW, ODD_DN, ODD_NAME, Pki, name
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qsd_py.errors import QMPError
from qsd_py.objects.authz import AuthzList, AuthzSimple
from qsd_py.objects.tls_creds import TlsCredsAnon, TlsCredsPsk, TlsCredsX509, verify_error_text


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def x509(path: Path, endpoint: str, **opts: Any) -> TlsCredsX509:
    return TlsCredsX509("tls0", {"dir": str(path), "endpoint": endpoint, **opts})


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str | None = "localhost"
) -> tuple[Any, Any]:
    """Both ends of a handshake: each an SSLSocket, or the exception its side raised."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    results: dict[str, Any] = {}

    def serve() -> None:
        try:
            tls = server_ctx.wrap_socket(a, server_side=True)
            tls.sendall(b"hello")  # TLS 1.3: a refused client certificate shows up here
            results["server"] = tls
        except (ssl.SSLError, OSError) as err:
            results["server"] = err
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        tls = client_ctx.wrap_socket(b, server_hostname=hostname)
        assert tls.recv(5) == b"hello"
        results["client"] = tls
    except (ssl.SSLError, OSError, AssertionError) as err:
        results["client"] = err
        b.close()
    thread.join(15)
    return results["server"], results["client"]


def close(*ends: Any) -> None:
    for end in ends:
        if isinstance(end, socket.socket):
            end.close()


# --- x509 ------------------------------------------------------------------------------------
def test_x509_server_and_client_handshake(pki: Pki, tmp_path: Path) -> None:
    server = x509(pki.server_dir(tmp_path / "s"), "server")
    client = x509(pki.client_dir(tmp_path / "c"), "client")
    s, c = handshake(server.server_context(), client.client_context())
    try:
        assert isinstance(s, ssl.SSLSocket) and isinstance(c, ssl.SSLSocket)
        server.check_peer(s, AuthzSimple("a", {"identity": CLIENT_DN}))
        with pytest.raises(QMPError) as err:
            server.check_peer(s, AuthzSimple("a", {"identity": "CN=someone else"}))
        assert err.value.desc == f"TLS x509 authz check for {CLIENT_DN} is denied"
    finally:
        close(s, c)


def test_authz_sees_the_names_qemu_shows(pki: Pki, tmp_path: Path) -> None:
    """The client's name as QEMU 11.1 passes it to authz (certificate order, escapes)."""
    server = x509(pki.server_dir(tmp_path / "s"), "server")
    client = x509(pki.client_dir(tmp_path / "c", ODD_NAME), "client")
    s, c = handshake(server.server_context(), client.client_context())
    try:
        assert isinstance(s, ssl.SSLSocket)
        rules = [{"match": ODD_DN, "policy": "allow"}]
        server.check_peer(s, AuthzList("a", {"rules": rules}))
        glob = [{"match": "C=GB,O=a\\, b*,CN=?lead#,*", "policy": "allow", "format": "glob"}]
        with pytest.raises(QMPError):  # '?' is one character, the escaped space two
            server.check_peer(s, AuthzList("a", {"rules": glob}))
        glob[0]["match"] = "C=GB,O=a\\, b*,CN=\\ lead#,*"
        server.check_peer(s, AuthzList("a", {"rules": glob}))
    finally:
        close(s, c)


def test_verify_peer_refuses_a_client_without_certificate(pki: Pki, tmp_path: Path) -> None:
    server = x509(pki.server_dir(tmp_path / "s"), "server")
    anonymous = x509(pki.ca_only_dir(tmp_path / "c"), "client")
    s, c = handshake(server.server_context(), anonymous.client_context())
    close(s, c)
    assert isinstance(s, ssl.SSLError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(s)
    assert not isinstance(c, ssl.SSLSocket)
    # verify-peer=off takes that client.
    lenient = x509(tmp_path / "s", "server", **{"verify-peer": False})
    s, c = handshake(lenient.server_context(), anonymous.client_context())
    try:
        assert isinstance(s, ssl.SSLSocket) and isinstance(c, ssl.SSLSocket)
    finally:
        close(s, c)


def test_client_refuses_a_certificate_for_another_host(pki: Pki, tmp_path: Path) -> None:
    server = x509(pki.server_dir(tmp_path / "s", host="elsewhere.example"), "server")
    client = x509(pki.client_dir(tmp_path / "c"), "client")
    s, c = handshake(server.server_context(), client.client_context(), hostname="localhost")
    close(s, c)
    assert isinstance(c, ssl.SSLCertVerificationError)
    assert verify_error_text(c, "localhost") == "Certificate does not match the hostname localhost"
    s, c = handshake(server.server_context(), client.client_context(), "elsewhere.example")
    try:
        assert isinstance(c, ssl.SSLSocket)
    finally:
        close(s, c)


def test_client_refuses_a_server_of_another_ca(pki: Pki, tmp_path: Path) -> None:
    stranger = Pki()
    server = x509(stranger.server_dir(tmp_path / "s"), "server")
    client = x509(pki.client_dir(tmp_path / "c"), "client")
    s, c = handshake(server.server_context(), client.client_context())
    close(s, c)
    assert isinstance(c, ssl.SSLCertVerificationError)
    # A CA of the same name whose signature fails, as GnuTLS words it.
    assert verify_error_text(c, "localhost") == "The certificate is not trusted"


def test_client_needs_a_hostname_to_verify(pki: Pki, tmp_path: Path) -> None:
    client = x509(pki.client_dir(tmp_path / "c"), "client")
    with pytest.raises(QMPError) as err:
        client.client_hostname(None)
    assert err.value.desc == "No hostname for certificate validation"
    assert client.client_hostname("h") == "h"


def test_endpoint_mismatch(pki: Pki, tmp_path: Path) -> None:
    server = x509(pki.server_dir(tmp_path / "s"), "server")
    with pytest.raises(QMPError) as err:
        server.client_context()
    assert err.value.desc == "Expected TLS credentials for a client endpoint"


def test_x509_creation_errors(pki: Pki, tmp_path: Path) -> None:
    """QEMU 11.1's texts, checked with real-qsd's qemu-storage-daemon."""

    def error(path: Path | None, endpoint: str = "server") -> str:
        opts: dict[str, Any] = {"endpoint": endpoint}
        if path is not None:
            opts["dir"] = str(path)
        with pytest.raises(QMPError) as err:
            TlsCredsX509("tls0", opts)
        return err.value.desc

    assert error(None) == "Missing 'dir' property value"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(empty) == (
        f"Unable to access credentials {empty}/ca-cert.pem: No such file or directory"
    )
    ca_only = pki.ca_only_dir(tmp_path / "ca")
    assert error(ca_only) == (
        f"Missing server cert '{ca_only}/server-cert.pem' & key '{ca_only}/server-key.pem'"
    )
    assert x509(ca_only, "client").identities == []  # a client needs only the CA
    good = pki.server_dir(tmp_path / "good")
    broken = tmp_path / "broken"
    pki.ca_only_dir(broken)
    (broken / "server-cert.pem").write_bytes((good / "server-cert.pem").read_bytes())
    assert error(broken) == (
        f"Cert '{broken}/server-cert.pem' without corresponding key '{broken}/server-key.pem'"
    )
    (broken / "server-cert.pem").rename(broken / "server-key.pem")
    assert error(broken) == (
        f"Key '{broken}/server-key.pem' without corresponding cert '{broken}/server-cert.pem'"
    )
    (broken / "server-cert.pem").write_text("junk\n")
    assert error(broken) == (
        f"Unable to import certificate {broken}/server-cert.pem: No certificate was found."
    )
    other = pki.server_dir(tmp_path / "other")
    (broken / "server-cert.pem").write_bytes((good / "server-cert.pem").read_bytes())
    (broken / "server-key.pem").write_bytes((other / "server-key.pem").read_bytes())
    assert error(broken) == (
        f"Cannot set certificate '{broken}/server-cert.pem' & key '{broken}/server-key.pem': "
        "The certificate and the given key do not match."
    )
    (good / "ca-cert.pem").write_text("junk\n")
    assert error(good, "client") == (
        f"Unable to import certificate {good}/ca-cert.pem: No certificate was found."
    )


def test_optional_files_that_do_not_parse(pki: Pki, tmp_path: Path) -> None:
    """A server's CRL and DH parameters, and passwordid: QEMU 11.1's texts."""
    crl = pki.server_dir(tmp_path / "crl")
    (crl / "ca-crl.pem").write_text("junk\n")
    with pytest.raises(QMPError) as err:
        x509(crl, "server")
    assert err.value.desc == f"Cannot load CRL '{crl}/ca-crl.pem': Base64 decoding error."
    dh = pki.server_dir(tmp_path / "dh")
    (dh / "dh-params.pem").write_text("junk\n")
    (dh / "keys.psk").write_text("alice:0011\n")
    expected = (
        f"Unable to load DH parameters from {dh}/dh-params.pem: Base64 unexpected header error."
    )
    for cls in (TlsCredsX509, TlsCredsPsk, TlsCredsAnon):
        with pytest.raises(QMPError) as err:
            cls("t", {"dir": str(dh), "endpoint": "server"})
        assert err.value.desc == expected
    with pytest.raises(QMPError) as err:
        x509(pki.server_dir(tmp_path / "pw"), "server", passwordid="sec0")
    assert err.value.desc == "No secret with id 'sec0'"


def test_x509_extra_identities(pki: Pki, tmp_path: Path) -> None:
    """server-cert-N.pem/server-key-N.pem after server-cert.pem, up to the first gap."""
    path = pki.server_dir(tmp_path / "s")
    second = pki.server_dir(tmp_path / "t")
    for n in (0, 1, 3):
        (path / f"server-cert-{n}.pem").write_bytes((second / "server-cert.pem").read_bytes())
        (path / f"server-key-{n}.pem").write_bytes((second / "server-key.pem").read_bytes())
    creds = x509(path, "server")
    assert [Path(i.cert_path).name for i in creds.identities] == [
        "server-cert.pem",
        "server-cert-0.pem",
        "server-cert-1.pem",
    ]


def test_x509_sanity_checks(pki: Pki, tmp_path: Path) -> None:
    def refused(path: Path, endpoint: str = "server") -> str:
        with pytest.raises(QMPError) as err:
            x509(path, endpoint)
        return err.value.desc

    old = pki.server_dir(tmp_path / "old", start=NOW - 10 * DAY, end=NOW - DAY)
    assert refused(old) == f"The server certificate {old}/server-cert.pem has expired"
    future = pki.client_dir(tmp_path / "future", start=NOW + DAY, end=NOW + 10 * DAY)
    assert refused(future, "client") == (
        f"The client certificate {future}/client-cert.pem is not yet active"
    )
    wrong = tmp_path / "wrong"
    pki.ca_only_dir(wrong)
    cert = pki.issue(name((NameOID.COMMON_NAME, "c")), purpose=ExtendedKeyUsageOID.CLIENT_AUTH)
    (wrong / "server-cert.pem").write_bytes(cert.cert_pem())
    (wrong / "server-key.pem").write_bytes(cert.key_pem())
    assert refused(wrong) == (
        f"Certificate {wrong}/server-cert.pem purpose does not allow use with a TLS server"
    )
    # Another CA of the same name: found, but its signature does not verify.
    foreign = Pki().server_dir(tmp_path / "foreign")
    (foreign / "ca-cert.pem").write_bytes(pki.ca.cert_pem())
    assert refused(foreign) == (
        f"Our own certificate {foreign}/server-cert.pem failed validation against "
        f"{foreign}/ca-cert.pem: The certificate is not trusted"
    )
    # No CA of the issuer's name at all.
    orphan = pki.server_dir(tmp_path / "orphan")
    leaf = pki.issue(name((NameOID.COMMON_NAME, "leaf")))
    (orphan / "ca-cert.pem").write_bytes(leaf.cert_pem())
    assert refused(orphan) == "Cert 'CN=localhost' has no issuer in CA chain"
    # sanity-check=off takes them (and the handshake is then what fails).
    assert x509(old, "server", **{"sanity-check": False}).identities


# --- PSK -------------------------------------------------------------------------------------
def psk_dir(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "keys.psk").write_text(text)
    return path


def test_psk_handshake_right_and_wrong_key(tmp_path: Path) -> None:
    keys = "other:0123\nalice:00112233445566778899aabbccddeeff\n"
    server = TlsCredsPsk("p", {"dir": str(psk_dir(tmp_path / "s", keys)), "endpoint": "server"})
    good = TlsCredsPsk("c", {"dir": str(tmp_path / "s"), "endpoint": "client", "username": "alice"})
    s, c = handshake(server.server_context(), good.client_context(), hostname=None)
    try:
        assert isinstance(s, ssl.SSLSocket) and isinstance(c, ssl.SSLSocket)
        assert s.version() == "TLSv1.3"
    finally:
        close(s, c)
    bad_dir = psk_dir(tmp_path / "bad", "alice:ffffffffffffffffffffffffffffffff\n")
    bad = TlsCredsPsk("c", {"dir": str(bad_dir), "endpoint": "client", "username": "alice"})
    s, c = handshake(server.server_context(), bad.client_context(), hostname=None)
    close(s, c)
    assert isinstance(s, ssl.SSLError) and isinstance(c, ssl.SSLError)
    stranger_dir = psk_dir(tmp_path / "who", "mallory:00112233445566778899aabbccddeeff\n")
    stranger = TlsCredsPsk(
        "c", {"dir": str(stranger_dir), "endpoint": "client", "username": "mallory"}
    )
    s, c = handshake(server.server_context(), stranger.client_context(), hostname=None)
    close(s, c)
    assert isinstance(s, ssl.SSLError) and isinstance(c, ssl.SSLError)


def test_psk_over_tls12(tmp_path: Path) -> None:
    server = TlsCredsPsk(
        "p", {"dir": str(psk_dir(tmp_path / "s", "qemu:0a0b0c0d\n")), "endpoint": "server"}
    )
    client = TlsCredsPsk("c", {"dir": str(tmp_path / "s"), "endpoint": "client"})
    client_ctx = client.client_context()
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    s, c = handshake(server.server_context(), client_ctx, hostname=None)
    try:
        assert isinstance(c, ssl.SSLSocket)
        assert c.version() == "TLSv1.2" and "PSK" in c.cipher()[0]
    finally:
        close(s, c)


def test_psk_creation_errors(tmp_path: Path) -> None:
    def error(opts: dict[str, Any]) -> str:
        with pytest.raises(QMPError) as err:
            TlsCredsPsk("p", opts)
        return err.value.desc

    keys = psk_dir(tmp_path / "k", "alice:0011\nqemu:zz11\n")
    assert error({"dir": str(keys), "username": "alice", "endpoint": "server"}) == (
        "username should not be set when endpoint=server"
    )
    assert error({"dir": str(keys), "endpoint": "client", "username": "bob"}) == (
        f"Username bob not found in PSK file {keys}/keys.psk"
    )
    assert error({"dir": str(keys), "endpoint": "client"}) == (
        "Cannot set PSK client credentials: Error in parsing."
    )
    assert error({"endpoint": "client"}) == "Missing 'dir' property value"
    assert error({"dir": str(tmp_path)}) == (
        f"Unable to access credentials {tmp_path}/keys.psk: No such file or directory"
    )


# --- anonymous -------------------------------------------------------------------------------
def test_anon_handshake() -> None:
    server = TlsCredsAnon("a", {"endpoint": "server"})
    client = TlsCredsAnon("b", {"endpoint": "client"})
    s, c = handshake(server.server_context(), client.client_context(), hostname=None)
    try:
        assert isinstance(c, ssl.SSLSocket)
        assert c.version() == "TLSv1.2" and c.getpeercert(binary_form=True) is None
        assert "ADH" in c.cipher()[0] or "AECDH" in c.cipher()[0]
    finally:
        close(s, c)


# --- authz -----------------------------------------------------------------------------------
def test_authz_list_rules_in_order() -> None:
    rules = [
        {"match": "CN=blocked,O=acme,C=GB", "policy": "deny"},
        {"match": "CN=*,O=acme,C=GB", "policy": "allow", "format": "glob"},
        {"match": "CN=?ob,O=other,C=FR", "policy": "allow", "format": "glob"},
        {"match": "CN=[ab],O=x", "policy": "allow", "format": "glob"},
    ]
    authz = AuthzList("a", {"rules": rules})
    assert not authz.is_allowed("CN=blocked,O=acme,C=GB")  # first rule wins
    assert authz.is_allowed("CN=anyone,O=acme,C=GB")
    assert authz.is_allowed("CN=,O=acme,C=GB")  # '*' matches nothing too
    assert authz.is_allowed("CN=bob,O=other,C=FR")
    assert not authz.is_allowed("CN=bobby,O=other,C=FR")
    assert not authz.is_allowed("CN=a,O=x")  # brackets are plain characters in GLib's globs
    assert authz.is_allowed("CN=[ab],O=x")
    assert not authz.is_allowed("CN=x,O=elsewhere")  # default policy: deny
    assert AuthzList("b", {"policy": "allow", "rules": rules[:1]}).is_allowed("CN=x")
    assert not AuthzList("c", {"rules": [{"match": "cn=x", "policy": "allow"}]}).is_allowed("CN=x")
