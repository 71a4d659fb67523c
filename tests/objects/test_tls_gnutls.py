"""PSK and anonymous credentials against GnuTLS (QEMU's TLS library), with QEMU's priorities.

Our server context against ``gnutls-cli`` and our client context against ``gnutls-serv``,
over TLS 1.3 and 1.2: the right key gets the data through, a wrong key gets nothing.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsd_py.objects.tls_creds import TlsCredsAnon, TlsCredsPsk

KEY = "00112233445566778899aabbccddeeff"
# QEMU adds these key exchanges to GnuTLS's priority for PSK credentials.
QEMU_PSK = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"
VERSIONS = [(QEMU_PSK, "TLSv1.3"), (QEMU_PSK + ":-VERS-TLS1.3", "TLSv1.2")]


class EchoServer:
    """One TLS connection on 127.0.0.1 that echoes a line back."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.outcomes: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(20)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.outcomes.append(f"handshake {tls.version()}")
                tls.sendall(b"echo:" + tls.recv(100))
        except (ssl.SSLError, OSError) as err:
            self.outcomes.append(f"failed {err}")
            conn.close()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(20)


def gnutls_cli(port: int, *options: str) -> str:
    """Run gnutls-cli against ``port``, send a line, and return what it printed once the
    echo came back (or it gave up)."""
    proc = subprocess.Popen(
        ["gnutls-cli", *options, "--port", str(port), "127.0.0.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []
    try:
        proc.stdin.write("ping\n")
        proc.stdin.flush()
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        deadline = time.monotonic() + 20
        while not any("echo:ping" in line for line in lines) and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(5)
    return "".join(lines)


@pytest.fixture
def psk_server(tmp_path: Path) -> Iterator[EchoServer]:
    (tmp_path / "keys.psk").write_text(f"bob:ffff\nalice:{KEY}\n")
    creds = TlsCredsPsk("p", {"dir": str(tmp_path), "endpoint": "server"})
    server = EchoServer(creds.server_context())
    yield server
    server.close()


def test_gnutls_client_with_the_right_key(psk_server: EchoServer) -> None:
    """TLS 1.3 only: Debian 12's gnutls-cli (3.7.9) crashes right after any TLS 1.2 PSK
    handshake, gnutls-serv's own included; TLS 1.2 is proven against gnutls-serv below."""
    out = gnutls_cli(
        psk_server.port, "--pskusername=alice", f"--pskkey={KEY}", f"--priority={QEMU_PSK}"
    )
    psk_server.close()
    assert psk_server.outcomes == ["handshake TLSv1.3"], out
    assert "echo:ping" in out


def test_gnutls_client_with_a_wrong_key(psk_server: EchoServer) -> None:
    out = gnutls_cli(
        psk_server.port, "--pskusername=alice", f"--pskkey={'ff' * 16}", f"--priority={QEMU_PSK}"
    )
    psk_server.close()
    assert "echo:" not in out
    assert len(psk_server.outcomes) == 1 and psk_server.outcomes[0].startswith("failed"), out


def test_gnutls_client_anonymous() -> None:
    """tls-creds-anon against GnuTLS with QEMU's anonymous priority (+ANON-DH)."""
    server = EchoServer(TlsCredsAnon("a", {"endpoint": "server"}).server_context())
    try:
        out = gnutls_cli(server.port, "--priority=NORMAL:+ANON-DH")
    finally:
        server.close()
    assert server.outcomes == ["handshake TLSv1.2"], out
    assert "echo:ping" in out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("priority, version", VERSIONS)
def test_client_context_against_gnutls_server(tmp_path: Path, priority: str, version: str) -> None:
    (tmp_path / "keys.psk").write_text(f"alice:{KEY}\n")
    port = free_port()
    server = subprocess.Popen(
        ["gnutls-serv", "--port", str(port), "--pskpasswd", str(tmp_path / "keys.psk"),
         "--priority", priority, "--echo"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.05)
        right = TlsCredsPsk("c", {"dir": str(tmp_path), "endpoint": "client", "username": "alice"})
        with right.client_context().wrap_socket(
            socket.create_connection(("127.0.0.1", port), 10)
        ) as tls:
            tls.sendall(b"ping\n")
            assert tls.recv(100) == b"ping\n"
            assert tls.version() == version
        (tmp_path / "wrong").mkdir()
        (tmp_path / "wrong" / "keys.psk").write_text(f"alice:{'ff' * 16}\n")
        wrong = TlsCredsPsk(
            "c", {"dir": str(tmp_path / "wrong"), "endpoint": "client", "username": "alice"}
        )
        with pytest.raises(ssl.SSLError):
            wrong.client_context().wrap_socket(socket.create_connection(("127.0.0.1", port), 10))
    finally:
        server.terminate()
        server.wait(20)
