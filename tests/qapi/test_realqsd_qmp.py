"""Compare QMP argument errors and the schema with QEMU's real qemu-storage-daemon (optional)."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from realqsd_support import SHARE, real_daemon, require_real_qsd
from test_validation import QMP_ERRORS

from qsd_py.qapi.schema import load_schema

pytestmark = pytest.mark.realqsd


class RealMonitor:
    """A minimal QMP client for the comparison (one command at a time)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())  # greeting
        self.execute("qmp_capabilities", None)

    def execute(self, name: str, args: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = json.loads(self.reader.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture(scope="module")
def real_monitor() -> Iterator[RealMonitor]:
    SHARE.mkdir(exist_ok=True)
    path = SHARE / f"qmp-{uuid.uuid4().hex[:8]}.sock"
    with real_daemon([], path, timeout=20):
        monitor = RealMonitor(str(path))
        yield monitor
        monitor.close()


@pytest.mark.parametrize(("command", "args", "desc"), QMP_ERRORS)
def test_same_error_as_qemu(real_monitor: RealMonitor, command: str, args: Any, desc: str) -> None:
    reply = real_monitor.execute(command, args)
    assert reply.get("error", {}).get("desc") == desc


# --- the schema itself, compared with QEMU's introspection ----------------------------------

Shape = Any


def _shape(
    info: dict[str, dict[str, Any]], name: str, stops: dict[str, str], top: bool = False
) -> Shape:
    """A type of a query-qmp-schema answer with its masked names resolved into structure.

    Types named in ``stops`` (by their name in this answer) become markers below the ``top``
    level, which ends the recursion through BlockdevOptions and ImageInfo."""
    if name in stops and not top:
        return stops[name]
    entry = info[name]
    meta = entry["meta-type"]
    if meta == "builtin":
        return entry["name"]
    if meta == "enum":
        return {"enum": entry["values"]}
    if meta == "array":
        return [_shape(info, entry["element-type"], stops)]
    if meta == "alternate":
        return {"alternate": [_shape(info, m["type"], stops) for m in entry["members"]]}
    shape: dict[str, Any] = {
        "members": [
            (m["name"], "default" in m, _shape(info, m["type"], stops)) for m in entry["members"]
        ]
    }
    if "tag" in entry:
        shape["tag"] = entry["tag"]
        shape["variants"] = {v["case"]: _shape(info, v["type"], stops) for v in entry["variants"]}
    return shape


def _fits(ours: Shape, theirs: Shape) -> bool:
    """Whether everything ``ours`` declares exists in ``theirs`` with the same type and
    optionality (``theirs`` may have more members, enum values and union branches)."""
    if isinstance(ours, list):
        return isinstance(theirs, list) and _fits(ours[0], theirs[0])
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return ours == theirs
    if "enum" in ours:
        return "enum" in theirs and set(ours["enum"]) <= set(theirs["enum"])
    if "alternate" in ours:
        pairs = zip(ours["alternate"], theirs.get("alternate", []), strict=False)
        return len(ours["alternate"]) == len(theirs.get("alternate", [])) and all(
            _fits(a, b) for a, b in pairs
        )
    members = {name: (opt, typ) for name, opt, typ in theirs.get("members", [])}
    for name, optional, typ in ours["members"]:
        if name not in members or members[name][0] != optional:
            return False
        if not _fits(typ, members[name][1]):
            return False
    return ours.get("tag") == theirs.get("tag") and all(
        case in theirs.get("variants", {}) and _fits(v, theirs["variants"][case])
        for case, v in ours.get("variants", {}).items()
    )


class Introspection:
    """One query-qmp-schema answer, with the entry points these tests start from."""

    def __init__(self, answer: list[dict[str, Any]]) -> None:
        self.info = {e["name"]: e for e in answer}
        self.options = self.info["blockdev-add"]["arg-type"]
        nodes = self.info[self.info["query-named-block-nodes"]["ret-type"]]["element-type"]
        self.node_info = nodes
        self.image_info = self.member_type(nodes, "image")
        self.stops = {self.options: "BlockdevOptions", self.image_info: "ImageInfo"}

    def member_type(self, name: str, member: str) -> str:
        return next(m["type"] for m in self.info[name]["members"] if m["name"] == member)

    def shape(self, name: str) -> Shape:
        return _shape(self.info, name, self.stops, top=True)

    def driver(self, driver: str) -> Shape:
        variants = self.info[self.options]["variants"]
        return self.shape(next(v["type"] for v in variants if v["case"] == driver))

    def event(self, name: str) -> Shape:
        return self.shape(self.info[name]["arg-type"])


@pytest.fixture(scope="module")
def introspections(real_monitor: RealMonitor) -> tuple[Introspection, Introspection]:
    theirs = real_monitor.execute("query-qmp-schema", None)["return"]
    return Introspection(load_schema().introspect()), Introspection(theirs)


def test_qcow2_options_are_qemus(introspections: tuple[Introspection, Introspection]) -> None:
    ours, theirs = introspections
    qcow2 = ours.driver("qcow2")
    assert [m[0] for m in qcow2["members"]][:3] == ["file", "backing", "lazy-refcounts"]
    assert qcow2 == theirs.driver("qcow2")


def test_nbd_options_are_qemus(introspections: tuple[Introspection, Introspection]) -> None:
    """The nbd driver's members, and down in ``server`` a part of QEMU's SocketAddress
    (keep-alive-count/-idle/-interval are QEMU's, not ours)."""
    ours, theirs = introspections
    nbd, real = ours.driver("nbd"), theirs.driver("nbd")
    assert nbd["members"][1:] == real["members"][1:]
    assert [m[0] for m in nbd["members"]] == [m[0] for m in real["members"]]
    assert _fits(nbd, real)


def test_block_image_corrupted_is_qemus(
    introspections: tuple[Introspection, Introspection],
) -> None:
    ours, theirs = introspections
    assert ours.event("BLOCK_IMAGE_CORRUPTED") == theirs.event("BLOCK_IMAGE_CORRUPTED")


def test_node_info_is_a_part_of_qemus(introspections: tuple[Introspection, Introspection]) -> None:
    ours, theirs = introspections
    image = ours.shape(ours.image_info)
    assert "backing-image" in [m[0] for m in image["members"]]
    assert _fits(image, theirs.shape(theirs.image_info))
    assert _fits(ours.shape(ours.node_info), theirs.shape(theirs.node_info))


def _real_img(*args: str) -> None:
    tool = require_real_qsd()
    subprocess.run([str(tool), "run", "qemu-img", *args], check=True, capture_output=True)


def test_qemu_chain_answer_fits_our_schema(real_monitor: RealMonitor) -> None:
    """A live answer for a qcow2 chain opened from the top image's header."""
    tag = uuid.uuid4().hex[:8]
    base, top = SHARE / f"base-{tag}.qcow2", SHARE / f"top-{tag}.qcow2"
    try:
        _real_img("create", "-q", "-f", "qcow2", str(base), "16M")
        _real_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
        reply = real_monitor.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "filename": str(top)}},
        )
        assert reply == {"return": {}}
        nodes = real_monitor.execute("query-named-block-nodes", None)["return"]
        real_monitor.execute("blockdev-del", {"node-name": "t"})
    finally:
        for path in (base, top):
            path.unlink(missing_ok=True)
    node = next(n for n in nodes if n["node-name"] == "t")
    assert node["backing_file_depth"] == 1
    assert node["image"]["backing-image"]["filename"] == str(base)
    schema = load_schema()
    for entry in nodes:
        assert schema.check_type_value("BlockDeviceInfo", entry) == entry


