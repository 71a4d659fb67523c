"""TLS credentials objects (``tls-creds-x509``, ``tls-creds-psk``, ``tls-creds-anon``).

Created by ``--object``/``object-add`` from files in ``dir`` named as QEMU names them, and
checked at creation with QEMU's texts, so a typo in a path fails the option rather than the
first client. Each object is for one ``endpoint`` (``client``, QEMU's default, or
``server``); what the NBD code asks of it:

* :meth:`TlsCreds.server_context` / :meth:`TlsCreds.client_context`: a stdlib
  ``ssl.SSLContext`` (PSK ones included, see ``tls_psk.py``) to hand to asyncio's
  ``start_tls`` (``server_side=True``, or ``server_hostname=``:meth:`client_hostname`).
  Asking for the other endpoint raises QEMU's ``Expected TLS credentials for a server
  endpoint``.
* :meth:`TlsCreds.check_peer` once the handshake is done: QEMU's checks of the peer
  (x509 with ``verify-peer``: the client certificate's distinguished name against the
  ``tls-authz`` object; PSK and anonymous credentials consult no authz, as QEMU 11.1),
  raising :class:`QMPError` with QEMU's text when it is refused.
* :func:`verify_error_text` turns a handshake's ``ssl.SSLCertVerificationError`` into
  QEMU's words (``Certificate does not match the hostname H``, ``The certificate hasn't got
  a known issuer``...).

The ``priority`` string is GnuTLS's language; it is accepted and kept, as QEMU accepts any
string at creation, but OpenSSL chooses the suites.
"""

from __future__ import annotations

import errno
import os
import ssl
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.objects import x509
    from qsd_py.objects.authz import Authz

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"
PSK_FILE = "keys.psk"
DEFAULT_PSK_USERNAME = "qemu"
IDENTITIES = 4  # server-cert-0.pem .. server-cert-3.pem besides server-cert.pem


class TlsCreds:
    """What every TLS credentials object shares: ``dir``, ``endpoint``, ``verify-peer``,
    ``priority``."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        self.id = obj_id
        self.opts = opts
        self.dir: str | None = opts.get("dir")
        self.endpoint: str = opts.get("endpoint", "client")  # QEMU's default
        self.verify_peer: bool = bool(opts.get("verify-peer", True))
        self.priority: str | None = opts.get("priority")
        self._ctx: ssl.SSLContext | None = None

    def path(self, name: str, required: bool) -> str | None:
        """``dir/name`` if it is readable; a missing optional file is None. QEMU's texts."""
        if self.dir is None:
            if required:
                raise QMPError("Missing 'dir' property value")
            return None
        path = f"{self.dir}/{name}"
        if os.access(path, os.R_OK):
            return path
        code = errno.ENOENT if not os.path.lexists(path) else errno.EACCES
        if code == errno.ENOENT and not required:
            return None
        raise QMPError(f"Unable to access credentials {path}: {os.strerror(code)}")

    def check_endpoint(self, endpoint: str) -> None:
        if self.endpoint != endpoint:
            raise QMPError(f"Expected TLS credentials for a {endpoint} endpoint")

    def server_context(self) -> ssl.SSLContext:
        """The context a TLS server wraps its connections in (one per object, shared)."""
        self.check_endpoint("server")
        return self._shared_context()

    def client_context(self) -> ssl.SSLContext:
        """The context a TLS client wraps its connection in (one per object, shared)."""
        self.check_endpoint("client")
        return self._shared_context()

    def _shared_context(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = self._context()
        return self._ctx

    def client_hostname(self, hostname: str | None) -> str | None:
        """The ``server_hostname`` a client hands to ``start_tls``: the name the server's
        certificate must match (``tls-hostname``, else the host connected to)."""
        return hostname

    def check_peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, authz: Authz | None) -> None:
        """After the handshake: refuse a peer QEMU would refuse (raises QMPError)."""

    def _context(self) -> ssl.SSLContext:
        raise NotImplementedError

    def stop(self) -> None:
        """Nothing to release (object-del, shutdown)."""


