"""X.509 certificates as QEMU 11.1 (GnuTLS) reads and checks them, and their names.

``tls-creds-x509`` reads its CA list and each identity (a certificate chain and its key) when
it is created, with QEMU's texts for files that do not parse or do not match, and with
``sanity-check=on`` (the default) checks each identity's chain as QEMU does: validity times,
basic constraints, key usage and purpose, the way up to a CA of ``ca-cert.pem``, and that the
CAs sign it. A TLS server with ``tls-authz`` passes the client certificate's distinguished
name to the authz object in the form QEMU 11.1 shows (checked with its ``authz-list``): the
RDNs in the certificate's order, ``+`` inside a multi-valued RDN, GnuTLS's short names
(``EMAIL``, ``DC``) and RFC 4514's backslash escapes. The ``ssl`` module cannot read certificates;
the ``cryptography`` package does, imported only by these objects.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from cryptography.x509 import Certificate, Name

# GnuTLS's names for the attribute types it knows (others are written as dotted OIDs).
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "title",
    "2.5.4.4": "surName",
    "2.5.4.42": "givenName",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym",
    "2.5.4.5": "serialNumber",
    "2.5.4.17": "postalCode",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "EMAIL",
}
_ESCAPED = set(',+"\\<>;')
NO_CERTIFICATE = "No certificate was found."
BAD_BASE64 = "Base64 decoding error."


@dataclass
class Identity:
    """A certificate chain (ours first) and its private key, from ``cert_path``/``key_path``."""

    cert_path: str
    key_path: str
    chain: list[Certificate]
    key: Any


# --- names -----------------------------------------------------------------------------------
def distinguished_name(der: bytes) -> str:
    """The subject of a DER certificate as QEMU shows it (``C=GB,O=Example,CN=c``)."""
    from cryptography import x509

    return name_text(x509.load_der_x509_certificate(der).subject)


def name_text(name: Name) -> str:
    """GnuTLS's compatible form, as QEMU 11.1 shows it: the RDNs in the certificate's order
    (``C=GB,O=Example,CN=client``, not RFC 4514's reverse), RFC 4514's escapes."""
    rdns = []
    for rdn in name.rdns:
        parts = [
            f"{_SHORT_NAMES.get(a.oid.dotted_string, a.oid.dotted_string)}={_escape(a.value)}"
            for a in rdn
        ]
        rdns.append("+".join(parts))
    return ",".join(rdns)


def _escape(value: Any) -> str:
    text = value if isinstance(value, str) else bytes(value).hex()
    out = "".join("\\" + c if c in _ESCAPED else c for c in text)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


# --- reading ---------------------------------------------------------------------------------
def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        reason = os.strerror(err.errno or 0)
        raise QMPError(f"{what} {path}: Failed to open file “{path}”: {reason}") from err


def import_certificates(path: str) -> list[Certificate]:
    """Every certificate of a PEM file (a CA list, or a chain with ours first)."""
    from cryptography import x509

    data = _read(path, "Cannot load CA cert list")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise QMPError(f"Unable to import certificate {path}: {NO_CERTIFICATE}")
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError as err:
        raise QMPError(f"Unable to import certificate {path}: {BAD_BASE64}") from err


def import_private_key(path: str, password: bytes | None) -> Any:
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "Cannot load private key")
    try:
        return serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError) as err:
        raise QMPError(f"Unable to import private key {path}") from err


def check_key_matches(identity: Identity) -> None:
    """The key must be the one of the chain's first certificate."""
    from cryptography.hazmat.primitives import serialization

    def raw(public_key: Any) -> bytes:
        return bytes(
            public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    if raw(identity.chain[0].public_key()) != raw(identity.key.public_key()):
        raise QMPError(
            f"Cannot set certificate '{identity.cert_path}' & key '{identity.key_path}': "
            "The certificate and the given key do not match."
        )


def check_crl(path: str) -> None:
    from cryptography import x509

    data = _read(path, "Cannot load CRL")
    try:
        x509.load_pem_x509_crl(data)
    except ValueError as err:
        raise QMPError(f"Cannot load CRL '{path}': {BAD_BASE64}") from err


# --- sanity checks ---------------------------------------------------------------------------
def sanity_check(identity: Identity, cas: list[Certificate], ca_path: str, is_server: bool) -> None:
    """QEMU's checks of one identity: every certificate of its chain, the way from the chain
    up to a self-signed CA through ``ca-cert.pem``, and verification against the CAs."""
    for i, cert in enumerate(identity.chain):
        _check_cert(cert, identity.cert_path, is_server, is_ca=i != 0)
    _check_authority_chain(identity.chain, cas, ca_path, is_server)
    _check_signed(identity, cas, ca_path)


def _check_cert(cert: Certificate, path: str, is_server: bool, is_ca: bool) -> None:
    _check_times(cert, path, is_server, is_ca)
    _check_basic_constraints(cert, path, is_server, is_ca)
    _check_key_usage(cert, path, is_ca)
    if not is_ca:
        _check_purpose(cert, path, is_server)


def _check_times(cert: Certificate, path: str, is_server: bool, is_ca: bool) -> None:
    now = datetime.datetime.now(datetime.UTC)
    what = "CA" if is_ca else "server" if is_server else "client"
    if cert.not_valid_after_utc < now:
        raise QMPError(f"The {what} certificate {path} has expired")
    if cert.not_valid_before_utc > now:
        raise QMPError(f"The {what} certificate {path} is not yet active")


def _extension(cert: Certificate, kind: Any) -> Any:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _check_basic_constraints(cert: Certificate, path: str, is_server: bool, is_ca: bool) -> None:
    from cryptography import x509

    ext = _extension(cert, x509.BasicConstraints)
    if ext is None:
        if is_ca:
            raise QMPError(f"The certificate {path} is missing basic constraints for a CA")
    elif ext.value.ca and not is_ca:
        who = "server" if is_server else "client"
        raise QMPError(
            f"The certificate {path} basic constraints show a CA, but we need one for a {who}"
        )
    elif not ext.value.ca and is_ca:
        raise QMPError(f"The certificate {path} basic constraints do not show a CA")


def _check_key_usage(cert: Certificate, path: str, is_ca: bool) -> None:
    from cryptography import x509

    ext = _extension(cert, x509.KeyUsage)
    if ext is None or not ext.critical:
        return  # a missing or non-critical usage never refuses (GnuTLS's defaults)
    if is_ca and not ext.value.key_cert_sign:
        raise QMPError(f"Certificate {path} usage does not permit certificate signing")
    if not is_ca and not ext.value.digital_signature:
        raise QMPError(f"Certificate {path} usage does not permit digital signature")


def _check_purpose(cert: Certificate, path: str, is_server: bool) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ext = _extension(cert, x509.ExtendedKeyUsage)
    if ext is None or not ext.critical:
        return
    purposes = set(ext.value)
    anyone = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes
    if is_server and not (anyone or ExtendedKeyUsageOID.SERVER_AUTH in purposes):
        raise QMPError(f"Certificate {path} purpose does not allow use with a TLS server")
    if not is_server and not (anyone or ExtendedKeyUsageOID.CLIENT_AUTH in purposes):
        raise QMPError(f"Certificate {path} purpose does not allow use with a TLS client")


def _check_authority_chain(
    chain: list[Certificate], cas: list[Certificate], ca_path: str, is_server: bool
) -> None:
    """Each certificate of the chain issued by the next; from the last, CAs of ``ca-cert.pem``
    lead up to a self-signed one, each checked as a CA."""
    for cert, issuer in zip(chain, chain[1:], strict=False):
        if cert.issuer != issuer.subject:
            raise QMPError(
                f"Cert '{name_text(issuer.subject)}' does not match issuer of cert "
                f"'{name_text(cert.subject)}'"
            )
    cert = chain[-1]
    for _ in range(len(cas) + 1):
        if cert.issuer == cert.subject:  # self-signed: the root of trust
            _check_cert(cert, ca_path, is_server, is_ca=True)
            return
        issuer = next((ca for ca in cas if ca.subject == cert.issuer), None)
        if issuer is None:
            break
        _check_cert(issuer, ca_path, is_server, is_ca=True)
        cert = issuer
    raise QMPError(f"Cert '{name_text(cert.subject)}' has no issuer in CA chain")


def _check_signed(identity: Identity, cas: list[Certificate], ca_path: str) -> None:
    """The chain verifies against the CAs (signatures)."""
    chain = identity.chain
    for cert, issuer in zip(chain, chain[1:], strict=False):
        if not _signed_by(cert, issuer):
            _not_valid(identity, ca_path, "The certificate is not trusted")
    top = chain[-1]
    issuers = [ca for ca in cas if ca.subject == top.issuer]
    if not issuers:
        _not_valid(identity, ca_path, "The certificate hasn't got a known issuer")
    if not any(_signed_by(top, ca) for ca in issuers):
        _not_valid(identity, ca_path, "The certificate is not trusted")


def _signed_by(cert: Certificate, issuer: Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not signed by it"
        return False


def _not_valid(identity: Identity, ca_path: str, reason: str) -> None:
    raise QMPError(
        f"Our own certificate {identity.cert_path} failed validation against {ca_path}: {reason}"
    )
