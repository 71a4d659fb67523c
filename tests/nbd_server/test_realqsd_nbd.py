"""The NBD server next to QEMU 11.1's (optional, ``--real-qsd``): the same QMP conversations
held with both daemons give the same replies and events in the same order; the same exports
look the same to libnbd's nbdinfo (the chroot's, which speaks extended headers); the QAPI
types are QEMU's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbd_bytes import open_export, request
from qmp_talk import Talk
from realqsd_support import SHARE, require_real_qsd

pytestmark = pytest.mark.realqsd

MIB = 1 << 20


class Pair:
    """qsd-py and QEMU's daemon started with the same arguments; ``@SIDE@`` in an
    argument or a QMP command becomes "ours" or "real", so each gets its own sockets."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.talks: dict[str, Talk] = {}
        for side in ("ours", "real"):
            qmp = workdir / f"{side}.qmp"
            argv = [a.replace("@SIDE@", side) for a in args] + [
                "--chardev", f"socket,id=m,path={qmp},server=on,wait=off",
                "--monitor", "chardev=m",
            ]  # fmt: skip
            if side == "ours":
                cmd = [sys.executable, "-m", "qsd_py", *argv]
            else:
                cmd = [str(require_real_qsd()), "run", "qemu-storage-daemon", *argv]
            with open(workdir / f"{side}.err", "wb") as err:
                self.procs[side] = subprocess.Popen(
                    cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err
                )
            deadline = time.monotonic() + 20
            while not qmp.exists():
                if time.monotonic() > deadline or self.procs[side].poll() is not None:
                    pytest.fail(f"{side} daemon did not come up")
                time.sleep(0.02)
            self.talks[side] = Talk(str(qmp))

    def sock(self, side: str) -> str:
        return str(self.workdir / f"{side}.nbd")

    def stderr_lines(self, side: str) -> list[str]:
        """What the daemon printed, without its program name (qsd-py prints none)."""
        text = (self.workdir / f"{side}.err").read_text()
        return [line.removeprefix("qemu-storage-daemon: ") for line in text.splitlines()]

    def close(self) -> None:
        for talk in self.talks.values():
            talk.close()
        for proc in self.procs.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Pairs:
    """Starts pairs in one work directory under the share both sides see."""

    def __init__(self) -> None:
        SHARE.mkdir(exist_ok=True)
        self.workdir = SHARE / f"nbd-{uuid.uuid4().hex[:8]}"
        self.workdir.mkdir()
        self.started: list[Pair] = []

    def __call__(self, *args: str) -> Pair:
        pair = Pair(self.workdir, [a.replace("@DIR@", str(self.workdir)) for a in args])
        self.started.append(pair)
        return pair

    def close(self) -> None:
        for pair in self.started:
            pair.close()
        subprocess.run(["rm", "-rf", str(self.workdir)], check=False)


@pytest.fixture
def pair_of() -> Iterator[Pairs]:
    pairs = Pairs()
    try:
        yield pairs
    finally:
        pairs.close()


def converse(pair: Pair, steps: list[tuple[str, Any]]) -> None:
    """Run ``steps`` on both daemons (``_connect`` opens an NBD client, ``_read`` sends it
    a read, ``_closed`` checks the server hung up, ``_sleep`` waits) and compare."""
    results: dict[str, list[Any]] = {}
    for side, talk in pair.talks.items():
        results[side] = out = []
        clients = []
        for name, args in steps:
            if name == "_sleep":
                time.sleep(args)
            elif name == "_connect":
                clients.append(open_export(pair.sock(side), args)[0])
            elif name == "_read":
                clients[-1].sendall(request(0, 0, 4096, cookie=7))
            elif name == "_closed":
                client = clients.pop(0)
                client.settimeout(5)
                out.append((name, client.recv(64)))
                client.close()
            else:
                args = json.loads(json.dumps(args).replace("@SIDE@", side))
                answer = talk.command(name, args)
                answer["after"] = talk.events_after(0.3)
                out.append((name, answer))
        for client in clients:
            client.close()
    for ours, real in zip(results["ours"], results["real"], strict=True):
        assert ours == real


NULL = "driver=null-co,node-name=n0,size=1048576"


def unix(pair_side: str = "@DIR@/@SIDE@.nbd") -> dict[str, Any]:
    return {"type": "unix", "data": {"path": pair_side}}