CHARDEV_COMMANDS = [
    "chardev-add", "chardev-change", "chardev-remove", "chardev-send-break",
    "query-chardev", "query-chardev-backends", "ringbuf-read", "ringbuf-write",
]  # fmt: skip


@pytest.mark.parametrize("command", CHARDEV_COMMANDS)
def test_chardev_commands_are_qemus(
    introspections: tuple[Introspection, Introspection], command: str
) -> None:
    """Arguments and return types exactly QEMU's, the ChardevBackend union with all cases."""
    ours, theirs = introspections
    for key in ("arg-type", "ret-type"):
        assert ours.shape(ours.info[command][key]) == theirs.shape(theirs.info[command][key])


def test_chardev_backend_kinds_are_qemus(
    introspections: tuple[Introspection, Introspection],
) -> None:
    """All 22 cases in QEMU's order, ``memory`` with its ``deprecated`` feature."""
    kinds = []
    for side in introspections:
        backend = side.member_type(side.info["chardev-add"]["arg-type"], "backend")
        kinds.append(side.info[side.member_type(backend, "type")]["members"])
    assert kinds[0] == kinds[1]
    assert len(kinds[0]) == 22


def test_secret_objects_are_qemus(introspections: tuple[Introspection, Introspection]) -> None:
    """object-add's ``secret`` and ``secret_keyring`` members, as QEMU 11.1 lists them."""
    ours, theirs = introspections

    def variant(side: Introspection, case: str) -> Shape:
        options = side.info[side.info["object-add"]["arg-type"]]
        return side.shape(next(v["type"] for v in options["variants"] if v["case"] == case))

    for case in ("secret", "secret_keyring"):
        assert variant(ours, case) == variant(theirs, case), case
    assert [m[0] for m in variant(theirs, "secret")["members"]] == [
        "format", "keyid", "iv", "data", "file"
    ]  # fmt: skip


BITMAP_COMMANDS = [
    "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
]  # fmt: skip


@pytest.mark.parametrize("command", BITMAP_COMMANDS)
def test_bitmap_commands_are_qemus(
    introspections: tuple[Introspection, Introspection], command: str
) -> None:
    """Arguments, return type and features exactly QEMU's."""
    ours, theirs = introspections
    for key in ("arg-type", "ret-type"):
        assert ours.shape(ours.info[command][key]) == theirs.shape(theirs.info[command][key])
    assert ours.info[command].get("features") == theirs.info[command].get("features")
