"""The chardev commands against a qsd-py daemon: QEMU 11.1's replies (conversation.py), and
what the backends really open: a pty, files, sockets; ringbuf semantics against a model."""

from __future__ import annotations

import base64
import contextlib
import os
import random
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chardev.conversation import STEPS, expected, fill, normalize
from nbd_server.qmp_talk import Talk
from support import Qsd


@pytest.fixture
def talk(qsd: Callable[..., Qsd]) -> Iterator[tuple[Talk, Qsd]]:
    daemon = qsd()
    client = Talk(str(daemon.qmp_path))
    try:
        yield client, daemon
    finally:
        client.close()


def run(client: Talk, name: str, args: Any = None) -> Any:
    return client.command(name, args)["reply"]


def test_conversation_has_qemus_replies(talk: tuple[Talk, Qsd], tmp_path: Path) -> None:
    client, daemon = talk
    d = str(tmp_path)
    for (name, args), reply in STEPS:
        got = normalize(run(client, name, fill(args, d)), str(daemon.qmp_path))
        assert got == expected(reply, d), (name, args)
    assert not (tmp_path / "ptylink").exists()  # removed with p0
    assert not (tmp_path / "s0.sock").exists()


def test_pty_is_a_terminal_until_removed(talk: tuple[Talk, Qsd], tmp_path: Path) -> None:
    client, _ = talk
    link = tmp_path / "tty"
    reply = run(
        client, "chardev-add", {"id": "p", "backend": {"type": "pty", "data": {"path": str(link)}}}
    )
    path = reply["return"]["pty"]
    assert os.readlink(link) == path
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        assert os.isatty(fd) and os.ttyname(fd) == path
        assert os.write(fd, b"to the daemon") == 13  # held by the master side, unread
        with pytest.raises(BlockingIOError):
            os.read(fd, 10)  # the daemon writes nothing without a front end
        assert run(client, "chardev-remove", {"id": "p"}) == {"return": {}}
        assert not link.exists()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(5000)[0][1] & select.POLLHUP  # the master side is closed
    finally:
        os.close(fd)


def test_file_backend_truncates_or_appends(talk: tuple[Talk, Qsd], tmp_path: Path) -> None:
    client, _ = talk
    out, log = tmp_path / "out", tmp_path / "log"
    out.write_bytes(b"old")
    log.write_bytes(b"old log")
    data = {"out": str(out), "logfile": str(log), "logappend": True}
    assert run(client, "chardev-add", {"id": "f", "backend": {"type": "file", "data": data}}) == {
        "return": {}
    }
    assert out.read_bytes() == b"" and log.read_bytes() == b"old log"
    out.write_bytes(b"kept")
    data = {"out": str(out), "append": True, "logfile": str(log)}
    assert run(
        client, "chardev-change", {"id": "f", "backend": {"type": "file", "data": data}}
    ) == {"return": {}}
    assert out.read_bytes() == b"kept" and log.read_bytes() == b""
    # QEMU's ringbuf-write stores into the ring without logging: the log stays empty
    ring = {"logfile": str(log), "size": 8}
    run(client, "chardev-add", {"id": "r", "backend": {"type": "ringbuf", "data": ring}})
    run(client, "ringbuf-write", {"device": "r", "data": "abc"})
    assert log.read_bytes() == b""


def _filename(client: Talk, label: str) -> str:
    chardevs = run(client, "query-chardev")["return"]
    return next(c["filename"] for c in chardevs if c["label"] == label)


def _wait_filename(client: Talk, label: str, want: Callable[[str], bool]) -> str:
    deadline = time.monotonic() + 10
    while not want(name := _filename(client, label)):
        assert time.monotonic() < deadline, name
        time.sleep(0.02)
    return name


def test_socket_server_takes_one_client_after_another(
    talk: tuple[Talk, Qsd], tmp_path: Path
) -> None:
    client, _ = talk
    path = str(tmp_path / "s.sock")
    addr = {"type": "unix", "data": {"path": path}}
    run(client, "chardev-add", {"id": "s", "backend": {"type": "socket", "data": {"addr": addr}}})
    assert _filename(client, "s") == f"disconnected:unix:{path},server=on"
    for _ in range(2):
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(path)
            peer.sendall(b"dropped" * 1000)
            _wait_filename(client, "s", lambda n: n == f"unix:{path},server=on")
        _wait_filename(client, "s", lambda n: n.startswith("disconnected:"))
    assert run(client, "chardev-remove", {"id": "s"}) == {"return": {}}
    assert not os.path.exists(path)


def test_tcp_server_names_its_peer(talk: tuple[Talk, Qsd]) -> None:
    client, _ = talk
    addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}
    run(client, "chardev-add", {"id": "t", "backend": {"type": "socket", "data": {"addr": addr}}})
    port = int(_filename(client, "t").split(":")[-1].split(",")[0])
    with socket.create_connection(("127.0.0.1", port)) as peer:
        mine = peer.getsockname()[1]
        want = f"tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{mine}"
        _wait_filename(client, "t", lambda n: n == want)


