"""Certificates for TLS tests, made with ``cryptography``: a CA, and server and client
certificates it signs, written into credential directories laid out as QEMU expects."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A name from (OID, value) pairs, in the order given (the first is the outermost)."""
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass
class Pki:
    """A CA and what it signs."""

    ca: Issued = field(init=False)

    def __post_init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = name((NameOID.COUNTRY_NAME, "GB"), (NameOID.COMMON_NAME, "qsd-py test CA"))
        cert = (
            self._builder(subject, subject, key.public_key(), NOW - DAY, NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        self.ca = Issued(cert, key)

    @staticmethod
    def _builder(
        subject: x509.Name,
        issuer: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        start: datetime.datetime,
        end: datetime.datetime,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )

    def issue(
        self,
        subject: x509.Name,
        *,
        hosts: list[str] | None = None,
        purpose: x509.ObjectIdentifier | None = None,
        start: datetime.datetime | None = None,
        end: datetime.datetime | None = None,
        ca: bool = False,
        signer: Issued | None = None,
    ) -> Issued:
        """A certificate for ``subject`` (DNS names ``hosts``), signed by our CA (or
        ``signer``); ``purpose`` is a critical extended key usage."""
        key = ec.generate_private_key(ec.SECP256R1())
        signer = signer or self.ca
        builder = self._builder(
            subject, signer.cert.subject, key.public_key(), start or NOW - DAY, end or NOW + 7 * DAY
        ).add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False
            )
        if purpose is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=True)
        return Issued(builder.sign(signer.key, hashes.SHA256()), key)

    def server_dir(self, path: Path, host: str = "localhost", **kw: object) -> Path:
        """dir= for a server: ca-cert.pem, server-cert.pem, server-key.pem."""
        server = self.issue(
            name((NameOID.COMMON_NAME, host)),
            hosts=[host],
            purpose=ExtendedKeyUsageOID.SERVER_AUTH,
            **kw,  # type: ignore[arg-type]
        )
        return self._write(path, "server", server)

    def client_dir(self, path: Path, subject: x509.Name | None = None, **kw: object) -> Path:
        """dir= for a client: ca-cert.pem, client-cert.pem, client-key.pem."""
        subject = subject or CLIENT_NAME
        client = self.issue(subject, purpose=ExtendedKeyUsageOID.CLIENT_AUTH, **kw)  # type: ignore[arg-type]
        return self._write(path, "client", client)

    def ca_only_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "ca-cert.pem").write_bytes(self.ca.cert_pem())
        return path

    def _write(self, path: Path, role: str, issued: Issued) -> Path:
        self.ca_only_dir(path)
        (path / f"{role}-cert.pem").write_bytes(issued.cert_pem())
        (path / f"{role}-key.pem").write_bytes(issued.key_pem())
        return path


# The client of most tests, and the distinguished name QEMU 11.1 gives it (seen in its
# "TLS x509 authz check for ... is denied").
CLIENT_NAME = name(
    (NameOID.COUNTRY_NAME, "GB"),
    (NameOID.ORGANIZATION_NAME, "qsd-py tests"),
    (NameOID.COMMON_NAME, "client one"),
)
CLIENT_DN = "C=GB,O=qsd-py tests,CN=client one"

# A name with escapes, more attribute types and QEMU 11.1's text for it.
ODD_NAME = name(
    (NameOID.COUNTRY_NAME, "GB"),
    (NameOID.ORGANIZATION_NAME, "a, b+c"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "unit"),
    (NameOID.COMMON_NAME, " lead#"),
    (NameOID.EMAIL_ADDRESS, "x@y.example"),
    (NameOID.DOMAIN_COMPONENT, "example"),
)
ODD_DN = "C=GB,O=a\\, b\\+c,OU=unit,CN=\\ lead#,EMAIL=x@y.example,DC=example"
