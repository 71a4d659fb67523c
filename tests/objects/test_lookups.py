"""How the NBD layers look objects up by id: QEMU 11.1's texts for a wrong id or kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from certs import Pki

from qsd_py.errors import QMPError
from qsd_py.objects.registry import ObjectRegistry


def test_tls_creds_and_authz_lookups(tmp_path: Path) -> None:
    objects = ObjectRegistry()
    try:
        objects.add({"qom-type": "iothread", "id": "io0"})
        client_dir = Pki().client_dir(tmp_path / "c")
        objects.add({"qom-type": "tls-creds-x509", "id": "cli", "dir": str(client_dir)})
        objects.add({"qom-type": "authz-simple", "id": "a0", "identity": "C=GB"})

        def error(call, *args: str) -> str:  # type: ignore[no-untyped-def]
            with pytest.raises(QMPError) as err:
                call(*args)
            return err.value.desc

        assert error(objects.tls_creds, "nope", "server") == "No TLS credentials with id 'nope'"
        assert error(objects.tls_creds, "io0", "server") == (
            "Object with id 'io0' is not TLS credentials"
        )
        assert error(objects.tls_creds, "cli", "server") == (
            "Expected TLS credentials for a server endpoint"
        )
        assert objects.tls_creds("cli", "client").endpoint == "client"
        assert error(objects.authz, "nope") == "Cannot find QAuthZ object ID nope"
        assert error(objects.authz, "cli") == "Object 'cli' is not a QAuthZ subclass"
        assert objects.authz("a0").is_allowed("C=GB")
        assert error(objects.iothread, "a0") == 'iothread "a0" not found'
    finally:
        objects.stop_all()
