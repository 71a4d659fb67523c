"""The NBD server's QMP and command-line surface: the commands, their errors and events,
in the order QEMU 11.1 sends them (tests/nbd_server/test_realqsd_nbd.py holds the same
conversations against QEMU's daemon)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from nbd_bytes import open_export, request
from nbd_support import nbdinfo_json, run
from qmp_talk import Talk
from support import run_qsd

NULL = "driver=null-co,node-name=n0,size=1048576"


def talk(daemon) -> Talk:
    return Talk(str(daemon.qmp_path))


def error(reply: dict) -> str:
    return reply["reply"]["error"]["desc"]


def test_server_start_stop_and_their_errors(qsd, tmp_path: Path) -> None:
    daemon = qsd("--blockdev", NULL)
    t = talk(daemon)
    sock = str(tmp_path / "nbd.sock")
    unix = {"type": "unix", "data": {"path": sock}}
    add = {"type": "nbd", "id": "e0", "node-name": "n0"}
    assert error(t.command("block-export-add", add)) == "NBD server not running"
    assert error(t.command("nbd-server-stop")) == "NBD server not running"
    assert error(t.command("nbd-server-add", {"device": "n0"})) == "NBD server not running"
    assert t.command("nbd-server-start", {"addr": unix})["reply"] == {"return": {}}
    assert Path(sock).is_socket()
    assert error(t.command("nbd-server-start", {"addr": unix})) == "NBD server already running"
    assert t.command("block-export-add", add)["reply"] == {"return": {}}
    dup = {**add, "id": "e1"}
    assert error(t.command("block-export-add", dup)) == "NBD server already has export named 'n0'"
    long = "x" * 4097
    assert error(t.command("block-export-add", {**dup, "name": long})) == (
        f"export name '{long}' too long"
    )
    assert error(t.command("block-export-add", {**dup, "name": "y", "description": long})) == (
        f"description '{long}' too long"
    )
    assert error(t.command("block-export-add", {**dup, "name": "y", "bitmaps": ["b"]})) == (
        "Bitmap 'b' is not found"
    )
    bitmap = {"node": "n0", "name": "b"}
    assert error(t.command("block-export-add", {**dup, "name": "y", "bitmaps": [bitmap]})) == (
        "Dirty bitmap 'b' not found"
    )
    bitmap = {"node": "zz", "name": "b"}
    assert error(t.command("block-export-add", {**dup, "name": "y", "bitmaps": [bitmap]})) == (
        "Node 'zz' not found"
    )
    assert error(t.command("nbd-server-add", {"device": "zz"})) == (
        "Cannot find device='zz' nor node-name='zz'"
    )
    assert t.command("nbd-server-add", {"device": "n0", "name": "old"})["reply"] == {"return": {}}
    exports = t.command("query-block-exports")["reply"]["return"]
    assert [(e["id"], e["type"]) for e in exports] == [("old", "nbd"), ("e0", "nbd")]
    assert error(t.command("nbd-server-remove", {"name": "zz"})) == "Export 'zz' is not found"
    removed = t.command("nbd-server-remove", {"name": "old"})
    assert removed == {
        "reply": {"return": {}},
        "events": ['BLOCK_EXPORT_DELETED {"id": "old"}'],
    }
    stopped = t.command("nbd-server-stop")
    assert stopped["events"] == ['BLOCK_EXPORT_DELETED {"id": "e0"}']
    assert t.command("query-block-exports")["reply"] == {"return": []}
    assert not Path(sock).exists()
    t.close()


def test_fd_and_tls_errors(qsd, tmp_path: Path) -> None:
    daemon = qsd("--object", "iothread,id=io0")
    t = talk(daemon)
    fd = {"type": "fd", "data": {"str": "3"}}
    assert error(t.command("nbd-server-start", {"addr": fd})) == (
        "only QEMU supports file descriptor passing"
    )
    unix = {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}
    assert error(t.command("nbd-server-start", {"addr": unix, "tls-creds": "nope"})) == (
        "No TLS credentials with id 'nope'"
    )
    assert error(t.command("nbd-server-start", {"addr": unix, "tls-creds": "io0"})) == (
        "Object with id 'io0' is not TLS credentials"
    )
    bad = {"type": "unix", "data": {"path": "/nonexistent/dir/x.sock"}}
    assert error(t.command("nbd-server-start", {"addr": bad})) == (
        "Failed to bind socket to /nonexistent/dir/x.sock: No such file or directory"
    )
    t.close()


def test_iothread_rules(qsd, tmp_path: Path) -> None:
    daemon = qsd(
        "--blockdev", NULL, "--object", "iothread,id=a", "--object", "iothread,id=b",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'n.sock'}",
    )  # fmt: skip
    t = talk(daemon)
    add = {"type": "nbd", "id": "e0", "node-name": "n0"}
    cases = [
        ({"iothread": ["a", "zz"], "fixed-iothread": True},
         "Cannot use fixed-iothread for a multi-threaded export"),
        ({"iothread": []}, "The set of I/O threads must not be empty"),
        ({"iothread": ["a", "zz"]}, 'iothread "zz" not found'),
        ({"iothread": ["a", "b"]}, "NBD export does not support multi-threading"),
        ({"iothread": "zz"}, 'iothread "zz" not found'),
    ]  # fmt: skip
    for extra, message in cases:
        assert error(t.command("block-export-add", {**add, **extra})) == message
    t.close()


def test_export_on_an_iothread_serves_clients(nbd_daemon, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * 4096)
    daemon = nbd_daemon(
        "--object", "iothread,id=io0",
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=d0,file=f0",
        "--export", "type=nbd,id=e0,node-name=d0,iothread=io0,writable=on",
    )  # fmt: skip
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("d0"), str(out))
    assert out.read_bytes() == img.read_bytes()
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 65536", daemon.uri("d0"))
    assert img.read_bytes()[:65536] == b"\x33" * 65536
    # deleting the export hangs up on a client served by the iothread
    sock, _ = open_export(str(daemon.sock), "d0")
    t = talk(daemon.daemon)
    assert error(t.command("block-export-del", {"id": "e0"})) == "export 'e0' still in use"
    deleted = t.command("block-export-del", {"id": "e0", "mode": "hard"})
    assert deleted["reply"] == {"return": {}}
    assert 'BLOCK_EXPORT_DELETED {"id": "e0"}' in deleted["events"] + t.events_after(2)
    sock.settimeout(5)
    assert sock.recv(16) == b""
    sock.close()
    t.close()


def test_hard_delete_returns_before_the_clients_are_gone(nbd_daemon) -> None:
    """A client's request still running keeps the export, shutting down, until it ends;
    the event comes after the command's return, as in QEMU."""
    daemon = nbd_daemon(
        "--blockdev", "driver=null-co,node-name=n0,size=1048576,latency-ns=1500000000",
        "--export", "type=nbd,id=e0,node-name=n0",
    )  # fmt: skip
    t = talk(daemon.daemon)
    sock, _ = open_export(str(daemon.sock), "n0")
    sock.sendall(request(0, 0, 4096, cookie=1))
    time.sleep(0.2)
    deleted = t.command("block-export-del", {"id": "e0", "mode": "hard"})
    assert deleted == {"reply": {"return": {}}, "events": []}
    exports = t.command("query-block-exports")["reply"]["return"]
    assert exports == [{"type": "nbd", "id": "e0", "node-name": "n0", "shutting-down": True}]
    for mode in ("hard", "safe"):
        again = t.command("block-export-del", {"id": "e0", "mode": mode})
        assert error(again) == "Export 'e0' is already shutting down"
    sock.settimeout(5)
    assert sock.recv(16) == b""  # hung up on at once, without the reply
    assert t.events_after(3) == ['BLOCK_EXPORT_DELETED {"id": "e0"}']
    assert t.command("query-block-exports")["reply"] == {"return": []}
    sock.close()
    t.close()


