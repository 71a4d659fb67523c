"""One QMP conversation about chardevs, with the replies QEMU 11.1's daemon gives.

Both tests/chardev/test_chardev_qmp.py (against qsd-py) and test_realqsd_chardev.py (against
QEMU, opt-in) hold it step by step and compare each reply, made comparable by
:func:`normalize` (pty numbers, TCP ports, the monitor's socket path and query-chardev's
order differ between runs and daemons).  ``{d}`` in arguments is a scratch directory.
"""

from __future__ import annotations

import json
import re
from typing import Any

OK: dict[str, Any] = {"return": {}}


def err(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


def add_err(chardev_id: str, desc: str) -> dict[str, Any]:
    return err(f"Failed to add chardev '{chardev_id}': {desc}")


def add(chardev_id: str, kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return "chardev-add", {"id": chardev_id, "backend": {"type": kind, "data": data}}


def unix(path: str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": path}}


def inet(host: str, port: str) -> dict[str, Any]:
    return {"type": "inet", "data": {"host": host, "port": port}}


def info(label: str, filename: str, open_: bool = False) -> dict[str, Any]:
    return {"frontend-open": open_, "filename": filename, "label": label}


NOENT = "No such file or directory"
NOSERV = "Servname not supported for ai_socktype"
BACKENDS = [
    "hub", "serial", "mux", "pipe", "parallel", "null", "ringbuf",
    "socket", "stdio", "memory", "udp", "file", "pty",
]  # fmt: skip

STEPS: list[tuple[tuple[str, dict[str, Any] | None], dict[str, Any]]] = [
    (("query-chardev-backends", None), {"return": [{"name": n} for n in BACKENDS]}),
    # ringbuf: power-of-two size, overwrite of the oldest bytes, utf8 and base64
    (add("r0", "ringbuf", size=16), OK),
    (("ringbuf-write", {"device": "r0", "data": "hello world, this is long"}), OK),
    (("ringbuf-read", {"device": "r0", "size": 100}), {"return": "ld, this is long"}),
    (("ringbuf-write", {"device": "r0", "data": "aGk=", "format": "base64"}), OK),
    (("ringbuf-read", {"device": "r0", "size": 1, "format": "base64"}), {"return": "aA=="}),
    (("ringbuf-read", {"device": "r0", "size": 5}), {"return": "i"}),
    (("ringbuf-read", {"device": "qmp0", "size": 1}), err("qmp0 is not a ringbuf device")),
    (("ringbuf-read", {"device": "zz", "size": 1}), err("Device 'zz' not found")),
    (("ringbuf-read", {"device": "r0", "size": 0}), err("size must be greater than zero")),
    (("ringbuf-read", {"device": "r0", "size": -1}), err("size must be greater than zero")),
    (
        ("ringbuf-write", {"device": "r0", "data": "!!!", "format": "base64"}),
        err("Base64 data contains invalid characters"),
    ),
    (
        ("ringbuf-write", {"device": "r0", "data": "e A=", "format": "base64"}),
        err("Base64 data contains invalid characters"),
    ),
    # QEMU's lenient base64: incomplete groups are dropped, "=" inside is fine
    (("ringbuf-write", {"device": "r0", "data": "x", "format": "base64"}), OK),
    (("ringbuf-write", {"device": "r0", "data": "eA", "format": "base64"}), OK),
    (("ringbuf-write", {"device": "r0", "data": "eA==eA==\n", "format": "base64"}), OK),
    (("ringbuf-read", {"device": "r0", "size": 100, "format": "base64"}), {"return": "eHg="}),
    (("ringbuf-write", {"device": "r0", "data": "a\u0000b"}), OK),  # NUL arrives as C0 80
    (("ringbuf-read", {"device": "r0", "size": 100, "format": "base64"}), {"return": "YcCAYg=="}),
    (("ringbuf-write", {"device": "r0", "data": "AGE=", "format": "base64"}), OK),
    (("ringbuf-read", {"device": "r0", "size": 100}), {"return": ""}),  # cut at the NUL
    (("ringbuf-write", {"device": "r0", "data": "\u00e9\u00e9"}), OK),
    (("ringbuf-read", {"device": "r0", "size": 1}), {"return": "\ufffd"}),
    (("ringbuf-read", {"device": "r0", "size": 3}), {"return": "\ufffd\u00e9"}),
    (add("r1", "ringbuf", size=15), add_err("r1", "size of ringbuf chardev must be power of two")),
    (add("r9", "ringbuf", size=-4), add_err("r9", "size of ringbuf chardev must be power of two")),
    (add("rz", "ringbuf", size=0), OK),
    (add("r2", "memory"), OK),
    (add("r0", "null"), err("Chardev with id 'r0' already exists")),
    (add("qmp0", "null"), err("Chardev with id 'qmp0' already exists")),
    # plain backends and their errors
    (add("n0", "null", logfile="{d}/n0.log"), OK),
    (
        add("nx", "null", logfile="/nonexist/log"),
        add_err("nx", f"Could not create '/nonexist/log': {NOENT}"),
    ),
    (add("f0", "file", out="{d}/f0.out"), OK),
    (
        add("f1", "file", out="/nonexist/f1"),
        add_err("f1", f"Could not open '/nonexist/f1': {NOENT}"),
    ),
    (
        add("f2", "file", out="{d}/f2.out", **{"in": "/nonexist/in"}),
        add_err("f2", f"Could not open '/nonexist/in': {NOENT}"),
    ),
    (add("bad id", "null"), OK),
    (add("", "null"), OK),
    (add("m0", "msmouse"), add_err("m0", "'msmouse' is not a valid char driver name")),
    (add("v0", "vc"), add_err("v0", "'vc' is not a valid char driver name")),
    (add("db", "dbus", name="x"), add_err("db", "'dbus' is not a valid char driver name")),
    (add("st", "stdio"), OK),
    (add("st2", "stdio"), add_err("st2", "cannot use stdio by multiple character devices")),
    (add("se", "serial", device="/dev/null"), OK),
    (
        add("pa", "parallel", device="/dev/null"),
        add_err("pa", "not a parallel port: Inappropriate ioctl for device"),
    ),
    (
        add("pp", "pipe", device="{d}/nopipe"),
        add_err("pp", f"Could not open '{{d}}/nopipe': {NOENT}"),
    ),
    (add("ud", "udp", remote={"type": "inet", "data": {"host": "127.0.0.1", "port": "9"}}), OK),
    (add("u2", "udp", remote=unix("{d}/u")), add_err("u2", "socket type unsupported for datagram")),
    (add("p0", "pty", path="{d}/ptylink"), {"return": {"pty": "/dev/pts/N"}}),
    (
        add("p1", "pty", path="/nonexist/pt"),
        add_err("p1", f"Failed to create PTY symlink: {NOENT}"),
    ),
    # sockets
    (add("s0", "socket", addr=unix("{d}/s0.sock"), server=True, wait=False), OK),
    (
        add("sk", "socket", addr=unix("{d}/sk.sock"), server=False),
        add_err("sk", f"Failed to connect to '{{d}}/sk.sock': {NOENT}"),
    ),
    (add("sr", "socket", addr=unix("{d}/sr.sock"), server=False, **{"reconnect-ms": 1000}), OK),
    (
        add("sx", "socket", addr=unix("{d}/sx.sock"), **{"reconnect-ms": 100}),
        add_err("sx", "'reconnect-ms' option is incompatible with socket in server listen mode"),
    ),
    (
        add("sw", "socket", addr=unix("{d}/sw.sock"), server=False, wait=False),
        add_err("sw", "'wait' option is incompatible with socket in client connect mode"),
    ),
    (add("tc", "socket", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}), OK),
    # mux and hub, and who is busy
    (add("mx", "mux", chardev="zz"), add_err("mx", "mux: base chardev zz not found")),
    (add("n1", "null"), OK),
    (add("mx", "mux", chardev="n1"), OK),
    (add("m3", "mux", chardev="qmp0"), add_err("m3", "chardev 'qmp0' is already in use")),
    (add("hb", "hub", chardevs=["n1"]), add_err("hb", "chardev 'n1' is already in use")),
    (add("h0", "hub", chardevs=[]), add_err("h0", "hub: 'chardevs' list is not defined")),
    (add("h1", "hub", chardevs=["zz"]), add_err("h1", "hub: chardev can't be found by id 'zz'")),
    (add("n2", "null"), OK),
    (add("h2", "hub", chardevs=["n2"]), OK),
    (
        add("h3", "hub", chardevs=["h2"]),
        add_err(
            "h3",
            "hub: multiplexers and hub devices can't be stacked, check chardev 'h2', chardev "
            "should not be a hub device or have 'mux=on' enabled",
        ),
    ),
    (("chardev-remove", {"id": "n1"}), err("Chardev 'n1' is busy")),
    (("chardev-remove", {"id": "n2"}), err("Chardev 'n2' is busy")),
    (("chardev-remove", {"id": "qmp0"}), err("Chardev 'qmp0' is busy")),
    (
        ("query-chardev", None),
        {
            "return": [
                info("qmp0", "unix:QMP,server=on", True),
                info("r0", "ringbuf"),
                info("rz", "ringbuf"),
                info("r2", "memory"),
                info("n0", "null"),
                info("f0", "file"),
                info("bad id", "null"),
                info("", "null"),
                info("st", "stdio"),
                info("se", "serial"),
                info("ud", "udp"),
                info("p0", "pty:/dev/pts/N"),
                info("s0", "disconnected:unix:{d}/s0.sock,server=on"),
                info("sr", "disconnected:unix:{d}/sr.sock"),
                info("tc", "disconnected:tcp:127.0.0.1:PORT,server=on"),
                info("n1", "null"),
                info("mx", "mux"),
                info("n2", "null"),
                info("h2", "hub"),
            ]
        },
    ),
    # send-break, change, remove
    (("chardev-send-break", {"id": "n0"}), OK),
    (("chardev-send-break", {"id": "se"}), OK),
    (("chardev-send-break", {"id": "qmp0"}), OK),
    (("chardev-send-break", {"id": "zz"}), err("Chardev 'zz' not found")),
    (
        ("chardev-change", {"id": "zz", "backend": {"type": "null", "data": {}}}),
        err("Chardev 'zz' does not exist"),
    ),
    (
        ("chardev-change", {"id": "qmp0", "backend": {"type": "null", "data": {}}}),
        err("Chardev user does not support chardev hotswap"),
    ),
    (
        ("chardev-change", {"id": "n1", "backend": {"type": "null", "data": {}}}),
        err("Chardev user does not support chardev hotswap"),
    ),
    (
        ("chardev-change", {"id": "mx", "backend": {"type": "null", "data": {}}}),
        err("For mux or hub device hotswap is not supported yet"),
    ),
    (
        ("chardev-change", {"id": "h2", "backend": {"type": "null", "data": {}}}),
        err("For mux or hub device hotswap is not supported yet"),
    ),
    (("ringbuf-write", {"device": "r2", "data": "kept?"}), OK),
    (("chardev-change", {"id": "r2", "backend": {"type": "ringbuf", "data": {"size": 4}}}), OK),
    (("ringbuf-read", {"device": "r2", "size": 10}), {"return": ""}),  # a new ring
    (("chardev-change", {"id": "f0", "backend": {"type": "ringbuf", "data": {}}}), OK),
    (("ringbuf-write", {"device": "f0", "data": "now a ring"}), OK),
    (("ringbuf-read", {"device": "f0", "size": 3}), {"return": "now"}),
    # a failed change removes the chardev (QEMU removes, then adds anew)
    (
        (
            "chardev-change",
            {"id": "n0", "backend": {"type": "file", "data": {"out": "/nonexist/x"}}},
        ),
        add_err("n0", f"Could not open '/nonexist/x': {NOENT}"),
    ),
    (("chardev-remove", {"id": "n0"}), err("Chardev 'n0' not found")),
    (
        ("chardev-change", {"id": "rz", "backend": {"type": "msmouse", "data": {}}}),
        add_err("rz", "'msmouse' is not a valid char driver name"),
    ),
    (("ringbuf-read", {"device": "rz", "size": 1}), err("Device 'rz' not found")),
    (("chardev-remove", {"id": "mx"}), OK),
    (("chardev-remove", {"id": "n1"}), OK),
    (("chardev-remove", {"id": "h2"}), OK),
    (("chardev-remove", {"id": "n2"}), OK),
    (("chardev-remove", {"id": "n1"}), err("Chardev 'n1' not found")),
    (("chardev-remove", {"id": "p0"}), OK),
    (("chardev-remove", {"id": "s0"}), OK),
    (("chardev-remove", {"id": "st"}), OK),
    (
        ("query-chardev", None),
        {
            "return": [
                info("qmp0", "unix:QMP,server=on", True),
                info("r0", "ringbuf"),
                info("bad id", "null"),
                info("", "null"),
                info("se", "serial"),
                info("ud", "udp"),
                info("sr", "disconnected:unix:{d}/sr.sock"),
                info("tc", "disconnected:tcp:127.0.0.1:PORT,server=on"),
                info("r2", "ringbuf"),
                info("f0", "ringbuf"),
            ]
        },
    ),
]

# more of QEMU's checks
STEPS += [
    *[(add(f"k{i}", "null"), OK) for i in range(5)],
    (
        add("hk", "hub", chardevs=[f"k{i}" for i in range(5)]),
        add_err("hk", "hub: too many uses of chardevs 'hk' (maximum is 4)"),
    ),
    (add("hd", "hub", chardevs=["k0", "k0"]), add_err("hd", "chardev 'k0' is already in use")),
    (("chardev-remove", {"id": "k0"}), OK),  # the failed hub let go of it
    (add("mk", "mux", chardev="k1"), OK),
    (add("mm", "mux", chardev="mk"), OK),  # a mux of a mux is allowed
    (
        add("t1", "socket", addr=unix("{d}/t1.sock"), **{"tls-creds": "nope"}),
        add_err("t1", "No TLS credentials with id 'nope'"),
    ),
    (
        add("t2", "socket", addr=unix("{d}/t2.sock"), **{"tls-authz": "nope"}),
        add_err("t2", "'tls_authz' option requires 'tls_creds' option"),
    ),
    (
        add("t4", "socket", addr=unix("{d}/t4.sock"), websocket=True, server=False),
        add_err("t4", "Websocket client is not implemented"),
    ),
    (
        add("t6", "socket", addr={"type": "fd", "data": {"str": "3"}}),
        add_err("t6", "only QEMU supports file descriptor passing"),
    ),
    (
        add("t7", "socket", addr=unix("{d}/t7.sock"), server=False, **{"reconnect-ms": -1}),
        add_err("t7", f"Failed to connect to '{{d}}/t7.sock': {NOENT}"),
    ),
    (
        add("t8", "socket", addr=unix("/nonexist/t8.sock")),
        add_err("t8", f"Failed to bind socket to /nonexist/t8.sock: {NOENT}"),
    ),
    (
        add(
            "t9",
            "socket",
            addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
            telnet=True,
        ),
        OK,
    ),
    (add("t5", "socket", addr=unix("{d}/t5.sock"), tn3270=True), OK),
    (
        add("u3", "udp", remote=inet("127.0.0.1", "9"), local=inet("127.0.0.1", "x")),
        add_err("u3", f"address resolution failed for 127.0.0.1:x: {NOSERV}"),
    ),
    (
        add("u4", "udp", remote=inet("127.0.0.1", "x")),
        add_err("u4", f"address resolution failed for 127.0.0.1:x: {NOSERV}"),
    ),
    (
        add("u5", "udp", remote=inet("127.0.0.1", "9"), local=unix("/tmp/x")),
        add_err("u5", "address resolution failed for /tmp/x:0: Name or service not known"),
    ),
    (
        add("sv", "serial", device="/nonexist/tty"),
        add_err("sv", f"Could not open '/nonexist/tty': {NOENT}"),
    ),
    (
        ("query-chardev", None),
        {
            "return": [
                *STEPS[-1][1]["return"],
                *[info(f"k{i}", "null") for i in range(1, 5)],
                info("mk", "mux"),
                info("mm", "mux"),
                info("t9", "disconnected:telnet:127.0.0.1:PORT,server=on"),
                info("t5", "disconnected:unix:{d}/t5.sock,server=on"),
            ]
        },
    ),
]


def fill(value: Any, d: str) -> Any:
    """``value`` with ``{d}`` replaced by the scratch directory, everywhere."""
    return json.loads(json.dumps(value).replace("{d}", d))


def normalize(reply: dict[str, Any], qmp_path: str) -> dict[str, Any]:
    """Pty numbers, TCP ports and the monitor's path made constant; query-chardev sorted."""
    text = json.dumps(reply).replace(qmp_path, "QMP")
    text = re.sub(r"/dev/pts/\d+", "/dev/pts/N", text)
    text = re.sub(r"((?:tcp|telnet):[^\"]*?):\d+,server", r"\1:PORT,server", text)
    out = json.loads(text)
    if isinstance(out.get("return"), list) and out["return"] and "label" in out["return"][0]:
        out["return"] = sorted(out["return"], key=lambda e: e["label"])
    return out


def expected(reply: dict[str, Any], d: str) -> dict[str, Any]:
    """A step's expected reply, filled in and sorted as :func:`normalize` sorts."""
    return normalize(fill(reply, d), "QMP")