def test_server_and_export_errors(pair_of) -> None:
    pair = pair_of("--blockdev", NULL, "--blockdev", "null-co,node-name=n1,read-only=on",
                   "--object", "iothread,id=a", "--object", "iothread,id=b")  # fmt: skip
    long = "x" * 4097
    add = {"type": "nbd", "id": "e1", "node-name": "n0", "name": "x"}
    converse(pair, [
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"}),
        ("nbd-server-stop", None),
        ("nbd-server-add", {"device": "n0"}),
        ("nbd-server-remove", {"name": "n0"}),
        ("nbd-server-start", {"addr": unix(pair.sock("@SIDE@"))}),
        ("nbd-server-start", {"addr": unix(pair.sock("@SIDE@") + "2")}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"}),
        ("block-export-add", {**add, "name": "n0"}),
        ("block-export-add", {**add, "name": long}),
        ("block-export-add", {**add, "description": long}),
        ("block-export-add", {**add, "bitmaps": ["nope"]}),
        ("block-export-add", {**add, "bitmaps": [{"node": "n0", "name": "nope"}]}),
        ("block-export-add", {**add, "bitmaps": [{"node": "zz", "name": "nope"}]}),
        ("block-export-add", {**add, "iothread": ["a", "zz"], "fixed-iothread": True}),
        ("block-export-add", {**add, "iothread": []}),
        ("block-export-add", {**add, "iothread": ["a", "zz"]}),
        ("block-export-add", {**add, "iothread": ["a", "b"]}),
        ("block-export-add", {**add, "node-name": "n1", "writable": True}),
        ("nbd-server-add", {"device": "zz"}),
        ("nbd-server-add", {"device": "n1", "name": "ro", "writable": True}),
        ("block-export-add", {**add, "iothread": "a", "description": ""}),
        ("query-block-exports", None),
        ("block_resize", {"node-name": "n0", "size": 2 * MIB}),
        ("nbd-server-remove", {"name": "zz"}),
        ("nbd-server-remove", {"name": "ro", "mode": "hard"}),
        ("block-export-del", {"id": "e0", "mode": "safe"}),
        ("nbd-server-stop", None),
        ("query-block-exports", None),
        ("nbd-server-stop", None),
    ])  # fmt: skip


def test_address_errors(pair_of) -> None:
    pair = pair_of("--object", "iothread,id=a")
    converse(pair, [
        ("nbd-server-start", {"addr": unix("/nonexistent/dir/x.sock")}),
        ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nofd"}}}),
        ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "1", "port": "1"}}}),
        ("nbd-server-start",
         {"addr": {"type": "inet", "data": {"host": "no.such.host.invalid", "port": "1"}}}),
        ("nbd-server-start", {"addr": unix(pair.sock("@SIDE@")), "tls-creds": "nope"}),
        ("nbd-server-start", {"addr": unix(pair.sock("@SIDE@")), "tls-creds": "a"}),
        ("nbd-server-start",
         {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
        ("nbd-server-stop", None),
    ])  # fmt: skip


def test_deleting_exports_with_clients(pair_of) -> None:
    pair = pair_of(
        "--blockdev", "driver=null-co,node-name=n0,size=1048576,latency-ns=1500000000",
        "--nbd-server", "addr.type=unix,addr.path=@DIR@/@SIDE@.nbd",
    )  # fmt: skip
    converse(pair, [
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n0", "name": "other"}),
        ("_connect", "n0"),
        ("_sleep", 0.2),
        ("block-export-del", {"id": "e0"}),
        ("_read", None),
        ("_sleep", 0.2),
        ("block-export-del", {"id": "e0", "mode": "hard"}),
        ("query-block-exports", None),
        ("block-export-del", {"id": "e0", "mode": "hard"}),
        ("_closed", None),
        ("_sleep", 1.5),
        ("query-block-exports", None),
        ("_connect", "other"),
        ("nbd-server-stop", None),
        ("_closed", None),
    ])  # fmt: skip


