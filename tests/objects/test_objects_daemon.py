"""TLS credentials and authz objects through the daemon: ``--object`` and ``object-add``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from certs import Pki
from support import Qsd, run_qsd


def test_object_option_errors_in_qemus_words(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    arg = f"tls-creds-x509,id=t0,dir={missing}"
    done = run_qsd(["--object", arg])
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"qsd-py: --object {arg}: Unable to access credentials {missing}/ca-cert.pem: "
        "No such file or directory"
    )
    done = run_qsd(["--object", "authz-simple,id=a0"])
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "qsd-py: --object authz-simple,id=a0: Parameter 'identity' is missing"
    )


def test_object_add_and_del(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    creds = Pki().server_dir(tmp_path / "creds")
    (tmp_path / "psk").mkdir()
    (tmp_path / "psk" / "keys.psk").write_text("qemu:0011\n")
    daemon = qsd("--object", f"tls-creds-x509,id=x0,dir={creds},verify-peer=off")
    client = daemon.qmp()
    try:
        added = [
            {"qom-type": "tls-creds-psk", "id": "p0", "dir": str(tmp_path / "psk")},
            {
                "qom-type": "authz-list",
                "id": "a0",
                "policy": "deny",
                "rules": [{"match": "CN=*", "policy": "allow", "format": "glob"}],
            },
            {"qom-type": "authz-simple", "id": "a1", "identity": "CN=x"},
        ]
        for args in added:
            assert client.cmd_raw("object-add", args) == {"return": {}}
        again = client.cmd_raw("object-add", added[0])
        assert again["error"]["desc"] == (
            "attempt to add duplicate property 'p0' to object (type 'container')"
        )
        bad = client.cmd_raw(
            "object-add", {"qom-type": "tls-creds-psk", "id": "p1", "dir": str(tmp_path)}
        )
        assert bad["error"]["desc"] == (
            f"Unable to access credentials {tmp_path}/keys.psk: No such file or directory"
        )
        for obj_id in ("x0", "p0", "a0", "a1"):
            assert client.cmd_raw("object-del", {"id": obj_id}) == {"return": {}}
        gone = client.cmd_raw("object-del", {"id": "x0"})
        assert gone["error"]["desc"] == "object 'x0' not found"
    finally:
        client.close()
