"""A QOM conversation and the replies QEMU 11.1's qemu-storage-daemon gives to it (recorded
with ../shared/tools/real-qsd; test_realqsd_qom.py holds it with QEMU again).

QEMU lists properties and types in hash-table order, so lists are compared as sorted lists;
QEMU's monitor object ``compat_monitor0`` (qsd-py has no monitor objects) is left out.
"""

from __future__ import annotations

from typing import Any

# Both daemons start with these objects (and the monitor chardev qmp0).
OBJECTS = [
    "iothread,id=io0",
    "secret,id=sec0,data=hello",
    "authz-simple,id=az0,identity=foo",
]


def err(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def ok(value: Any = None) -> dict[str, Any]:
    return {"return": {} if value is None else value}


def props(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": n, "type": t} for n, t in pairs]


IOTHREAD = props(
    ("type", "string"), ("thread-pool-min", "int"), ("aio-max-batch", "int"),
    ("thread-pool-max", "int"), ("poll-max-ns", "int"), ("poll-weight", "int"),
    ("poll-grow", "int"), ("poll-shrink", "int"),
)  # fmt: skip
SECRET_COMMON = props(
    ("type", "string"), ("iv", "string"), ("keyid", "string"), ("format", "QCryptoSecretFormat")
)
TLS = props(
    ("type", "string"), ("endpoint", "QCryptoTLSCredsEndpoint"), ("dir", "string"),
    ("verify-peer", "bool"), ("priority", "string"),
)  # fmt: skip
CONTAINER = "child<container>"
RANGE = "value must be in range [0, 9223372036854775807]"

STEPS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("qom-list", {"path": "/"}, ok(props(
        ("type", "string"), ("backend", CONTAINER), ("objects", CONTAINER),
        ("chardevs", CONTAINER), ("audiodevs", CONTAINER)))),
    ("qom-list", {"path": "/objects"}, ok(props(
        ("type", "string"), ("az0", "child<authz-simple>"), ("io0", "child<iothread>"),
        ("sec0", "child<secret>")))),
    ("qom-list", {"path": "/chardevs"}, ok(props(
        ("type", "string"), ("qmp0", "child<chardev-socket>")))),
    ("qom-list", {"path": "/chardevs/qmp0"}, ok(props(
        ("type", "string"), ("connected", "bool"), ("addr", "SocketAddress")))),
    ("qom-get", {"path": "/chardevs/qmp0", "property": "connected"}, ok(True)),
    ("qom-list", {"path": "/objects/io0"}, ok(IOTHREAD)),
    ("qom-list", {"path": "io0"}, ok(IOTHREAD)),
    ("qom-list", {"path": "/objects/sec0"}, ok(SECRET_COMMON + props(
        ("file", "string"), ("data", "string")))),
    ("qom-list", {"path": "/nope"}, err("Device '/nope' not found", "DeviceNotFound")),
    ("qom-get", {"path": "/objects", "property": "io0"}, ok("/objects/io0")),
    ("qom-get", {"path": "/", "property": "type"}, ok("container")),
    ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}, ok(32768)),
    ("qom-get", {"path": "/objects/io0", "property": "nope"},
     err("Property 'iothread.nope' not found")),
    ("qom-get", {"path": "/objects/nope", "property": "type"},
     err("Device '/objects/nope' not found", "DeviceNotFound")),
    ("qom-get", {"path": "/objects/sec0", "property": "data"}, ok("hello")),
    ("qom-get", {"path": "/objects/sec0", "property": "format"}, ok("raw")),
    ("qom-get", {"path": "/objects/sec0", "property": "keyid"}, ok("")),
    ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 1000}, ok()),
    ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}, ok(1000)),
    ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": -1},
     err(f"poll-max-ns {RANGE}")),
    ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": "x"},
     err("Invalid parameter type for 'poll-max-ns', expected: integer")),
    ("qom-set", {"path": "/objects/io0", "property": "poll-grow", "value": -1},
     err(f"poll-grow {RANGE}")),
    ("qom-set", {"path": "/objects/io0", "property": "aio-max-batch", "value": -1},
     err(f"aio-max-batch {RANGE}")),
    ("qom-set", {"path": "/objects/io0", "property": "poll-weight", "value": 64},
     err("poll-weight value must be in range [0, 63]")),
    ("qom-set", {"path": "/objects/io0", "property": "thread-pool-min", "value": 100},
     err("bad thread-pool-min/thread-pool-max values")),
    # QEMU keeps a value its event loop refused (min 100 stays).
    ("qom-set", {"path": "/objects/io0", "property": "thread-pool-max", "value": 8},
     err("bad thread-pool-min/thread-pool-max values")),
    ("qom-set", {"path": "/objects/io0", "property": "thread-pool-max", "value": 200}, ok()),
    ("qom-set", {"path": "/objects/io0", "property": "type", "value": "x"},
     err("Property 'iothread.type' is not writable")),
    ("qom-set", {"path": "/objects", "property": "io0", "value": "x"},
     err("Property 'container.io0' is not writable")),
    ("qom-set", {"path": "/objects/sec0", "property": "format", "value": "bad"},
     err("Parameter 'format' does not accept value 'bad'")),
    ("qom-set", {"path": "/objects/az0", "property": "identity", "value": "bar"}, ok()),
    ("qom-get", {"path": "/objects/az0", "property": "identity"}, ok("bar")),
    ("qom-list-get", {"paths": ["/objects/io0", "/objects/az0"]}, ok([
        {"properties": [
            {"name": "type", "value": "iothread", "type": "string"},
            {"name": "thread-pool-min", "value": 100, "type": "int"},
            {"name": "aio-max-batch", "value": 0, "type": "int"},
            {"name": "thread-pool-max", "value": 200, "type": "int"},
            {"name": "poll-max-ns", "value": 1000, "type": "int"},
            {"name": "poll-weight", "value": 3, "type": "int"},
            {"name": "poll-grow", "value": 2, "type": "int"},
            {"name": "poll-shrink", "value": 2, "type": "int"}]},
        {"properties": [
            {"name": "type", "value": "authz-simple", "type": "string"},
            {"name": "identity", "value": "bar", "type": "string"}]}])),
    ("qom-list-get", {"paths": ["/objects/io0", "/objects/nope"]},
     err("Device '/objects/nope' not found", "DeviceNotFound")),
    ("object-add", {"qom-type": "authz-list", "id": "al0",
                    "rules": [{"match": "a", "policy": "allow"}]}, ok()),
    ("qom-list-get", {"paths": ["/objects/al0"]}, ok([{"properties": [
        {"name": "type", "value": "authz-list", "type": "string"},
        {"name": "policy", "value": "deny", "type": "QAuthZListPolicy"},
        {"name": "rules", "value": [{"policy": "allow", "match": "a"}],
         "type": "QAuthZListRule"}]}])),
    ("object-add", {"qom-type": "tls-creds-anon", "id": "ta0", "endpoint": "server"}, ok()),
    ("qom-list-get", {"paths": ["/objects/ta0"]}, ok([{"properties": [
        {"name": "type", "value": "tls-creds-anon", "type": "string"},
        {"name": "endpoint", "value": "server", "type": "QCryptoTLSCredsEndpoint"},
        {"name": "dir", "value": "", "type": "string"},
        {"name": "verify-peer", "value": True, "type": "bool"},
        {"name": "priority", "value": "", "type": "string"}]}])),
    ("object-del", {"id": "ta0"}, ok()),
    ("qom-list-properties", {"typename": "iothread"}, ok(IOTHREAD)),
    ("qom-list-properties", {"typename": "secret_keyring"}, ok(SECRET_COMMON + props(
        ("serial", "int32_t")))),
    ("qom-list-properties", {"typename": "secret_common"}, ok(SECRET_COMMON)),
    ("qom-list-properties", {"typename": "tls-creds-psk"}, ok(TLS + props(
        ("username", "string")))),
    ("qom-list-properties", {"typename": "tls-creds-x509"}, ok(TLS + props(
        ("sanity-check", "bool"), ("passwordid", "string")))),
    ("qom-list-properties", {"typename": "object"}, ok(props(("type", "string")))),
    ("qom-list-properties", {"typename": "nope"},
     err("Class 'nope' not found", "DeviceNotFound")),
    ("qom-list-properties", {"typename": "user-creatable"},
     err("Parameter 'typename' expects a QOM type")),
    ("qom-list-types", {"implements": "tls-creds", "abstract": True}, ok([
        {"name": "tls-creds-anon", "parent": "tls-creds"},
        {"name": "tls-creds-psk", "parent": "tls-creds"},
        {"abstract": True, "name": "tls-creds", "parent": "object"},
        {"name": "tls-creds-x509", "parent": "tls-creds"}])),
    ("qom-list-types", {"implements": "secret_common", "abstract": True}, ok([
        {"abstract": True, "name": "secret_common", "parent": "object"},
        {"name": "secret", "parent": "secret_common"},
        {"name": "secret_keyring", "parent": "secret_common"}])),
    ("qom-list-types", {"implements": "chardev"}, ok([
        {"name": f"chardev-{k}", "parent": "chardev"}
        for k in ("hub", "mux", "parallel", "null", "ringbuf", "socket", "udp", "pty")
    ] + [{"name": f"chardev-{k}", "parent": "chardev-fd"}
         for k in ("serial", "pipe", "stdio", "file")]
      + [{"name": "chardev-memory", "parent": "chardev-ringbuf"}])),
    ("qom-list-types", {"implements": "nope"}, ok([])),
]  # fmt: skip


def _key(item: Any) -> str:
    return repr(sorted(item.items())) if isinstance(item, dict) else repr(item)


def normalize(reply: dict[str, Any]) -> dict[str, Any]:
    """Lists sorted (QEMU's hash order), QEMU's monitor object left out."""
    if "return" not in reply:
        return reply
    return {"return": _norm(reply["return"])}


def _norm(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [
            _norm(v)
            for v in value
            if not (isinstance(v, dict) and v.get("name") == "compat_monitor0")
        ]
        return sorted(items, key=_key)
    return value