def nbdinfo(sock: str, export: str, *extra: str) -> str:
    tool = require_real_qsd()
    done = subprocess.run(
        [str(tool), "run", "nbdinfo", *extra, f"nbd+unix:///{export}?socket={sock}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    ("node", "export", "name"),
    [
        (["--blockdev", NULL], "node-name=n0", "n0"),
        (["--blockdev", "driver=file,node-name=f0,filename=@DIR@/@SIDE@.raw,cache.direct=on",
          "--blockdev", "driver=raw,node-name=d0,file=f0"],
         "node-name=d0,writable=on,name=x,description=a disk,allocation-depth=on", "x"),
        (["--blockdev", "driver=file,node-name=f0,filename=@DIR@/@SIDE@.qcow2",
          "--blockdev", "driver=qcow2,node-name=q0,file=f0"],
         "node-name=q0,allocation-depth=on", "q0"),
    ],
)  # fmt: skip
def test_nbdinfo_sees_the_same_exports(
    pair_of: Pairs, node: list[str], export: str, name: str
) -> None:
    workdir_images(pair_of.workdir)
    pair = pair_of(*node, "--nbd-server", "addr.type=unix,addr.path=@DIR@/@SIDE@.nbd",
                   "--export", f"type=nbd,id=e0,{export}")  # fmt: skip
    infos = {}
    maps = {}
    for side in ("ours", "real"):
        info = json.loads(nbdinfo(pair.sock(side), name, "--json"))
        del info["exports"][0]["uri"]
        infos[side] = info
        maps[side] = [
            nbdinfo(pair.sock(side), name, f"--map={context}")
            for context in info["exports"][0]["contexts"]
        ]
    assert infos["ours"]["extended"] is True  # the chroot's libnbd asked for them
    assert infos["ours"] == infos["real"]
    assert maps["ours"] == maps["real"]


def workdir_images(workdir: Path) -> None:
    """The images the exports of the nbdinfo comparison use, one per daemon (they lock)."""
    for side in ("ours", "real"):
        raw = workdir / f"{side}.raw"
        with open(raw, "wb") as f:
            f.truncate(8 * MIB)
            f.write(b"\x01" * MIB)
            f.seek(4 * MIB)
            f.write(bytes(MIB))
        qcow2 = workdir / f"{side}.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                       check=True)  # fmt: skip


def test_qapi_types_are_qemus(pair_of) -> None:
    pair = pair_of()
    shapes = {}
    for side, talk in pair.talks.items():
        info = {e["name"]: e for e in talk.command("query-qmp-schema")["reply"]["return"]}
        export = info[info["block-export-add"]["arg-type"]]
        nbd_variant = next(v["type"] for v in export["variants"] if v["case"] == "nbd")
        shapes[side] = {
            name: _shape(info, info[name]["arg-type"])
            for name in ("nbd-server-start", "nbd-server-add", "nbd-server-remove",
                         "nbd-server-stop")
        }  # fmt: skip
        shapes[side]["features"] = {
            name: info[name].get("features", [])
            for name in ("nbd-server-add", "nbd-server-remove", "nbd-server-start")
        }
        shapes[side]["BlockExportOptionsNbd"] = _shape(info, nbd_variant)
        shapes[side]["export-types"] = [v["case"] for v in export["variants"]]
    ours, real = shapes["ours"], shapes["real"]
    assert ours["export-types"] == [t for t in real["export-types"] if t in ("nbd", "fuse")]
    del ours["export-types"], real["export-types"]
    assert ours == real


def _shape(info: dict[str, Any], name: str) -> Any:
    """A type of a query-qmp-schema answer with its masked names resolved."""
    entry = info[name]
    meta = entry["meta-type"]
    if meta == "builtin":
        return entry["name"]
    if meta == "enum":
        return entry["values"]
    if meta == "array":
        return [_shape(info, entry["element-type"])]
    if meta == "alternate":
        return {"alternate": [_shape(info, m["type"]) for m in entry["members"]]}
    shape: dict[str, Any] = {
        "members": [(m["name"], "default" in m, _shape(info, m["type"])) for m in entry["members"]]
    }
    if "variants" in entry:
        shape["variants"] = {v["case"]: _shape(info, v["type"]) for v in entry["variants"]}
    return shape


def test_tls_refusals_as_qemu(pair_of: Pairs) -> None:
    """The same clients against both TLS servers: a certificate of another CA, a name the
    authz object denies, a client without TLS: the same outcome and the same log lines."""
    from objects.certs import Pki

    pki = Pki()
    workdir = pair_of.workdir
    pki.server_dir(workdir / "server")
    good = pki.client_dir(workdir / "client")
    mixed = workdir / "mixed"
    stranger = Pki().client_dir(workdir / "stranger")
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
    for name in ("client-cert.pem", "client-key.pem"):
        (mixed / name).write_bytes((stranger / name).read_bytes())
    pair = pair_of(
        "--object", "tls-creds-x509,id=tls0,dir=@DIR@/server,endpoint=server",
        "--object", "authz-simple,id=az0,identity=CN=nobody",
        "--blockdev", NULL,
        "--nbd-server", "addr.type=unix,addr.path=@DIR@/@SIDE@.nbd,tls-creds=tls0,tls-authz=az0",
        "--export", "type=nbd,id=e0,node-name=n0",
    )  # fmt: skip
    outcomes = {}
    for side in ("ours", "real"):
        sock = pair.sock(side)
        codes = []
        for certs in (good, mixed, None):
            query = f"&tls-certificates={certs}" if certs else ""
            scheme = "nbds+unix" if certs else "nbd+unix"
            done = subprocess.run(
                ["nbdinfo", f"{scheme}:///n0?socket={sock}{query}"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            codes.append(done.returncode)
        outcomes[side] = codes
    pair.close()
    assert outcomes["ours"] == outcomes["real"] == [1, 1, 1]
    assert pair.stderr_lines("ours") == pair.stderr_lines("real")
    assert pair.stderr_lines("ours")[0].startswith("option negotiation failed: TLS x509 authz")
