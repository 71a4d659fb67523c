"""The QOM conversation held with QEMU 11.1's qemu-storage-daemon (opt-in: --real-qsd): the
replies conversation.py expects, and qsd-py gives, are QEMU's; and the QOM commands'
argument shapes in query-qmp-schema are QEMU's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nbd_server.qmp_talk import Talk
from qom.conversation import OBJECTS, STEPS, normalize
from realqsd_support import real_daemon, shared_dir

pytestmark = pytest.mark.realqsd

COMMANDS = [
    "qom-list",
    "qom-get",
    "qom-set",
    "qom-list-get",
    "qom-list-properties",
    "qom-list-types",
]


@pytest.fixture
def real() -> Iterator[Talk]:
    objects = [a for obj in OBJECTS for a in ("--object", obj)]
    with shared_dir("qom") as work, real_daemon(objects, work / "qmp.sock", timeout=20):
        client = Talk(str(work / "qmp.sock"))
        yield client
        client.close()


def test_conversation_with_qemu(real: Talk) -> None:
    for name, args, reply in STEPS:
        got = real.command(name, args)["reply"]
        assert normalize(got) == normalize(reply), (name, args)


def _shapes(answer: list[dict[str, Any]]) -> dict[str, Any]:
    """Each QOM command's arguments and return, with the schema's type names resolved."""
    by_name = {e["name"]: e for e in answer}

    def resolve(name: str) -> Any:
        entry = by_name[name]
        if entry["meta-type"] == "object":
            return sorted((m["name"], resolve(m["type"]), "default" in m) for m in entry["members"])
        if entry["meta-type"] == "array":
            return ["array", resolve(entry["element-type"])]
        return entry.get("json-type", entry["meta-type"])

    return {c: (resolve(by_name[c]["arg-type"]), resolve(by_name[c]["ret-type"])) for c in COMMANDS}


def test_qom_commands_are_qemus(real: Talk, qsd: Any) -> None:
    theirs = real.command("query-qmp-schema")["reply"]["return"]
    ours_client = Talk(str(qsd().qmp_path))
    try:
        ours = ours_client.command("query-qmp-schema")["reply"]["return"]
    finally:
        ours_client.close()
    assert _shapes(ours) == _shapes(theirs)
