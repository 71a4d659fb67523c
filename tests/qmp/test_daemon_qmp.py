"""QMP and chardevs through the real ``qsd-py`` process, driven by qemu.qmp and raw sockets."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol
from support import Qsd, run_qsd

from qsd_py.qapi.schema import load_schema


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_qmpclient_session(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd()
    client = QMPClient("test")
    await client.connect(str(daemon.qmp_path))
    try:
        version = await client.execute("query-version")
        assert version["qemu"] == {"micro": 3, "minor": 1, "major": 11}
        assert version["package"].startswith("qsd-py ")
        names = [c["name"] for c in await client.execute("query-commands")]
        assert sorted(names) == sorted(load_schema().command_names())
        assert {"quit", "qmp_capabilities", "query-qmp-schema", "blockdev-add"} <= set(names)
        schema = await client.execute("query-qmp-schema")
        commands = {e["name"] for e in schema if e["meta-type"] == "command"}
        assert commands == set(names)
        assert await client.execute("quit") == {}
    finally:
        with contextlib.suppress(EOFError):  # the daemon may hang up first, as QEMU does
            await client.disconnect()
    assert daemon.wait(10) == 0
    assert not daemon.qmp_path.exists()  # the socket file goes with the daemon


def test_legacy_client_and_quit(qsd: Callable[..., Qsd]) -> None:
    daemon = qsd("--blockdev", "null-co,node-name=n0")
    client = daemon.qmp()
    try:
        assert client.cmd_raw("query-version")["return"]["qemu"]["major"] == 11
        reply = client.cmd_raw("no-such-command")
        assert reply["error"] == {
            "class": "CommandNotFound",
            "desc": "The command no-such-command has not been found",
        }
        assert client.cmd_raw("quit") == {"return": {}}
    finally:
        with contextlib.suppress(EOFError):  # the daemon hung up first, as QEMU does
            client.close()
    assert daemon.wait(10) == 0


def test_pretty_monitor(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    path = tmp_path / "pretty.sock"
    qsd("--chardev", f"socket,id=p,path={path},server=on,wait=off", "--monitor", "p,pretty=on")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.settimeout(5)
        reader = sock.makefile("rb")
        greeting = b"".join(reader.readline() for _ in range(15))
        assert greeting.startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n')
        assert greeting.endswith(
            b'        "capabilities": [\r\n            "oob"\r\n        ]\r\n    }\r\n}\r\n'
        )
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        assert (
            b"".join(reader.readline() for _ in range(4))
            == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
        )


def test_socket_created_0600_and_stale_replaced(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    daemon = qsd("--chardev", f"socket,id=s,path={path},server=on,wait=off", "--monitor", "s")
    assert path.stat().st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.settimeout(5)
        assert b'"QMP"' in sock.makefile("rb").readline()
    assert daemon.stop() == 0
    assert not path.exists()


def test_client_mode_connects_out(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    """Without server=on the daemon connects to a listening client (QEMU's iotests' way)."""
    path = tmp_path / "listen.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(15)
        daemon = qsd("--chardev", f"socket,id=c,path={path}", "--monitor", "c", qmp=False)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            reader = conn.makefile("rb")
            assert b'"QMP"' in reader.readline()
            conn.sendall(b'{"execute":"qmp_capabilities"}{"execute":"quit","id":1}')
            assert json.loads(reader.readline()) == {"return": {}}
            assert json.loads(reader.readline()) == {"return": {}, "id": 1}
            assert reader.readline() == b""  # then the daemon goes away
    assert daemon.wait(10) == 0


def test_wait_on_blocks_until_a_client(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    path = tmp_path / "wait.sock"
    daemon = qsd("--chardev", f"socket,id=w,path={path},server=on", "--monitor", "w", wait=False)
    deadline = time.monotonic() + 15
    while not path.exists():
        assert daemon.proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    assert not daemon.pidfile.exists()  # still waiting for its client
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        daemon.wait_ready()
        sock.settimeout(5)
        assert b'"QMP"' in sock.makefile("rb").readline()
    assert daemon.stop() == 0
    assert daemon.proc.stderr is not None
    assert (
        f"qsd-py: info: QEMU waiting for connection on: disconnected:unix:{path},server=on"
        in daemon.proc.stderr.read()
    )


async def test_tcp_loopback(qsd: Callable[..., Qsd]) -> None:
    port = free_port()
    chardev = f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off"
    daemon = qsd("--chardev", chardev, "--monitor", "t", qmp=False)
    client = QMPClient("tcp")
    await client.connect(("127.0.0.1", port))
    try:
        assert (await client.execute("query-version"))["qemu"]["minor"] == 1
    finally:
        await client.disconnect()
    assert daemon.stop() == 0


def test_bad_clients_do_not_hurt_the_daemon(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    path2 = tmp_path / "second.sock"
    daemon = qsd("--chardev", f"socket,id=b,path={path2},server=on,wait=off", "--monitor", "b")
    other = QEMUMonitorProtocol(str(path2))
    other.connect()
    try:
        for payload in (
            b"\xff garbage }}}] @@@ " * 1000,
            b'{"execute":"query-version","arguments":{"x":"' + b"A" * (10 << 20),  # cut short
            b'{"execute":"quit"',  # unterminated, then gone
        ):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(daemon.qmp_path))
                sock.settimeout(10)
                sock.makefile("rb").readline()
                sock.sendall(b'{"execute":"qmp_capabilities"}' + payload)
            assert other.cmd_raw("query-version")["return"]["qemu"]["major"] == 11
        client = daemon.qmp()  # the first monitor serves the next client
        assert client.cmd_raw("query-version")["return"]["qemu"]["major"] == 11
        client.close()
        assert daemon.proc.poll() is None
    finally:
        other.close()


def _cli(*args: str) -> tuple[int, str]:
    done = run_qsd(list(args))
    return done.returncode, done.stderr


CLI_ERRORS: list[tuple[list[str], str]] = [
    (["--chardev", "socket,id=m,path={d}/nonexist.sock", "--monitor", "m"],
     "qsd-py: --chardev socket,id=m,path={d}/nonexist.sock: "
     "Failed to connect to '{d}/nonexist.sock': No such file or directory"),
    (["--chardev", "socket,id=m"], "qsd-py: --chardev socket,id=m: Unable to parse FD number "),
    (["--chardev", "socket,id=m,path={d}/x.sock,server=on,wait=off,host=127.0.0.1,port=4444"],
     "qsd-py: --chardev socket,id=m,path={d}/x.sock,server=on,wait=off,host=127.0.0.1,port=4444: "
     "None or one of 'path', 'fd' or 'host' option required."),
    (["--chardev", "socket,id=m,host=127.0.0.1"],
     "qsd-py: --chardev socket,id=m,host=127.0.0.1: chardev: socket: no port given"),
    (["--chardev", "socket,id=m,path={d}/x.sock,wait=on"],
     "qsd-py: --chardev socket,id=m,path={d}/x.sock,wait=on: "
     "'wait' option is incompatible with socket in client connect mode"),
    (["--chardev", "socket,id=m,path={d}/nodir/x.sock,server=on,wait=off"],
     "qsd-py: --chardev socket,id=m,path={d}/nodir/x.sock,server=on,wait=off: "
     "Failed to bind socket to {d}/nodir/x.sock: No such file or directory"),
    (["--chardev", "socket,id=m,path={d}/x.sock,server=on,wait=off", "--monitor", "m",
      "--monitor", "m"], "qsd-py: --monitor m: chardev 'm' is already in use"),
    (["--chardev", "socket,id=m,host=127.0.0.1,port={closed}"],
     "qsd-py: --chardev socket,id=m,host=127.0.0.1,port={closed}: "
     "Failed to connect to '127.0.0.1:{closed}': Connection refused"),
    (["--chardev", "socket,id=m,host=127.0.0.1,port=abc,server=on,wait=off"],
     "qsd-py: --chardev socket,id=m,host=127.0.0.1,port=abc,server=on,wait=off: "
     "address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", CLI_ERRORS)
def test_cli_errors(tmp_path: Path, args: list[str], message: str) -> None:
    fill = {"d": str(tmp_path), "closed": str(free_port())}
    code, stderr = _cli(*(a.format(**fill) for a in args))
    assert code == 1
    assert stderr.splitlines()[-1] == message.format(**fill)


def test_regular_file_at_socket_path_is_kept(tmp_path: Path) -> None:
    """QEMU would delete the file; we refuse instead (see qsd_py/qmp/chardev.py)."""
    path = tmp_path / "precious"
    path.write_text("data")
    code, stderr = _cli("--chardev", f"socket,id=m,path={path},server=on,wait=off")
    assert code == 1
    assert stderr.strip().endswith(f"Failed to bind socket to {path}: Address already in use")
    assert path.read_text() == "data"


def test_sigterm_while_waiting_for_first_client(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsd_py", "--chardev", f"socket,id=w,path={path},server=on"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.terminate()
        assert proc.wait(15) == 0  # QEMU ignores SIGTERM until a client comes; we stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not path.exists()


def test_too_long_socket_path_and_its_hint(tmp_path: Path) -> None:
    """QEMU 11.1 prints the error's hint on a line of its own after it."""
    path = tmp_path / ("x" * 110)
    arg = f"socket,id=m,path={path},server=on,wait=off"
    code, stderr = _cli("--chardev", arg)
    assert code == 1
    assert stderr.splitlines() == [
        f"qsd-py: --chardev {arg}: UNIX socket path '{path}' is too long",
        "Path must be less than 108 bytes",
    ]