def test_export_blocks_resize_and_node_deletion(qsd, tmp_path: Path) -> None:
    daemon = qsd(
        "--blockdev", NULL,
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'n.sock'}",
        "--export", "type=nbd,id=e0,node-name=n0,writable=on",
    )  # fmt: skip
    t = talk(daemon)
    resize = t.command("block_resize", {"node-name": "n0", "size": 2 << 20})
    assert error(resize).startswith("Permission conflict on node 'n0': permissions 'resize'")
    assert error(t.command("blockdev-del", {"node-name": "n0"})) == "Node n0 is in use"
    t.close()


def test_max_connections_1_drops_multi_conn(nbd_daemon, tmp_path: Path) -> None:
    daemon = nbd_daemon(
        "--blockdev", NULL, "--export", "type=nbd,id=e0,node-name=n0,writable=on",
        server_opts=",max-connections=1",
    )  # fmt: skip
    (export,) = nbdinfo_json(daemon.sock, "n0")["exports"]
    assert export["can_multi_conn"] is False
    assert export["is_read_only"] is False


def test_tcp_listener(qsd) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    qsd(
        "--blockdev", NULL,
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export", "type=nbd,id=e0,node-name=n0,description=over tcp",
    )  # fmt: skip
    info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/n0").stdout)
    assert info["exports"][0]["description"] == "over tcp"