def test_client_reconnects(talk: tuple[Talk, Qsd], tmp_path: Path) -> None:
    client, daemon = talk
    path = str(tmp_path / "c.sock")
    data = {"addr": {"type": "unix", "data": {"path": path}}, "server": False, "reconnect-ms": 50}
    assert run(client, "chardev-add", {"id": "c", "backend": {"type": "socket", "data": data}}) == {
        "return": {}
    }
    assert _filename(client, "c") == f"disconnected:unix:{path}"
    time.sleep(0.3)  # a few failed attempts, reported once (below)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)
        conn, _ = listener.accept()
        _wait_filename(client, "c", lambda n: n == f"unix:{path}")
        conn.close()
        conn, _ = listener.accept()  # and again after the connection ends
        conn.close()
    run(client, "chardev-remove", {"id": "c"})
    daemon.stop()
    assert daemon.proc.stderr is not None
    unable = f"qsd-py: Unable to connect character device c: Failed to connect to '{path}': "
    # several failed attempts before the socket existed, reported once
    assert daemon.proc.stderr.read().count(f"{unable}No such file or directory\n") == 1


def test_ringbuf_against_a_model(talk: tuple[Talk, Qsd]) -> None:
    """Random writes (utf8 and base64) and reads against a Python ring of the same size."""
    client, _ = talk
    rng = random.Random(20)
    for size in (1, 8, 64):
        run(
            client,
            "chardev-add",
            {"id": f"q{size}", "backend": {"type": "ringbuf", "data": {"size": size}}},
        )
        model = bytearray()
        for _ in range(60):
            if rng.random() < 0.5:
                blob = rng.randbytes(rng.randrange(0, 3 * size))
                if rng.random() < 0.5:
                    args = {"data": base64.b64encode(blob).decode(), "format": "base64"}
                else:
                    blob = "".join(
                        chr(rng.choice([0x41, 0xE9, 0x20AC, 0x1F600])) for _ in blob
                    ).encode()
                    args = {"data": blob.decode()}
                assert run(client, "ringbuf-write", {"device": f"q{size}", **args}) == {
                    "return": {}
                }
                model += blob
                del model[: max(0, len(model) - size)]
            else:
                count = rng.randrange(1, 2 * size + 1)
                reply = run(
                    client,
                    "ringbuf-read",
                    {"device": f"q{size}", "size": count, "format": "base64"},
                )
                assert base64.b64decode(reply["return"]) == model[:count]
                del model[:count]


def test_shutdown_closes_chardevs(talk: tuple[Talk, Qsd], tmp_path: Path) -> None:
    """A listening chardev's socket file and a pty's link go with the daemon; the pty hangs up."""
    client, daemon = talk
    sock, link = tmp_path / "s.sock", tmp_path / "tty"
    addr = {"type": "unix", "data": {"path": str(sock)}}
    run(client, "chardev-add", {"id": "s", "backend": {"type": "socket", "data": {"addr": addr}}})
    pty = run(
        client, "chardev-add", {"id": "p", "backend": {"type": "pty", "data": {"path": str(link)}}}
    )
    fd = os.open(pty["return"]["pty"], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        assert sock.exists() and link.is_symlink()
        assert daemon.stop() == 0
        assert not sock.exists() and not link.is_symlink()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(5000)[0][1] & select.POLLHUP
    finally:
        os.close(fd)


def test_udp_holds_its_local_port(talk: tuple[Talk, Qsd]) -> None:
    client, _ = talk
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        remote = {"type": "inet", "data": {"host": "127.0.0.1", "port": "9"}}
        local = {"type": "inet", "data": {"host": "127.0.0.1", "port": port}}
        backend = {"type": "udp", "data": {"remote": remote, "local": local}}
        reply = run(client, "chardev-add", {"id": "u", "backend": backend})
        desc = "Failed to add chardev 'u': Failed to bind socket: Address already in use"
        assert reply == {"error": {"class": "GenericError", "desc": desc}}
    assert run(client, "chardev-add", {"id": "u", "backend": backend}) == {"return": {}}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        with pytest.raises(OSError):
            again.bind(("127.0.0.1", int(port)))  # the chardev has it
        run(client, "chardev-remove", {"id": "u"})
        again.bind(("127.0.0.1", int(port)))


def _open_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            out.append(os.readlink(fd))
    return out


def test_pipe_and_serial_hold_their_files(talk: tuple[Talk, Qsd], tmp_path: Path) -> None:
    """A pipe opens PATH.in and PATH.out when both exist, else PATH; a serial line its
    device; each is closed on chardev-remove."""
    client, daemon = talk
    pair, single = tmp_path / "pair", tmp_path / "single"
    for fifo in (f"{pair}.in", f"{pair}.out", str(single)):
        os.mkfifo(fifo)
    devices = {
        "pp": ("pipe", str(pair), [f"{pair}.in", f"{pair}.out"]),
        "ps": ("pipe", str(single), [str(single)]),
        "se": ("serial", "/dev/null", ["/dev/null"]),
    }
    for chardev_id, (kind, device, _) in devices.items():
        backend = {"type": kind, "data": {"device": device}}
        assert run(client, "chardev-add", {"id": chardev_id, "backend": backend}) == {"return": {}}
    held = _open_files(daemon.proc.pid)
    for _, _, files in devices.values():
        assert all(f in held for f in files), files
    for chardev_id in devices:
        run(client, "chardev-remove", {"id": chardev_id})
    held = _open_files(daemon.proc.pid)
    assert not any(f.startswith(str(tmp_path)) for f in held)
