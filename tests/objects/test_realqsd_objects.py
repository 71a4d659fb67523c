"""Credential objects refused with the same words as QEMU's qemu-storage-daemon (optional:
``--real-qsd``). Each case builds a credentials directory under /tmp/qsd-cmp, which both
daemons see, and gives both the same ``--object``."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certs import DAY, NOW, Pki, name
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from realqsd_support import SHARE, run_real
from support import run_qsd

pytestmark = pytest.mark.realqsd


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = SHARE / f"objects-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def junk(path: Path, *names: str) -> Path:
    for file in names:
        (path / file).write_text("junk\n")
    return path


def swap_key(pki: Pki, path: Path) -> Path:
    other = pki.server_dir(path.parent / f"{path.name}-other")
    (path / "server-key.pem").write_bytes((other / "server-key.pem").read_bytes())
    return path


def orphan(pki: Pki, path: Path) -> Path:
    pki.server_dir(path)
    (path / "ca-cert.pem").write_bytes(pki.issue(name((NameOID.COMMON_NAME, "leaf"))).cert_pem())
    return path


def wrong_purpose(pki: Pki, path: Path) -> Path:
    pki.ca_only_dir(path)
    cert = pki.issue(name((NameOID.COMMON_NAME, "c")), purpose=ExtendedKeyUsageOID.CLIENT_AUTH)
    (path / "server-cert.pem").write_bytes(cert.cert_pem())
    (path / "server-key.pem").write_bytes(cert.key_pem())
    return path


def psk(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "keys.psk").write_text(text)
    return path


def without(path: Path, file: str) -> Path:
    (path / file).unlink()
    return path


SERVER = "tls-creds-x509,id=t,endpoint=server,dir={d}"
CLIENT = "tls-creds-x509,id=t,endpoint=client,dir={d}"

# (how to make the directory, the --object argument with {d} for it)
CASES: list[tuple[Callable[[Pki, Path], Path], str]] = [
    (lambda p, d: d, SERVER + "/none"),
    (lambda p, d: p.ca_only_dir(d), SERVER),
    (lambda p, d: p.ca_only_dir(d), CLIENT + ",verify-peer=off"),
    (lambda p, d: without(p.server_dir(d), "server-key.pem"), SERVER),
    (lambda p, d: without(p.server_dir(d), "server-cert.pem"), SERVER),
    (lambda p, d: junk(p.server_dir(d), "server-cert.pem"), SERVER),
    (lambda p, d: junk(p.client_dir(d), "ca-cert.pem"), CLIENT),
    (lambda p, d: swap_key(p, p.server_dir(d)), SERVER + ",sanity-check=off"),
    (lambda p, d: p.server_dir(d, start=NOW - 9 * DAY, end=NOW - DAY), SERVER),
    (lambda p, d: p.client_dir(d, start=NOW + DAY, end=NOW + 9 * DAY), CLIENT),
    (wrong_purpose, SERVER),
    (orphan, SERVER),
    (lambda p, d: junk(p.server_dir(d), "ca-crl.pem"), SERVER),
    (lambda p, d: p.server_dir(d), SERVER + ",passwordid=s0"),
    (lambda p, d: junk(p.server_dir(d), "dh-params.pem"), SERVER),
    (lambda p, d: d, "tls-creds-psk,id=t,endpoint=server"),
    (
        lambda p, d: psk(d, "qemu:0011\n"),
        "tls-creds-psk,id=t,endpoint=server,dir={d},username=qemu",
    ),
    (lambda p, d: psk(d, "alice:0011\n"), "tls-creds-psk,id=t,endpoint=client,dir={d}"),
    (lambda p, d: psk(d, "qemu:zz11\n"), "tls-creds-psk,id=t,endpoint=client,dir={d}"),
    (lambda p, d: psk(d, "qemu:0011\n"), "tls-creds-psk,id=t,endpoint=client,dir={d}/none"),
    (lambda p, d: d, "authz-simple,id=a"),
    (lambda p, d: d, "authz-list,id=a,rules.0.match=x"),
    (lambda p, d: d, "authz-list,id=a,policy=maybe"),
]


def errors(text: str, program: str) -> list[str]:
    """The error lines, without the program name (QEMU's deprecation warnings left out)."""
    return [
        line.removeprefix(f"{program}: ")
        for line in text.splitlines()
        if line.strip() and "warning:" not in line
    ]


@pytest.mark.parametrize(("make", "arg"), CASES)
def test_same_outcome_as_qemu(
    pki: Pki, shared_dir: Path, make: Callable[[Pki, Path], Path], arg: str
) -> None:
    target = shared_dir / "creds"
    made = make(pki, target)
    argument = arg.format(d=made)
    real_code, real_err = run_real(["--object", argument], timeout=5)
    ours = run_qsd(["--object", argument], timeout=5) if real_code is not None else None
    if real_code is None:  # QEMU accepted it and went on running: so must we
        with pytest.raises(Exception, match="timed out"):
            run_qsd(["--object", argument], timeout=3)
        return
    assert ours is not None and ours.returncode == real_code
    assert errors(ours.stderr, "qsd-py") == errors(real_err, "qemu-storage-daemon")