def test_fd_listener_serves_clients(qsd, tmp_path: Path) -> None:
    """``addr.type=fd`` on the command line: the daemon listens on a socket it inherited
    (bound, not yet listening, as a service manager hands it over) and serves clients on
    it; the path was never the daemon's, so stopping does not remove it."""
    path = tmp_path / "inherited.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        fd = sock.fileno()
        daemon = qsd(
            "--blockdev", NULL,
            "--nbd-server", f"addr.type=fd,addr.str={fd}",
            "--export", "type=nbd,id=e0,node-name=n0,description=inherited",
            pass_fds=(fd,),
        )  # fmt: skip
    finally:
        sock.close()  # the daemon holds its own copy now
    uri = f"nbd+unix:///n0?socket={path}"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["exports"][0]["description"] == "inherited"
    assert info["exports"][0]["export-size"] == 1048576
    assert talk(daemon).command("nbd-server-stop")["reply"] == {"return": {}}
    refused = run("nbdinfo", uri, check=False)
    assert refused.returncode != 0
    assert path.exists()


def test_command_line_errors(tmp_path: Path) -> None:
    sock = tmp_path / "n.sock"
    cases = [
        (["--blockdev", "null-co,node-name=n0", "--export", "nbd,id=e0,node-name=n0"],
         "--export nbd,id=e0,node-name=n0: NBD server not running"),
        (["--nbd-server", f"addr.type=unix,addr.path={sock}",
          "--nbd-server", f"addr.type=unix,addr.path={sock}2"],
         f"--nbd-server addr.type=unix,addr.path={sock}2: NBD server already running"),
        (["--nbd-server", "addr.type=fd,addr.str=nofd"],
         "--nbd-server addr.type=fd,addr.str=nofd: Unable to parse FD number nofd"),
        (["--nbd-server", "addr.type=fd,addr.str=99"],
         "--nbd-server addr.type=fd,addr.str=99: File descriptor '99' is not a socket"),
        (["--nbd-server", "addr.type=vsock,addr.cid=x,addr.port=1"],
         "--nbd-server addr.type=vsock,addr.cid=x,addr.port=1: Failed to parse cid 'x'"),
        (["--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=x"],
         f"--nbd-server addr.type=unix,addr.path={sock},tls-creds=x: "
         "No TLS credentials with id 'x'"),
    ]  # fmt: skip
    for argv, message in cases:
        done = run_qsd(argv)
        assert done.returncode == 1
        assert done.stderr.strip() == f"qsd-py: {message}"
    assert not sock.exists()  # the server of a failed start-up is gone with its socket