class TlsCredsX509(TlsCreds):
    """``tls-creds-x509``: certificates signed by a CA, both sides verified by default.

    Read at creation in QEMU 11.1's order: ``ca-cert.pem``; the identities (``server-`` or
    ``client-cert.pem``/``-key.pem``, then ``-cert-N.pem``/``-key-N.pem`` for N = 0..3 up
    to the first missing pair; a server needs one); a server's ``ca-crl.pem`` and
    ``dh-params.pem``; the sanity checks; then the CRL and DH files themselves."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        from qsd_py.objects import x509

        super().__init__(obj_id, opts)
        self.sanity_check: bool = bool(opts.get("sanity-check", True))
        self.password: bytes | None = None
        self.passwordid: str | None = opts.get("passwordid")
        server = self.endpoint == "server"
        if self.dir is None:
            raise QMPError("Missing 'dir' property value")
        self.ca = self.path(CA_CERT, True)
        assert self.ca is not None
        self.cas = x509.import_certificates(self.ca)
        self.identities = self._identities(server)
        self.crl = self.path(CA_CRL, False) if server else None
        self.dh = self.path(DH_PARAMS, False) if server else None
        if self.sanity_check:
            for identity in self.identities:
                x509.sanity_check(identity, self.cas, self.ca, server)
        if self.crl is not None:
            x509.check_crl(self.crl)
        self._shared_context()  # load everything now: bad files fail the object, not a client

    def _identities(self, server: bool) -> list[x509.Identity]:
        role = "server" if server else "client"
        found = []
        names = [(f"{role}-cert.pem", f"{role}-key.pem")]
        names += [(f"{role}-cert-{i}.pem", f"{role}-key-{i}.pem") for i in range(IDENTITIES)]
        for i, (cert, key) in enumerate(names):
            identity = self._identity(cert, key)
            if identity is not None:
                found.append(identity)
            elif i > 0:
                break  # the numbered ones end at the first missing pair
        if server and not found:
            raise QMPError(
                f"Missing server cert '{self.dir}/{SERVER_CERT}' & key '{self.dir}/{SERVER_KEY}'"
            )
        return found

    def _identity(self, cert_name: str, key_name: str) -> x509.Identity | None:
        from qsd_py.objects import x509

        cert, key = self.path(cert_name, False), self.path(key_name, False)
        if cert is None and key is None:
            return None
        if key is None:
            raise QMPError(f"Cert '{cert}' without corresponding key '{self.dir}/{key_name}'")
        if cert is None:
            raise QMPError(f"Key '{key}' without corresponding cert '{self.dir}/{cert_name}'")
        chain = x509.import_certificates(cert)
        if self.passwordid is not None:
            # A key's password comes from a ``secret`` object, which qsd-py does not have.
            raise QMPError(f"No secret with id '{self.passwordid}'")
        identity = x509.Identity(cert, key, chain, x509.import_private_key(key, self.password))
        x509.check_key_matches(identity)
        return identity

    def _context(self) -> ssl.SSLContext:
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as err:
            raise QMPError(f"Cannot set CA certificate '{self.ca}': {_reason(err)}") from err
        for identity in self.identities:
            try:
                # Never OpenSSL's own prompt on a terminal for an encrypted key's password.
                ctx.load_cert_chain(
                    identity.cert_path, identity.key_path, self.password or (lambda: b"")
                )
            except (ssl.SSLError, OSError) as err:
                raise QMPError(
                    f"Cannot set certificate '{identity.cert_path}' & key "
                    f"'{identity.key_path}': {_reason(err)}"
                ) from err
        if self.crl is not None:
            try:
                ctx.load_verify_locations(cafile=self.crl)
            except (ssl.SSLError, OSError) as err:
                raise QMPError(f"Cannot load CRL '{self.crl}': {_reason(err)}") from err
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if self.dh is not None:
            _load_dh(ctx, self.dh)
        if not server:
            ctx.check_hostname = self.verify_peer
            ctx.hostname_checks_common_name = True  # GnuTLS falls back to the CN without SANs
        # QEMU checks the peer's certificate only with verify-peer (a server without it
        # accepts any client, with or without a certificate).
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx

    def client_hostname(self, hostname: str | None) -> str | None:
        if hostname is None and self.verify_peer:
            raise QMPError("No hostname for certificate validation")
        return hostname

    def check_peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, authz: Authz | None) -> None:
        """With ``verify-peer`` and ``tls-authz`` (server side): the client's certificate
        subject must be allowed (QEMU's ``TLS x509 authz check for DN is denied``)."""
        if not self.verify_peer or authz is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        if der is None:
            raise QMPError("No certificate peers")
        from qsd_py.objects.x509 import distinguished_name

        name = distinguished_name(der)
        if not authz.is_allowed(name):
            raise QMPError(f"TLS x509 authz check for {name} is denied")


class TlsCredsPsk(TlsCreds):
    """``tls-creds-psk``: a pre-shared key per username, in ``dir/keys.psk``
    (``username:hexkey`` lines, GnuTLS's format). A client uses ``username`` (default
    ``qemu``); a server takes any username in the file, reading it at each handshake."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        super().__init__(obj_id, opts)
        self.username: str | None = opts.get("username")
        self.dh: str | None = None
        if self.endpoint == "server":
            if self.username is not None:
                raise QMPError("username should not be set when endpoint=server")
            self.dh = self.path(DH_PARAMS, False)
            self.keys = self.path(PSK_FILE, True)
        else:
            self.keys = self.path(PSK_FILE, True)
            self.client_key = self._lookup(self.username or DEFAULT_PSK_USERNAME, strict=True)
        self._shared_context()

    def _lookup(self, username: str, strict: bool = False) -> bytes | None:
        """The key of ``username`` in the file: the first line ``username:hexkey``."""
        assert self.keys is not None
        try:
            with open(self.keys, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().split("\n")
        except OSError as err:
            if not strict:
                return None
            raise QMPError(
                f"Cannot read PSK file {self.keys}: {os.strerror(err.errno or 0)}"
            ) from err
        for line in lines:
            name, sep, hexkey = line.partition(":")
            if sep and name == username:
                try:
                    return bytes.fromhex(hexkey.strip())
                except ValueError as err:
                    if strict:  # GnuTLS's words, as QEMU passes them on
                        raise QMPError(
                            "Cannot set PSK client credentials: Error in parsing."
                        ) from err
                    return None
        if strict:
            raise QMPError(f"Username {username} not found in PSK file {self.keys}")
        return None

    def _context(self) -> ssl.SSLContext:
        from qsd_py.objects import tls_psk

        try:
            if self.endpoint == "server":
                ctx = tls_psk.server_context(self._lookup)
                if self.dh is not None:
                    _load_dh(ctx, self.dh)
                return ctx
            assert self.client_key is not None
            return tls_psk.client_context(self.username or DEFAULT_PSK_USERNAME, self.client_key)
        except tls_psk.PskUnavailable as err:
            raise QMPError(f"TLS-PSK is not available here: {err}") from err


class TlsCredsAnon(TlsCreds):
    """``tls-creds-anon``: encryption without authentication (anonymous Diffie-Hellman, TLS
    1.2 only, as GnuTLS's ``+ANON-DH``). A server may have ``dir/dh-params.pem``."""

    # OpenSSL keeps anonymous suites below its default security level.
    CIPHERS = "aNULL:!eNULL:@SECLEVEL=0"

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        super().__init__(obj_id, opts)
        self.dh = self.path(DH_PARAMS, False) if self.endpoint == "server" else None
        self._shared_context()

    def _context(self) -> ssl.SSLContext:
        from qsd_py.objects import openssl_ctx

        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(self.CIPHERS)
        if self.dh is not None:
            _load_dh(ctx, self.dh)
            return ctx
        try:
            if server:
                openssl_ctx.set_dh_auto(ctx)
        except openssl_ctx.Unavailable as err:
            raise QMPError(f"Anonymous TLS is not available here: {err}") from err
        return ctx


# OpenSSL's verification results (X509_V_ERR_*) in QEMU's (GnuTLS's) words.
_VERIFY_REASONS = {
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    2: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}
X509_V_ERR_HOSTNAME_MISMATCH = 62


def verify_error_text(err: ssl.SSLCertVerificationError, hostname: str | None) -> str:
    """What QEMU 11.1 says when a peer's certificate does not verify, for an ssl error from
    a handshake with these contexts (``Certificate does not match the hostname H``...)."""
    if err.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
        return f"Certificate does not match the hostname {hostname}"
    return _VERIFY_REASONS.get(err.verify_code, "The certificate is not trusted")


def _load_dh(ctx: ssl.SSLContext, path: str) -> None:
    """A server's ``dh-params.pem`` (QEMU 11.1 deprecates the file but still reads it)."""
    try:
        ctx.load_dh_params(path)
    except (ssl.SSLError, OSError, ValueError) as err:
        with open(path, "rb") as f:
            pem = b"-----BEGIN DH PARAMETERS-----" in f.read()
        reason = _reason(err) if pem else "Base64 unexpected header error."  # GnuTLS's words
        raise QMPError(f"Unable to load DH parameters from {path}: {reason}") from err


def _reason(err: Exception) -> str:
    """OpenSSL's reason (GnuTLS's words differ; QEMU prints those)."""
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason)
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    return str(err)
